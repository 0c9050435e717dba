"""What happened to each VIP on this node, for /v1/vips and /metrics (issue 11, item 6).

The last transitions of each VIP with their reasons, counts of transitions
by event and kind of reason, and for how long each floating VIP had no
holder at all (as this node saw the lock snapshots).
"""

from __future__ import annotations

import time
from collections import Counter, deque

HISTORY = 10  # transitions kept per VIP


def reason_kind(event: str, reason: str) -> str:
    """A reason without its details (error texts, lease ids): a bounded label for /metrics."""
    if reason.startswith("lock held"):
        return "lock held"
    if reason.startswith("unhealthy here") or event == "unhealthy":
        return "unhealthy"
    if event == "healthy":
        return "healthy"
    return reason.split(":")[0].split(" (")[0].strip()[:60] or "-"


class VipHistory:
    def __init__(self, clock, wall=time.time):
        self._clock, self._wall = clock, wall
        self.events: dict[str, deque] = {}
        self.counts: Counter = Counter()  # (event, kind) -> transitions here
        self.unheld: dict[str, float] = {}  # ip -> seconds without a holder, finished periods
        self._unheld_since: dict[str, float] = {}
        self.since: dict[str, float] = {}  # ip -> wall time of its last transition here

    def record(self, event: str, ip: str, reason: str) -> None:
        now = self._wall()
        self.events.setdefault(ip, deque(maxlen=HISTORY)).append((now, event, reason))
        self.counts[(event, reason_kind(event, reason))] += 1
        if event in ("acquired", "released", "fenced"):
            self.since[ip] = now

    def observe(self, floating_ips, holders) -> None:
        """The lock snapshot as a pass sees it: start or end each VIP's period without a holder."""
        now = self._clock()
        ips = set(floating_ips)
        for ip in ips:
            if holders.get(ip):
                start = self._unheld_since.pop(ip, None)
                if start is not None:
                    self.unheld[ip] = self.unheld.get(ip, 0.0) + now - start
            else:
                self._unheld_since.setdefault(ip, now)
        for ip in set(self._unheld_since) - ips:
            del self._unheld_since[ip]

    def unheld_seconds(self) -> dict[str, float]:
        now = self._clock()
        out = dict(self.unheld)
        for ip, start in self._unheld_since.items():
            out[ip] = out.get(ip, 0.0) + now - start
        return out

    def recent(self, ip: str) -> list[dict]:
        return [{"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)), "event": e, "reason": r}
                for t, e, r in self.events.get(ip, ())]
