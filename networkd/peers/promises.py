"""The promiser side of the failsafe: what we promised other holders, and whether we may promise.

We promise (holder, VIPs, until our monotonic now + P) only while we cannot
reach etcd ourselves and have no lock request in flight, nor a lock or a
failsafe of our own, for any asked VIP (networkd.peers.failsafe; the
argument: docs/design.md, "Failsafe").  While a promise lives we neither
contest those VIPs nor add their addresses.  Promises live in memory only:
hence the start-up hold-off of the same length.
"""

from __future__ import annotations

from typing import Callable

from networkd.peers.wire import Refused


class Promises:
    def __init__(self, *, clock: Callable[[], float], hostname: str, promise: float, locks,
                 etcd_away: Callable[[], bool], keeping: Callable[[], frozenset[str]]):
        self._clock, self.hostname, self.promise, self._locks = clock, hostname, promise, locks
        self._etcd_away, self._keeping = etcd_away, keeping
        self.given: dict[tuple[str, str], float] = {}  # (holder, ip) -> until (our clock)

    def blocked(self) -> frozenset[str]:
        """VIPs we promised not to take (no campaign, no address) for now."""
        now = self._clock()
        return frozenset(ip for (_, ip), until in self.given.items() if until > now)

    def prune(self) -> None:
        now = self._clock()
        self.given = {k: until for k, until in self.given.items() if until > now}

    def request(self, message: dict) -> tuple[str, dict]:
        """A verified "promise?" -> our answer: ("promise", ...) or ("refuse", {"why": ...})."""
        holder, vips, seconds = message["from"], message.get("vips"), message.get("seconds")
        if not isinstance(vips, list) or not all(isinstance(v, str) for v in vips) or \
                not isinstance(seconds, (int, float)) or seconds <= 0:
            raise Refused("a promise request without VIPs or seconds")
        why = self._refusal(holder, vips)
        if why is not None:
            return "refuse", {"re": message["nonce"], "why": why}
        granted = min(float(seconds), self.promise)  # never past our own start-up hold-off
        until = self._clock() + granted
        for ip in vips:
            self.given[(holder, ip)] = max(until, self.given.get((holder, ip), 0.0))
        return "promise", {"re": message["nonce"], "vips": vips, "seconds": granted}

    def _refusal(self, holder: str, vips: list[str]) -> str | None:
        if holder == self.hostname:
            return "that is my own name"
        if not self._etcd_away():
            return "I can reach etcd"
        mine = self._locks.held() | self._keeping()
        for ip in vips:
            if self._locks.campaigning(ip):
                return f"I am contesting {ip}"
            if ip in mine:
                return f"I hold {ip}"
        return None

    def view(self) -> list[dict]:
        """For /v1/status: per holder, the VIPs promised and the seconds left."""
        now = self._clock()
        by_holder: dict[str, dict] = {}
        for (holder, ip), until in sorted(self.given.items()):
            if until > now:
                entry = by_holder.setdefault(holder, {"to": holder, "vips": [], "seconds_left": 0.0})
                entry["vips"].append(ip)
                entry["seconds_left"] = round(max(entry["seconds_left"], until - now), 2)
        return list(by_holder.values())
