"""Pacing on the reactor's clock: backoff, pauses a stop can cut short, guarded periodic tasks."""

from __future__ import annotations

import random

from twisted.internet import defer, task
from twisted.logger import Logger

_log = Logger()


class Backoff:
    """Delays of ``initial * factor**n`` seconds, capped at ``maximum``, with +-20 % jitter."""

    def __init__(self, initial: float = 0.2, maximum: float = 5.0, factor: float = 2.0, rng=random.random):
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self._rng = rng
        self._attempt = 0

    def next(self) -> float:
        delay = min(self.maximum, self.initial * self.factor ** self._attempt)
        self._attempt += 1
        return delay * (0.8 + 0.4 * self._rng())

    def reset(self) -> None:
        self._attempt = 0


class Pause:
    """A wait on the reactor's clock that ``wake()`` cuts short (stop, resync)."""

    def __init__(self, reactor):
        self._reactor = reactor
        self._waiting = None

    async def __call__(self, seconds: float) -> None:
        self._waiting = task.deferLater(self._reactor, seconds, lambda: None)
        try:
            await self._waiting
        except defer.CancelledError:
            pass
        finally:
            self._waiting = None

    def wake(self) -> None:
        if self._waiting is not None:
            self._waiting.cancel()


def every(reactor, interval: float, function, what: str) -> task.LoopingCall:
    """Run ``function`` every ``interval`` seconds on ``reactor``'s clock.

    The tick catches its own errors: one exception must not end the loop.
    """
    def guarded():
        try:
            function()
        except Exception:
            _log.failure("periodic task {what} failed", what=what)

    loop = task.LoopingCall(guarded)
    loop.clock = reactor
    loop.start(interval, now=False)
    return loop
