"""This node's app keys, ``<root>/networkd/apps/<app>/<proc>/<ip>:<port>`` = hostname.

The cluster's publishers (tinydns forwarding zones, webrouter) read them to
learn which nodes serve a port-scoped VIP key.  The Go daemon wrote them
without a TTL, so a dead node stayed published forever ([BUG 22]); here
they live on the process lease and vanish with it.

Level-triggered: ``sync(desired, lease)`` compares the keys this node
should publish with the apps snapshot and with what it wrote on ``lease``,
and puts or deletes the difference, one pass at a time (networkd.serial.SerialJob;
a failed pass is retried with backoff).  A key is written
when it is missing (or still on an older lease of ours), never again while
it stands: no write without a change ([BUG 43]).  An ``A.B.C.D:PORT`` key
is shared by every node running the app: a node leaves another node's
entry alone and writes its own when that one goes, so one node leaving
never unpublishes the others.  Deletes are guarded by our lease.
"""

from __future__ import annotations

from typing import Mapping

from twisted.internet import defer
from twisted.logger import Logger

from networkd.etcd.lock import LeaseLocks
from networkd.etcd.reflector import Snapshot
from networkd.serial import SerialJob

log = Logger()


class AppKeys:
    def __init__(self, locks: LeaseLocks, reactor, hostname: str):
        self._locks = locks
        self._reactor = reactor
        self.hostname = hostname
        self.lease: int | None = None
        self.written: dict[str, int] = {}  # key -> revision of our put on ``lease``
        self.present: Mapping[str, str] | None = None  # full key -> value, from the snapshot
        self.revision = 0
        self._wanted: tuple[frozenset[str], int | None] = (frozenset(), None)
        self._job = SerialJob(reactor, self._pass, "publishing app keys",
                              failed=lambda e: log.warn("could not publish app keys: {e}; trying again", e=e))
        self.stopped = False

    @property
    def last_error(self) -> str | None:
        return self._job.last_error

    def observe(self, snapshot: Snapshot) -> None:
        """The apps prefix as etcd has it now."""
        self.present = {snapshot.prefix + key: value for key, value in snapshot.values.items()}
        self.revision = snapshot.revision

    def sync(self, desired: frozenset[str], lease: int | None) -> None:
        """Put the missing keys of ``desired`` on ``lease``, delete ours that are not wanted."""
        self._wanted = (desired, lease)
        if self.stopped or self.present is None:
            return
        if self._job.last_error is None or self._job.busy:
            self._job.request()  # after a failure the backoff's retry serves the newest wish

    async def _pass(self) -> None:
        desired, lease = self._wanted
        if lease != self.lease:
            self.lease, self.written = lease, {}  # keys on an old lease died with it
        if lease is None or self.stopped:
            return
        for key in sorted(key for key in self.written if key not in desired):
            if self.stopped:
                return
            await self._locks.withdraw(key, lease)
            self.written.pop(key, None)
            log.info("withdrew app key {key}", key=key)
        for key in sorted(key for key in desired if self._missing(key)):
            if self.stopped:
                return
            self.written[key] = await self._locks.announce(key, self.hostname, lease)
            log.info("published app key {key} on lease {lease:x}", key=key, lease=lease)

    def _missing(self, key: str) -> bool:
        value = self.present.get(key)
        if key in self.written:
            # Ours on this lease, unless deleted since we wrote it (an operator,
            # or the node whose entry had replaced ours withdrew it).
            return value is None and self.revision >= self.written[key]
        # Absent, or ours on an older lease or a previous process's: put it on ours.
        return value is None or value == self.hostname

    async def withdraw_all(self) -> None:
        """Stop: delete every key we wrote while it is still on our lease."""
        self.stopped = True
        await self._job.stop()
        lease, keys, self.written = self.lease, sorted(self.written), {}
        if lease is None or not keys:
            return
        results = await defer.DeferredList([self._locks.withdraw(key, lease) for key in keys], consumeErrors=True)
        for key, (ok, result) in zip(keys, results):
            if not ok:
                log.warn("could not withdraw app key {key}: {e}; it goes with our lease",
                         key=key, e=result.getErrorMessage())
        log.info("withdrew app keys {keys}", keys=", ".join(keys))
