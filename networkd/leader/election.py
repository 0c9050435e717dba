"""Leader election: one networkd of the cluster runs the cluster-wide tasks.

The leader is whoever created ``<root>/networkd/leader`` (value: its host
name) on its live lease, create-if-absent like every lock here.  Being the
leader means holding that key on our *current* lease, not seeing our host
name in it ([BUG 28]): a restarted process on the old leader's node waits
until the old key expires with the old lease.  On stop the leader resigns
(deletes the key while it is still on its lease) so another node takes
over at once.  Its writes are guarded by the key as well
(``LeaseLocks.put_while_held``): a leader that lost the key without having
noticed yet cannot overwrite its successor.
"""

from __future__ import annotations

from typing import Callable

from twisted.application import service
from twisted.logger import Logger

from networkd.serial import notify

log = Logger()


class LeaderElection(service.Service):
    name = "leader election"

    def __init__(self, *, locks, watcher, session, key: str, hostname: str):
        """``watcher``: a PrefixWatcher whose prefix is exactly ``key``."""
        self._locks = locks
        self._watcher = watcher
        self._session = session
        self.key = key
        self.hostname = hostname
        self.lease: int | None = None  # the lease we hold the key on; None: not the leader
        self.holder: str | None = None  # the key's value in the newest snapshot
        self._seen = False  # a snapshot has told whether the key exists
        self._campaigning = False
        self._checking = False
        self._recheck = False  # a check failed: ask again on the next keep-alive
        self._listeners: list[Callable[[bool], None]] = []

    @property
    def is_leader(self) -> bool:
        return self.lease is not None

    def on_change(self, listener: Callable[[bool], None]) -> None:
        """``listener(is_leader)`` whenever leadership is won or lost."""
        self._listeners.append(listener)

    def status(self) -> dict:
        return {"key": self.key, "holder": self.holder, "is_leader": self.is_leader}

    def startService(self):
        super().startService()
        self._watcher.subscribe(self._on_snapshot)
        self._session.on_ack(self._on_ack)
        self._session.on_lost(self._on_lost)

    def stopService(self):
        super().stopService()
        lease = self.lease
        self._set(None, "stopping")
        if lease is None:
            return None
        resign = self._locks.release(self.key, lease)
        resign.addCallback(lambda deleted: log.info("resigned as leader") if deleted else None)
        resign.addErrback(lambda f: log.warn("could not resign as leader ({e}); the key expires with the lease",
                                             e=f.getErrorMessage()))
        return resign

    # -- inputs ----------------------------------------------------------------

    def _on_snapshot(self, snapshot) -> None:
        holder = snapshot.values.get("")  # the key itself: relative name ""
        if holder != self.holder:
            log.info("networkd leader: {holder}", holder=holder or "none")
        self.holder = holder
        self._seen = True
        if self.lease is not None or holder == self.hostname:
            # Ask etcd rather than trust the value: a delete and another node's
            # create can arrive as one snapshot, an older snapshot than our own
            # create shows no key, and our host name may be on an old lease.
            self._check()
        self._campaign()

    def _on_ack(self, lease: int) -> None:
        if self.lease is not None and lease != self.lease:
            self._set(None, "our lease changed")
        if self._recheck:
            self._check()
        self._campaign()

    def _on_lost(self) -> None:
        self._set(None, "our lease expired")

    # -- acting ----------------------------------------------------------------

    def _campaign(self) -> None:
        lease = self._session.lease
        if (not self.running or self.lease is not None or self._campaigning or lease is None
                or not self._seen or self.holder is not None):
            return
        self._campaigning = True

        def done(created):
            self._campaigning = False
            if created and self.running and self._session.lease == lease:
                self._set(lease, "elected")
            elif created:  # stopped or lease changed meanwhile: give it back
                self._locks.release(self.key, lease).addErrback(lambda f: None)

        def failed(failure):
            self._campaigning = False
            log.warn("leader campaign failed: {e}; trying again", e=failure.getErrorMessage())

        self._locks.acquire(self.key, self.hostname, lease).addCallbacks(done, failed)

    def _check(self) -> None:
        """Make our belief match etcd: lead if the key is on our current lease,
        not otherwise.  A failed read changes nothing (the guarded writes keep
        a wrong belief harmless) and is retried on the next keep-alive."""
        lease = self._session.lease
        if lease is None or self._checking:
            self._recheck = lease is not None
            return
        self._checking, self._recheck = True, False

        def got(kv):
            self._checking = False
            ours = kv is not None and kv.lease == lease == self._session.lease
            if ours and self.lease is None and self.running:
                self._set(lease, "the leader key is on our lease")
            elif not ours and self.lease is not None:
                self._set(None, "the leader key is no longer ours")
                self._campaign()

        def failed(failure):
            self._checking = False
            self._recheck = True
            log.warn("cannot read the leader key ({e}); asking again", e=failure.getErrorMessage())

        self._locks.read(self.key).addCallbacks(got, failed)

    def _set(self, lease: int | None, why: str) -> None:
        was = self.is_leader
        self.lease = lease
        if was == self.is_leader:
            return
        if self.is_leader:
            log.info("this node is the networkd leader ({why})", why=why)
        elif self.running:
            log.warn("this node is no longer the networkd leader ({why})", why=why)
        else:
            log.info("no longer the networkd leader ({why})", why=why)
        notify(self._listeners, self.is_leader, what="leadership listener")
