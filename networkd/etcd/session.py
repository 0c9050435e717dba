"""The process lease: granted once, kept alive every 2/9 of the TTL, revoked on stop.

Locks borrow this lease; they never own one.  ``last_ack`` is the time
(on ``clock``, monotonic in the daemon) at which the newest *acknowledged*
keep-alive was sent, so ``clock() - last_ack`` bounds how long etcd may
already have been counting the lease down.  Self-fencing is built on that
number; a wall-clock step must not change it.
"""

from __future__ import annotations

from typing import Callable

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from networkd.backoff import Backoff, Pause
from networkd.etcd.client import EtcdUnavailable
from networkd.serial import notify

log = Logger()


class SessionExpired(Exception):
    """etcd says our lease is gone: everything attached to it is gone too."""


class Session(service.Service):
    name = "etcd session"

    def __init__(self, client, ttl: int, reactor, backoff: Backoff | None = None,
                 clock: Callable[[], float] | None = None):
        self._client = client
        self.ttl = ttl
        self._reactor = reactor
        self.clock = clock or reactor.seconds
        self._backoff = backoff or Backoff(0.05, max(0.5, ttl / 3))
        self.lease: int | None = None
        self.last_ack: float | None = None
        self.last_error: str | None = None
        self._ack_listeners: list[Callable[[int], None]] = []
        self._lost_listeners: list[Callable[[], None]] = []
        self._back_listeners: list[Callable[[float], None]] = []
        self._failing_since: float | None = None  # the first failed keep-alive since the last acknowledged one
        self._loop: defer.Deferred | None = None
        self._sleep = Pause(reactor)
        hear_late = getattr(client, "hear_late_keep_alives", None)
        if hear_late is not None:
            hear_late(self._late_answer, self.ttl)
        self.late_acks = 0  # keep-alives acknowledged after they were given up (tests, diagnostics)
        self.asked_again = 0  # keep-alives in flight given up for a member that just answered late (ditto)
        self._in_flight: defer.Deferred | None = None  # the keep-alive the loop waits for
        self._again_now = False  # that one was given up to ask again at once

    @property
    def interval(self) -> float:
        """Keep-alives go out every 2/9 of the TTL (1.5 a second at TTL 3: issue 13's etcd load at rest),
        each bounded by ``bound``, and a failed one is sent again at once elsewhere: an etcd leader
        election (0.5-1 s LAN-tuned, when no keep-alive can be answered) then ends before the fencing
        deadline (TTL - margin after the last acknowledged one) when interval + election + bound fit in it."""
        return self.ttl * 2 / 9

    @property
    def bound(self) -> float:
        """How long one keep-alive may take before it is given up and sent again (TTL/6)."""
        return self.ttl / 6

    def ack_age(self) -> float | None:
        """Seconds since the newest acknowledged keep-alive was sent (None: never)."""
        return None if self.last_ack is None else self.clock() - self.last_ack

    def on_ack(self, listener: Callable[[int], None]) -> None:
        """``listener(lease)`` after every acknowledged keep-alive (and the grant)."""
        self._ack_listeners.append(listener)

    def on_lost(self, listener: Callable[[], None]) -> None:
        """``listener()`` when etcd says the lease expired; a new one follows."""
        self._lost_listeners.append(listener)

    def on_reconnect(self, listener: Callable[[float], None]) -> None:
        """``listener(seconds)`` after the first acknowledgement that follows failed keep-alives
        (etcd answers again after an outage of about ``seconds``), right after the ack listeners."""
        self._back_listeners.append(listener)

    def startService(self):
        super().startService()
        self._loop = defer.Deferred.fromCoroutine(self._run())
        self._loop.addErrback(lambda f: f.trap(defer.CancelledError))
        self._loop.addErrback(lambda f: log.failure("etcd session loop died", f))

    def stopService(self):
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._sleep.wake()
        if self._loop is not None:
            await self._loop
        lease, self.lease = self.lease, None
        if lease is not None:
            try:
                await self._client.revoke_lease(lease, timeout=1.0)
                log.info("revoked lease {lease:x}", lease=lease)
            except Exception as e:
                log.warn("could not revoke lease {lease:x}: {e}; it expires by itself", lease=lease, e=e)

    async def _run(self) -> None:
        while self.running:
            sent = self.clock()
            try:
                if self.lease is None:
                    self.lease = await self._client.grant_lease(self.ttl)
                    log.info("granted lease {lease:x} with TTL {ttl}s", lease=self.lease, ttl=self.ttl)
                else:
                    self._in_flight = self._client.keep_alive(self.lease, timeout=self.bound)
                    try:
                        granted = await self._in_flight
                    finally:
                        self._in_flight = None
                    if granted <= 0:
                        raise SessionExpired(f"lease {self.lease:x} expired")
                self._acked(sent)
                delay = max(0.0, sent + self.interval - self.clock())
            except SessionExpired as e:
                self._expired(str(e))
                delay = 0.0
            except (EtcdUnavailable, defer.CancelledError, defer.TimeoutError) as e:
                # etcd did not answer in time, or the call was cut short (its connection dropped, a
                # deadline, our stop): an outage, logged by the connection; one line here as it starts.
                if not self.running:
                    break
                if self._again_now:  # given up for a member that just answered (``_late_answer``): at once
                    self._again_now = False
                    continue
                if self.last_error is None:
                    log.info("etcd keep-alive of lease {lease:x} not answered ({e}); sending it again",
                             lease=self.lease or 0, e=str(e) or type(e).__name__)
                self.last_error = str(e) or type(e).__name__
                self._failing_since = self._failing_since or sent
                delay = self._backoff.next()
            except Exception as e:
                log.failure("etcd keep-alive failed")
                self.last_error = f"{type(e).__name__}: {e}"
                self._failing_since = self._failing_since or sent
                delay = self._backoff.next()
            if self.running:
                await self._sleep(delay)

    def _late_answer(self, lease: int, granted: int, age: float) -> None:
        """A keep-alive given up at its bound was answered after all: in an etcd leader election a
        follower holds it until a new leader is known, and its answer is often the first to come
        back.  The lease dates from when that request was sent (``age`` seconds ago), if that is
        newer than the last acknowledgement and the lease is not already past its fencing deadline."""
        if not self.running or lease != self.lease or granted <= 0:
            return  # (a lease gone is for the keep-alive loop to find out, as it always does)
        now = self.clock()
        sent = now - age
        if self.last_ack is not None and sent <= self.last_ack:
            return
        if age >= self.ttl - fencing_margin(self.ttl):
            return  # too late to hold anything on: the next acknowledgement starts afresh
        self.late_acks += 1
        log.info("etcd answered a keep-alive of lease {lease:x} {age:.2f}s after it was sent (given up "
                 "after {bound:.1f}s): the lease dates from then", lease=lease, age=age, bound=self.bound)
        self._acked(sent)
        if self.ttl - fencing_margin(self.ttl) - age < ASK_AGAIN_BELOW and self._in_flight is not None:
            # The deadline it gives is too close for much of a whole-second address lifetime, and the
            # member that answered knows a leader now: ask it again at once (the client sends the next
            # keep-alive there) rather than wait on the request in flight, maybe at a member that does
            # not yet (an election: a 94 ms VIP lapse waiting 0.3 s for the next answer).
            self.asked_again += 1
            self._again_now = True
            self._in_flight.cancel()

    def _acked(self, sent: float) -> None:
        self.last_ack = sent
        self.last_error = None
        self._backoff.reset()
        notify(self._ack_listeners, self.lease, what="lease ack listener")
        failing_since, self._failing_since = self._failing_since, None
        if failing_since is not None:
            outage = self.clock() - failing_since
            log.info("etcd acknowledges keep-alives again after {s:.1f}s of failures", s=outage)
            notify(self._back_listeners, outage, what="etcd back listener")

    def _expired(self, why: str) -> None:
        log.warn("etcd session lost: {why}", why=why)
        self.lease = None
        self.last_ack = None
        self.last_error = why
        notify(self._lost_listeners, what="lease lost listener")


# Seconds: a late answer that leaves less than this to the fencing deadline has the keep-alive in flight
# given up and sent again at once to the member that answered (``Session._late_answer``).
ASK_AGAIN_BELOW = 1.5


def fencing_margin(ttl: float) -> float:
    """How long before the lease may expire on etcd a holder drops what it holds on it (VIPs)."""
    return max(0.5, ttl / 4)
