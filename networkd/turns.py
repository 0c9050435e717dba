"""How long the reactor's turns take, measured in the daemon itself.

Every DNS query, API request and timer waits for the turn in progress: a
turn is what the event loop runs between two waits in ``epoll``.  Benches
measured the longest one in-process on copies of the parts; this measures it
in the running daemon, so an operator (``/metrics``) and the benches
(``bench/scale.py``) see the stalls the node really had.

The loop's ``selector.select`` is wrapped: a turn lasts from one return of
``select`` to the next call of it.  That is wall time, so it also counts
the time the host did not run us (a starved node shows too, which is what a
waiting query sees).  The cost is two ``perf_counter`` reads and a short
compare per turn; only turns of at least ``FLOOR`` go through the bucket
search.  A turn of ``WARN_AFTER`` or more is logged (at most one line per
``WARN_EVERY`` seconds, with the number of such turns since the last line).
"""

from __future__ import annotations

import bisect
import time
from typing import Callable

from twisted.logger import Logger

log = Logger()

BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, float("inf"))  # upper bounds, seconds
FLOOR = BUCKETS[0]  # turns shorter than this are only counted
WARN_AFTER = 1.0  # seconds: DNS clients commonly retry after 1-2 s
WARN_EVERY = 60.0


class TurnMeter:
    """Counts of turns by length (cumulative per ``BUCKETS`` bound when read), their sum, the longest."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self.counts = [0] * len(BUCKETS)  # per bucket, not cumulative
        self.total = 0.0  # seconds in all turns
        self.longest = 0.0
        # The end of the last wait: the start of the turn running now.  Until the loop first waits, what
        # runs is the daemon being set up before the reactor starts, no turn anything waits for.
        self._returned: float | None = None
        self._slow = 0  # turns over WARN_AFTER since the last warning
        self._warned_at = float("-inf")

    def wrap(self, select: Callable) -> Callable:
        """``select`` timed: the turn before each call is recorded."""
        clock, counts = self._clock, self.counts

        def timed_select(timeout=None):
            returned = self._returned
            if returned is not None:
                turn = clock() - returned
                if turn < FLOOR:
                    counts[0] += 1
                    self.total += turn
                else:
                    self.record(turn)
            events = select(timeout)
            self._returned = clock()
            return events

        return timed_select

    def record(self, turn: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, turn)] += 1
        self.total += turn
        if turn > self.longest:
            self.longest = turn
        if turn >= WARN_AFTER:
            self._slow += 1
            now = self._clock()
            if now - self._warned_at >= WARN_EVERY:
                log.warn("the reactor ran one turn for {s:.2f}s (DNS queries, API requests and timers waited that "
                         "long; {n} such turn(s) since the last line): a starved host or a blocking call",
                         s=turn, n=self._slow)
                self._slow, self._warned_at = 0, now

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, turns up to it) per bucket, as a Prometheus histogram has them."""
        running, out = 0, []
        for bound, count in zip(BUCKETS, self.counts):
            running += count
            out.append((bound, running))
        return out


def meter_turns(reactor, meter: TurnMeter | None = None) -> TurnMeter | None:
    """Time the turns of the asyncio ``reactor``'s loop (once; None if it has no selector to wrap)."""
    existing = getattr(reactor, "turn_meter", None)
    if existing is not None:
        return existing
    selector = getattr(getattr(reactor, "_asyncioEventloop", None), "_selector", None)
    if selector is None or not hasattr(selector, "select"):
        return None
    meter = meter or TurnMeter()
    selector.select = meter.wrap(selector.select)
    reactor.turn_meter = meter
    return meter
