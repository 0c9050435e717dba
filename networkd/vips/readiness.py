"""Rebalancing without gaps (issue 10, item 3): may we receive a VIP, and which member may be handed one.

Ours: our members value says ``"ready": true`` only while our lock-prefix
watch is live (we would see a released lock at once), our inputs are complete
and we are not fenced (we would contest it at once).  A node back from a
partition writes its members key as soon as a keep-alive gets through, its
watch comes back later: until then it says "not ready", and nobody hands it
a VIP it could not take (the lock went back and forth, unheld for seconds).

Theirs: since when each member has said "ready" without a break, as our lock
snapshots show it.  Only one ready for ``READY_HOLD`` is handed a VIP for
balance (networkd.vips.planner), so a node that just came back draws no burst
of moves and one that flaps draws none.  A value without the field (an older
daemon) counts as ready all along, as before.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

# Seconds a member must have said "ready" without a break before a VIP is released towards it: a node
# whose watch or lease comes and goes within seconds (a flaky link) is handed nothing, and one back from
# a partition settles its other watches and passes first; yet short next to the 10 s in which counts
# must be balanced again (measured: 3.0-4.0 s after a heal).
READY_HOLD = 2.0


class Readiness:
    def __init__(self, reactor, clock: Callable[[], float], watcher, inputs, fenced: Callable[[], bool],
                 locks, health, changed: Callable[[], None]):
        """``watcher``: the lock prefix's; ``locks``: its members value is rewritten through
        ``refresh_presence``; ``health`` builds that value (networkd.vips.health.presence)."""
        self._reactor, self._clock, self._inputs = reactor, clock, inputs
        self._fenced, self._refresh, self._changed = fenced, locks.refresh_presence, changed
        health.ready = self.value
        self._status = getattr(watcher, "status", None)  # a test's fake watcher has none: always live
        if hasattr(watcher, "on_status"):
            watcher.on_status(lambda connected: changed())
        self.published: bool | None = None  # what our members value says
        self.since: dict[str, float] = {}  # member -> since when it says ready (our clock; -inf: an older daemon)
        self.timer = None
        self._timer_at: float | None = None  # when ``timer`` fires (our clock)
        self.holding_off: Callable[[], bool] = lambda: False  # a start-up hold-off or a promise: we would not contest
        self.holding_off_until: Callable[[], float | None] = lambda: None  # when that ends (our clock)

    def watching(self) -> bool:
        """Whether our lock-prefix watch is live (else our lock snapshot is the last one it gave: stale)."""
        return self._status is None or self._status.connected

    def ready(self) -> bool:
        """Whether we can take a VIP handed to us now."""
        return self.watching() and self._inputs.complete and not self._fenced() and not self.holding_off()

    def blind(self, plan):
        """The plan, less what a stale lock snapshot cannot justify while our lock watch is down: no contest
        (the VIPs it shows free were mostly taken since: 20 daemons on 2 cores whose etcd connections
        dropped under a burst sent ~2,000 such requests, which kept etcd too busy to answer keep-alives)
        and no release for balance (the counts are old).  Releases for other reasons (config deleted, no
        local container...) do not come from the lock snapshot: they stay, and so do the failsafe's retakes
        (applied after this)."""
        if self.watching():
            return plan
        release = frozenset(ip for ip in plan.release if not plan.reasons.get(ip, "").startswith("rebalancing"))
        return dataclasses.replace(plan, campaign_now=frozenset(), campaign_later=frozenset(), dealt=frozenset(),
                                   release=release, keep=plan.keep | (plan.release - release))

    def value(self) -> bool:
        """For our members value (networkd.vips.health.presence): remembered, so ``sync`` sees a change."""
        self.published = self.ready()
        return self.published

    def sync(self) -> None:
        """Each pass: our members value rewritten if our readiness changed; the members' observed."""
        if self.ready() != self.published:
            self._refresh()
        now = self._clock()
        since = {}
        for name, says in self._inputs.member_ready.items():
            if says is None:
                since[name] = float("-inf")
            elif says:
                since[name] = self.since.get(name, now)
        self.since = since
        # A pass once a member has settled, and once our own hold-off ends (else we would say "not ready"
        # until the next full pass, up to its anti-entropy period later).
        pending = [s + READY_HOLD for s in since.values() if s + READY_HOLD > now]
        until = self.holding_off_until() if self.published is False else None
        if until is not None and until > now:
            pending.append(until)
        if pending:
            self._wake_at(min(pending) + 0.01, now)

    def _wake_at(self, at: float, now: float) -> None:
        """One timer, at the earliest moment asked for."""
        if self.timer is not None and self.timer.active():
            if self._timer_at is not None and self._timer_at <= at:
                return
            self.timer.cancel()
        self._timer_at = at
        self.timer = self._reactor.callLater(max(0.0, at - now), self._changed)

    def receivers(self) -> tuple[frozenset[str], frozenset[str]]:
        """(settled, unready): for the planner (networkd.vips.planner.plan_floating)."""
        return self.settled(), self.unready()

    def settled(self) -> frozenset[str]:
        """Members ready for at least READY_HOLD: they may be handed a VIP for balance."""
        now = self._clock()
        return frozenset(n for n, s in self.since.items() if now - s >= READY_HOLD)

    def unready(self) -> frozenset[str]:
        """Members that say they cannot take a VIP now: no rival for one."""
        return frozenset(n for n, says in self._inputs.member_ready.items() if says is False)
