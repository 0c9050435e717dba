"""How often the guardian may rewrite: at most ``burst`` times per sliding ``window``.

A tool that keeps undoing our line (a DHCP client, NetworkManager) would
otherwise be fought in a tight loop; limited, both sides settle and the
guardian names the other writer in the log instead.
"""

from __future__ import annotations

import collections


class RewriteLimit:
    """A sliding-window count of rewrites on the reactor's clock."""

    def __init__(self, clock, burst: int = 5, window: float = 10.0):
        self._clock = clock
        self.burst = burst
        self.window = window
        self._recent: collections.deque[float] = collections.deque()
        self._warned_at: float | None = None

    def wait(self) -> float:
        """Seconds until one more rewrite is allowed (0: now)."""
        now = self._clock.seconds()
        while self._recent and self._recent[0] <= now - self.window:
            self._recent.popleft()
        if len(self._recent) < self.burst:
            return 0.0
        return self._recent[0] + self.window - now

    def record(self) -> None:
        """A rewrite happened now."""
        self._recent.append(self._clock.seconds())

    @property
    def recent(self) -> int:
        """Rewrites in the window at the last ``wait()``."""
        return len(self._recent)

    def warn_now(self) -> bool:
        """True at most once per window: when to say again that we are being held back."""
        now = self._clock.seconds()
        if self._warned_at is not None and now - self._warned_at < self.window:
            return False
        self._warned_at = now
        return True
