"""Whole snapshots of an etcd key prefix: list, then watch from revision+1.

Consumers never see single events: they get the complete current content
of the prefix with its revision, and reconcile to it.  A burst of events is
delivered as one snapshot.  A snapshot also names the keys that changed since
the one before it (``changed``; None after a full read), so a consumer with a
big table can update only those and still fall back to a whole comparison.
When etcd goes away the last snapshot stays, the watch resumes from the last
revision when etcd is back, and a compacted revision makes the prefix be
read again from scratch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from networkd.backoff import Backoff, Pause
from networkd.etcd.client import Compacted, EtcdUnavailable, WatchEvent
from networkd.etcd.connection import OUTAGE_SETTLE
from networkd.etcd.layered import LiveValues
from networkd.etcd.reread import Discard, ReRead
from networkd.serial import notify

log = Logger()

LIST_PAGE = 500  # keys a request when the prefix is read whole (decoded a page at a time)
CHEAP_PUBLISH = 0.005  # seconds: publishes cheaper than this never hold the next one back
MAX_PUBLISH_PAUSE = 2.0  # seconds a costly publish may hold the next one back at most


@dataclass(frozen=True)
class Snapshot:
    """All keys under ``prefix`` at ``revision``; keys are relative to the prefix.

    ``changed``: the keys put or deleted since the snapshot of ``generation - 1``
    (the previous publish), or None when unknown (a full read of the prefix:
    compare everything).  A subscriber that did not see that previous snapshot
    must compare everything too (``changes_since``).  ``deleted``: of those, the
    keys deleted, each with the revision that deleted it (None when unknown):
    keys deleted at one revision went in one transaction, or with one lease."""

    prefix: str
    revision: int
    values: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    generation: int = 0
    changed: frozenset | None = None
    deleted: Mapping[str, int] | None = None

    def changes_since(self, generation: int | None) -> frozenset | None:
        """The keys changed since the snapshot of ``generation`` (the last one a
        subscriber applied), or None if everything must be compared."""
        if generation is not None and generation == self.generation - 1:
            return self.changed
        return None


Subscriber = Callable[[Snapshot], None]
StatusListener = Callable[[bool], None]


@dataclass
class PrefixStatus:
    """What the API and /healthz tell about one watched prefix."""

    prefix: str
    connected: bool = False
    revision: int = 0
    synced_at: float | None = None  # clock time of the last successful list or event
    lost_at: float | None = None  # clock time the connection was lost, None while up
    last_error: str | None = None
    reconnects: int = 0
    relists: int = 0


class PrefixWatcher(service.Service):
    """Keeps a live snapshot of one prefix and hands it to subscribers."""

    def __init__(self, client, prefix: str, reactor, backoff: Backoff | None = None,
                 relist_every: float = 300.0):
        self.name = f"watch {prefix}"
        self._client = client
        self.prefix = prefix
        self._prefix_bytes = prefix.encode()
        self._reactor = reactor
        self._backoff = backoff or Backoff()
        self._subscribers: list[Subscriber] = []
        self._status_listeners: list[StatusListener] = []
        self._values = LiveValues()  # published without a whole copy each time (networkd.etcd.layered)
        self._discard = Discard(reactor)
        self._revision = 0
        self._changed: set | None = None  # keys changed since the last publish; None: everything
        self._deleted: dict[str, int] = {}  # of those, the deleted ones -> the revision that deleted them
        self._generation = 0
        self._quiet_relist = False  # anti-entropy: publish only if something changed
        self._must_relist = True
        self._publish_call = None
        self._next_publish_at = 0.0  # reactor time before which no snapshot is published (see _schedule_publish)
        self._loop: defer.Deferred | None = None
        self._sleep = Pause(reactor)
        self._watch = None
        self.snapshot: Snapshot | None = None
        self.status = PrefixStatus(prefix)
        # Anti-entropy: read the whole prefix again now and then, so that an
        # event a watch never delivered cannot leave the snapshot wrong.
        self._relist_every = relist_every
        self._relist_call = None
        self._down_since: float | None = None  # the outage we logged, until it is over (see _back)
        self._back_call = None

    # -- subscribers ---------------------------------------------------------

    def subscribe(self, subscriber: Subscriber) -> None:
        """Call ``subscriber`` with every new snapshot (and now, if one exists)."""
        self._subscribers.append(subscriber)
        if self.snapshot is not None:
            self._deliver(subscriber, self.snapshot)

    def on_status(self, listener: StatusListener) -> None:
        """``listener(connected)`` whenever the watch goes live or is lost (VIPs say if they can receive one)."""
        self._status_listeners.append(listener)

    def retry_now(self) -> None:
        """etcd answers again (e.g. a keep-alive got through): end a backoff wait now.  After a long
        outage that wait is up to ``Backoff.maximum`` (5 s), and a node whose lock watch is not back
        cannot take a VIP handed to it."""
        if self.running and not self.status.connected:
            self._sleep.wake()

    def _deliver(self, subscriber: Subscriber, snapshot: Snapshot) -> None:
        notify([subscriber], snapshot, what=f"snapshot subscriber of {self.prefix}")

    def _schedule_publish(self) -> None:
        """Coalesce: events of one burst become one snapshot.  After a costly publish (subscribers
        that rebuild a big zone) the next waits as long as that one took, gathering what came
        meanwhile: a burst of separate puts costs a few rebuilds, not one each, and the reactor
        keeps at least half its time for answering.  A single change after a quiet spell goes at once."""
        if self._publish_call is None or not self._publish_call.active():
            delay = max(0.0, self._next_publish_at - self._reactor.seconds())
            self._publish_call = self._reactor.callLater(delay, self._publish)

    def _publish(self) -> None:
        self._publish_call = None
        started = time.perf_counter()  # the subscribers' real cost (the reactor's clock may be a test's)
        self._generation += 1
        changed, self._changed = self._changed, set()
        deleted, self._deleted = self._deleted, {}
        self.snapshot = Snapshot(self.prefix, self._revision, self._values.frozen(),
                                 self._generation, None if changed is None else frozenset(changed),
                                 None if changed is None else MappingProxyType(deleted))
        notify(self._subscribers, self.snapshot, what=f"snapshot subscriber of {self.prefix}")
        cost = time.perf_counter() - started
        self._next_publish_at = self._reactor.seconds() + (min(cost, MAX_PUBLISH_PAUSE)
                                                           if cost >= CHEAP_PUBLISH else 0.0)

    # -- lifecycle -----------------------------------------------------------

    def startService(self):
        super().startService()
        self._relist_call = self._reactor.callLater(self._relist_every, self._anti_entropy)
        self._loop = defer.Deferred.fromCoroutine(self._run())
        self._loop.addErrback(lambda f: f.trap(defer.CancelledError))
        self._loop.addErrback(lambda f: log.failure("watch loop of {prefix} died", f, prefix=self.prefix))

    def stopService(self):
        super().stopService()
        for call in (self._relist_call, self._back_call):
            if call is not None and call.active():
                call.cancel()
        self._interrupt()
        self._discard.stop()
        if self._publish_call is not None and self._publish_call.active():
            self._publish_call.cancel()
        loop, self._loop = self._loop, None
        return loop if loop is not None else defer.succeed(None)

    def resync(self) -> None:
        """Read the whole prefix again (SIGHUP)."""
        log.info("resync of {prefix} requested", prefix=self.prefix)
        self._must_relist = True
        self._quiet_relist = False
        self._interrupt()

    def _anti_entropy(self) -> None:
        self._relist_call = self._reactor.callLater(self._relist_every, self._anti_entropy)
        if self.status.connected and not self._must_relist:
            self._must_relist = True
            self._quiet_relist = True
            self._interrupt()

    def _interrupt(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        self._sleep.wake()

    # -- the loop ------------------------------------------------------------

    async def _run(self) -> None:
        while self.running:
            try:
                if self._must_relist:
                    await self._list()
                    continue  # stop or resync may have come while listing
                await self._follow()
            except Compacted as e:
                log.info("{prefix}: {error}; reading it again", prefix=self.prefix, error=e)
                self._must_relist = True
                self.status.relists += 1
            except EtcdUnavailable as e:
                self._lost(str(e))
                await self._sleep(self._backoff.next())
            except defer.CancelledError:
                if not self.running:
                    return
            except Exception as e:  # never let the loop die on a surprise
                log.failure("watch of {prefix} failed", prefix=self.prefix)
                self._lost(f"{type(e).__name__}: {e}")
                await self._sleep(self._backoff.next())

    async def _list(self) -> None:
        # The first read in one request: nothing is served from it yet, and start-up is faster
        # so; later ones (anti-entropy, reconnects) in pages, built and compared with what is held
        # as the pages come, the reactor free between them (networkd/etcd/reread.py).
        if self.snapshot is None:
            revision, pairs = await self._client.get_prefix(self._prefix_bytes, convert=self._pair)
            values, changed = dict(pairs), True
        else:
            held = self._values.as_dict()
            reread = ReRead(held, self._pair)
            revision, _ = await self._client.get_prefix(self._prefix_bytes, page=LIST_PAGE, sink=reread.add)
            values, changed = reread.values, reread.changed()
            self._discard.later(held if changed else values)  # the one not kept, freed in slices
            del held, reread
        if changed and self._quiet_relist:
            log.warn("{prefix}: the periodic re-read found changes the watch had not delivered", prefix=self.prefix)
        publish = changed or not self._quiet_relist
        self._quiet_relist = False
        if changed:
            self._values.replace(values)
            self._changed = None  # which keys differ is for the subscribers to find out (in chunks)
            self._deleted = {}
        del values
        self._revision = revision
        self._must_relist = False
        self._up()
        if publish:
            self._schedule_publish()

    async def _follow(self) -> None:
        self._watch = await self._client.watch_prefix(self._prefix_bytes, self._revision + 1, self._on_event)
        if not self.running or self._must_relist:
            self._watch.cancel()  # stop or resync came while the watch was being set up
        try:
            self._up()
            self._backoff.reset()
            await self._watch.done
        finally:
            self._watch = None

    def _on_event(self, event: WatchEvent) -> None:
        key = self._relative(event.key)
        if event.deleted:
            self._values.delete(key)
            self._deleted[key] = event.mod_revision
        else:
            self._values.put(key, _text(event.value))
            self._deleted.pop(key, None)
        if self._changed is not None:
            self._changed.add(key)
        self._revision = max(self._revision, event.mod_revision)
        self.status.revision = self._revision
        self.status.synced_at = self._reactor.seconds()
        self._schedule_publish()

    def _pair(self, key: bytes, value: bytes) -> tuple[str, str]:
        return self._relative(key), _text(value)

    def _relative(self, key: bytes) -> str:
        return _text(key[len(self._prefix_bytes):])

    # -- status --------------------------------------------------------------

    def _up(self) -> None:
        if self._down_since is not None and self._back_call is None:
            self._back_call = self._reactor.callLater(OUTAGE_SETTLE, self._back, self._reactor.seconds())
        was, self.status.connected = self.status.connected, True
        self.status.lost_at = None
        self.status.last_error = None
        self.status.revision = self._revision
        self.status.synced_at = self._reactor.seconds()
        if not was:
            notify(self._status_listeners, True, what=f"status listener of {self.prefix}")

    def _back(self, since: float) -> None:
        """Connected for OUTAGE_SETTLE seconds with no loss: the outage is over (one line, not one per flap)."""
        self._back_call = None
        if self.status.connected and self._down_since is not None:
            log.info("etcd is back for {prefix} at revision {rev} after {s:.1f}s", prefix=self.prefix,
                     rev=self._revision, s=since - self._down_since)
            self._down_since = None

    def _lost(self, error: str) -> None:
        if self._back_call is not None and self._back_call.active():
            self._back_call.cancel()
        self._back_call = None
        if self._down_since is None:
            log.warn("etcd watch of {prefix} lost: {error}; keeping the last snapshot",
                     prefix=self.prefix, error=error)
            self._down_since = self._reactor.seconds()
        if self.status.connected or self.status.lost_at is None:
            self.status.lost_at = self._reactor.seconds()
            self.status.reconnects += 1
        was, self.status.connected = self.status.connected, False
        self.status.last_error = error
        if was:
            notify(self._status_listeners, False, what=f"status listener of {self.prefix}")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")
