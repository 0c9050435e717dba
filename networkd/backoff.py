"""Capped exponential backoff with jitter, as a small policy object."""

from __future__ import annotations

import random


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
