"""What happened to each VIP, for /v1/vips and /metrics (issue 11 item 6, issue 10 item 5).

On this node: the last transitions of each VIP with their reasons, counts of
transitions by event and kind of reason.  In the cluster, as this node saw
the lock snapshots (so also for VIPs held elsewhere): each floating VIP's
holder and since when, how often its holder changed, and for how long in
total it had no holder at all.
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
        self.holders: dict[str, tuple[str | None, float]] = {}  # ip -> (holder or None, wall time since seen so)
        self.holder_changes: Counter = Counter()  # ip -> changes of holder seen (to and from none included)

    def record(self, event: str, ip: str, reason: str) -> None:
        now = self._wall()
        self.events.setdefault(ip, deque(maxlen=HISTORY)).append((now, event, reason))
        self.counts[(event, reason_kind(event, reason))] += 1
        if event in ("acquired", "released", "fenced"):
            self.since[ip] = now

    def observe(self, floating_ips, holders) -> None:
        """Each new config or lock snapshot: note holder changes, start or end periods without a holder."""
        now, wall = self._clock(), self._wall()
        ips = set(floating_ips)
        for ip in ips:
            holder, seen = holders.get(ip) or None, self.holders.get(ip)
            if seen is None or seen[0] != holder:
                if seen is not None:
                    self.holder_changes[ip] += 1
                self.holders[ip] = (holder, wall)
            if holder:
                start = self._unheld_since.pop(ip, None)
                if start is not None:
                    self.unheld[ip] = self.unheld.get(ip, 0.0) + now - start
            else:
                self._unheld_since.setdefault(ip, now)
        for ip in set(self._unheld_since) - ips:
            del self._unheld_since[ip]
        for ip in set(self.holders) - ips:
            del self.holders[ip]

    def unheld_seconds(self) -> dict[str, float]:
        """Every floating VIP (0 if it never lacked a holder), and those gone since with their past."""
        now = self._clock()
        out = {ip: 0.0 for ip in self.holders}
        out.update(self.unheld)
        for ip, start in self._unheld_since.items():
            out[ip] = out.get(ip, 0.0) + now - start
        return out

    def recent(self, ip: str) -> list[dict]:
        return [{"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)), "event": e, "reason": r}
                for t, e, r in self.events.get(ip, ())]
