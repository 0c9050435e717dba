"""Lock requests, a bounded number in flight; their failures summed up, never one line per VIP.

A burst of VIP configs (1,000 written at once) used to send 1,000 lock
transactions at once.  The keep-alive waited behind them and timed out, the
connection was dropped, every call on it was cancelled, and each VIP logged a
warning of its own, often with an empty text, pass after pass.  Here at most
``MAX_IN_FLIGHT`` requests are out; the others wait their turn in order (one
no longer wanted when its turn comes is not sent), and failures become one
line per reason every ``SUMMARY_EVERY`` seconds.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

# Lock transactions out at once.  bench/hold.py, 1,000 local VIP configs in one burst, on the shared host:
# unbounded, 4 runs of 5 had the keep-alive time out behind the burst (connection dropped, 167, 0, 12, 30
# contests cancelled), all VIPs up 1.6-2.4 s after the burst; 256, 1 run of 5; 128, none of 3, 1.7-2.2 s;
# 64, none of 4, but 2.9-4.2 s (answers trickle in, a pass each).
MAX_IN_FLIGHT = 128
SUMMARY_EVERY = 1.0  # seconds between two summaries of failed requests
NAMED = 5  # VIPs named in a summary line


def describe(error, endpoint=None) -> str:
    """What went wrong, never empty: the text, else the type (and where, when known)."""
    e = error.value if isinstance(error, Failure) else error
    if isinstance(e, defer.TimeoutError) and e.args and isinstance(e.args[0], (int, float)):
        text = f"no answer within {e.args[0]:g}s"
    elif isinstance(e, defer.CancelledError) and not str(e).strip():
        text = "the call was cancelled"
    else:
        text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    if text:
        return text
    return f"{type(e).__name__} from etcd {endpoint}" if endpoint else type(e).__name__


class Throttle:
    """At most ``limit`` calls in flight, keyed by VIP; the others wait in arrival order."""

    def __init__(self, limit: int = MAX_IN_FLIGHT):
        self.limit = limit
        self.running = 0
        self.waiting: dict[str, Callable[[], defer.Deferred | None]] = {}
        self._pumping = False

    def submit(self, ip: str, start: Callable[[], defer.Deferred | None]) -> None:
        """``start()`` sends the call when a slot is free (None: nothing to send any more)."""
        self.waiting[ip] = start
        self._pump()

    def drop_waiting(self, keep: Callable[[str], bool]) -> list[str]:
        """Forget the waiting calls of VIPs ``keep`` says no to (the newest plan wins)."""
        dropped = [ip for ip in self.waiting if not keep(ip)]
        for ip in dropped:
            del self.waiting[ip]
        return dropped

    def _pump(self) -> None:
        if self._pumping:  # an answer that came at once, inside start(): the loop below goes on
            return
        self._pumping = True
        try:
            while self.running < self.limit and self.waiting:
                ip = next(iter(self.waiting))
                start = self.waiting.pop(ip)
                self.running += 1
                sent = start()
                if sent is None:
                    self.running -= 1
                else:
                    sent.addBoth(self._done)
        finally:
            self._pumping = False

    def _done(self, result):
        self.running -= 1
        self._pump()
        return result


class FailureSummary:
    """Failed requests, logged as one line per reason every ``every`` seconds."""

    def __init__(self, reactor, what: str, every: float = SUMMARY_EVERY):
        self._reactor = reactor
        self._what = what  # e.g. "contest"
        self._every = every
        self._failed: dict[str, dict[str, None]] = {}  # reason -> IPs, in order
        self._call = None

    def add(self, ip: str, reason: str) -> None:
        self._failed.setdefault(reason, {})[ip] = None
        if self._call is None:
            self._call = self._reactor.callLater(self._every, self.flush)

    def flush(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        failed, self._failed = self._failed, {}
        for reason, ips in failed.items():
            names = list(ips)
            if len(names) == 1:
                log.warn("could not {what} VIP {ip}: {e}; retrying", what=self._what, ip=names[0], e=reason)
                continue
            shown = ", ".join(names[:NAMED]) + (", ..." if len(names) > NAMED else "")
            log.warn("could not {what} {n} VIPs ({ips}): {e}; retrying", what=self._what, n=len(names), ips=shown,
                     e=reason)
