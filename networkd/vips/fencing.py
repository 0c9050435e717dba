"""When the VIP manager must drop its VIPs, and what it may hold until then (docs/design.md, "VIP safety").

The lease deadline (the newest acknowledged keep-alive's send time + TTL -
margin), moved by the peer-confirmed failsafe (networkd.peers.failsafe)
while etcd is away.  A mixin of networkd.vips.reconciler.VipManager, whose
state it reads: kept apart so that the safety rules read in one place.
"""

from __future__ import annotations

from twisted.logger import Logger

from networkd.vips.addresses import Justification

log = Logger()


class Fencing:
    """fenced(), deadline(), the address justification and active(): the lease's rules, moved by the failsafe."""

    def _lease_fenced(self) -> bool:
        """True while we may not be sure etcd still keeps our lease alive."""
        age = self._session.ack_age()
        return self._session.lease is None or age is None or age >= self.ttl - self.margin

    def _lease_deadline(self) -> float | None:
        """When our addresses must be gone: the lease may expire on etcd ``margin`` later."""
        last_ack = self._session.last_ack
        return None if last_ack is None else last_ack + self.ttl - self.margin

    def fenced(self) -> bool:
        """Neither the lease nor the peers' promises (networkd.peers.failsafe) cover our VIPs."""
        return self._lease_fenced() and self.failsafe.covering() is None

    def deadline(self) -> float | None:
        return self.failsafe.deadline_with(self._lease_deadline())

    def _justification(self) -> Justification:
        """Asked by the address keeper right before it adds or renews anything."""
        lease = self._session.lease
        if self.stopping or not self.host_ready or self.fenced():
            return Justification(None, lambda ip: False)
        active, holders, revision = self._active_ips, self.inputs.holders, self.inputs.locks_revision
        by_lock = lease is not None and not self._lease_fenced()
        kept, blocked = self.failsafe.kept(holders), self.failsafe.promises.blocked()
        only = self.failsafe.past_lease(self._lease_deadline())  # a deadline past the lease covers these alone

        def may_hold(ip: str) -> bool:
            if ip not in active or ip in blocked or (only is not None and ip not in only):
                return False
            return ip in kept or by_lock and self.locks.may_hold(ip, lease, holders, revision)
        covering = self.failsafe.covering()  # kept VIPs were placed under it: the promises cover them till then
        return Justification(self.deadline(), may_hold, lambda ip: covering if ip in kept else None)

    def _arm_fence(self) -> None:
        """Fence right at the deadline (no polling: the keeper drops the addresses by then anyway)."""
        deadline = self.deadline()
        if deadline is None:
            return
        delay = max(0.0, deadline - self._clock()) + 0.001
        if self._fence_call is not None and self._fence_call.active():
            self._fence_call.reset(delay)
        else:
            self._fence_call = self._reactor.callLater(delay, self._fence)

    def _failsafe_moved(self) -> None:
        self.keeper.pass_now()
        self._arm_fence()
        self.kick()

    def active(self) -> frozenset[str]:
        """Floating VIPs that should be on this host now: held, not fenced, not leaving, container here."""
        if self.stopping or not self.host_ready or self.fenced():
            return frozenset()
        kept = self.failsafe.kept(self.inputs.holders)  # under promises: exactly what we held when etcd left
        held = frozenset() if self.failsafe.outage() or self._lease_fenced() else self.locks.held()
        return kept | frozenset(ip for ip in self.wants.placeable() if ip in held and not self.locks.releasing(ip))

    def _fence(self) -> None:
        if not self.fenced():
            return
        self.failsafe.fenced()
        configs = self.inputs.configs
        if not self.addresses and not self.host.floating_rules(lambda k: k in configs and not configs[k].floating):
            return
        if self.fenced_since is None:
            self.fenced_since = self._reactor.seconds()
            self.fencings += 1
            age = self._session.ack_age()
            log.warn("fencing: no keep-alive acknowledged for {age}; dropping VIPs {ips}",
                     age="ever" if age is None else f"{age:.2f}s", ips=", ".join(sorted(self.addresses)) or "-")
        self._active_ips = frozenset()
        self.host.fence()
