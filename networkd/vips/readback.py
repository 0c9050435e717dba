"""A share of one CPU for read-backs (addresses, our iptables chains), with room for a burst.

Read-backs guard against others changing what we wrote; they must never cost
more than a small share of a CPU, even when a firewall manager changes the nat
table all the time.  A plain "next one no sooner than cost / share" delays the
read-back right after start-up's own, on a loaded host by a second or more; a
bucket lets a few through at once (a flush seconds after start-up is undone at
once) and holds the long-run average to ``share``.
"""

from __future__ import annotations

from typing import Callable


class ReadBackBudget:
    """``due()``: the earliest time the next read-back fits; ``spent(at, took)`` after each one."""

    def __init__(self, clock: Callable[[], float], share: float, burst: float):
        self._clock = clock
        self._share = share  # seconds of read-back per second
        self._burst = burst  # seconds of read-back that may be spent at once
        self._credit = burst
        self._at = clock()

    def _refill(self, now: float) -> None:
        self._credit = min(self._burst, self._credit + (now - self._at) * self._share)
        self._at = max(self._at, now)

    def due(self) -> float:
        """When the credit is back to zero (in the past if it is above zero now)."""
        self._refill(self._clock())
        return self._at - self._credit / self._share

    def spent(self, started: float, took: float) -> None:
        """A read-back that started at ``started`` took ``took`` seconds."""
        self._refill(started)
        self._credit -= took
