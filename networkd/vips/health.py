"""This node's health for each floating VIP it could carry (issue 11): its probes, memoized per snapshot.

The VIP manager calls ``sync()`` on every pass; the targets are derived again
only when the configs or the pod groups changed (networkd.vips.wants), and
only for floating VIPs whose container is on this node.  ``local(ip)``:
True (every target up, or nothing to probe), False (a target is down), None
(undecided: not yet ``rise`` successes nor ``fall`` failures).

Placement (item 3): our members value lists the VIPs we are a healthy
candidate for (``sync`` rewrites it when that changes); ``plan()`` runs the
planner with every node's published health and our own, and starts a
hold-down for a VIP we release for ill health, so it does not flap back:
while another candidate is healthy we neither contest it (but after the
campaign grace, if nobody did) nor say we are healthy for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from networkd.vips.planner import (
    UNHEALTHY, CandidateHealth, FloatingPlan, every_of, local_container, member_value, nodes_running, plan_floating,
)
from networkd.vips.probes import Prober, Target, targets_of

HOLD_DOWN = 10.0  # seconds a VIP lost for ill health is contested only if no other healthy candidate takes it
# Seconds after a floating VIP appears here during which a rival that does not list it as healthy counts as
# healthy: it has not had the time to say (its members value is rewritten after its own pass). Without it,
# the first node through a burst of new configs saw no healthy rival and took all of them at once (20 nodes,
# 200 VIPs, probes off: one node took 70-150; balance then moved them one by one for 10-20 s).
FRESH = 2.0
# Besides, for as long as this, a rival whose healthy list has not changed here since a VIP appeared counts
# as a healthy candidate when free VIPs are shared out (CandidateHealth.may_be_ok): it has not said yet, as
# far as we can see (our view of the members values may lag a burst by more than FRESH).  Bounded, so that a
# rival that never says (unhealthy from the start) stops counting.
UNSAID_MAX = 10.0


@dataclass(frozen=True)
class ProbeSettings:
    interval: float = 1.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3


def probe_settings(options) -> ProbeSettings | None:
    """From the command line (networkd.options); None with ``--vip-probe off``."""
    if options["vip-probe"] != "on":
        return None
    return ProbeSettings(options["vip-probe-interval"], options["vip-probe-timeout"],
                         options["vip-probe-rise"], options["vip-probe-fall"])


class VipHealth:
    def __init__(self, reactor, inputs, wants, locks, hostname: str, node_ip: str | None,
                 settings: ProbeSettings | None, changed: Callable[[], None]):
        self._reactor, self._inputs, self._wants, self._locks = reactor, inputs, wants, locks
        self._hostname, self._node_ip, self._changed = hostname, node_ip, changed
        self.peer: str | None = None  # our peer channel "ip:port", published when the failsafe is on
        self.settings = settings
        self.prober = None if settings is None else Prober(
            reactor, interval=settings.interval, timeout=settings.timeout, rise=settings.rise, fall=settings.fall,
            changed=self._probe_changed)
        self.targets: dict[str, tuple[Target, ...]] = {}  # floating VIP ip -> what is probed for it here
        self.healthy: frozenset[str] = frozenset()  # what our members value says
        self.hold_down: dict[str, float] = {}  # ip -> until when (reactor seconds)
        self.first_seen: dict[str, float] = {}  # floating VIP placeable here -> when it appeared (reactor seconds)
        self.heard: dict[str, float] = {}  # member -> when its healthy list last changed as we see it
        self._heard_from: Mapping[str, frozenset[str] | None] = {}  # the members' healthy lists behind ``heard``
        self.notes: dict[str, str] = {}  # ip -> why the placement is what it is (for the API)
        self._memo: tuple = (None, None)
        self._dirty = True
        self._verdicts: dict[str, bool] = {}  # the last decided verdict per VIP, for on_verdict
        self.on_verdict: Callable[[str, bool, str | None], None] = lambda ip, healthy, why: None
        self.ready: Callable[[], bool | None] = lambda: None  # for our members value (networkd.vips.readiness)
        locks.presence_value = self.presence

    def _probe_changed(self) -> None:
        self._dirty = True
        self._changed()

    def presence(self) -> str:
        return member_value(self._node_ip, self.healthy, self.ready(), self.peer)

    def sync(self) -> None:
        """Probe the targets of the floating VIPs placeable here; publish what we are healthy for."""
        inputs = self._inputs
        if not (self._memo[0] is inputs.configs and self._memo[1] is inputs.containers):
            targets = {}
            placeable = self._wants.placeable()
            for config in inputs.configs.values():
                if config.floating and config.ip in placeable:
                    container = local_container(config, inputs.containers, self._hostname)
                    targets[config.ip] = targets_of(config, container) if self.prober is not None else ()
            self.targets = targets
            now = self._reactor.seconds()
            self.first_seen = {ip: self.first_seen.get(ip, now) for ip in targets}
            if self.prober is not None:
                self.prober.track(t for ts in targets.values() for t in ts)
            self._memo, self._dirty = (inputs.configs, inputs.containers), True
        if self._dirty:
            self._dirty = False
            self._report()
            self._publish()

    def _publish(self) -> None:
        """Our members value: the VIPs we are a healthy candidate for, less those in hold-down while another
        candidate is healthy (so nobody rebalances one back to us before its hold-down ends)."""
        healthy = frozenset(ip for ip in self.targets if self.local(ip) is True
                            and not (ip in self.hold_down and self._other_healthy(ip)))
        if healthy != self.healthy:
            self.healthy = healthy
            self._locks.refresh_presence()

    def _other_healthy(self, ip: str) -> bool:
        inputs = self._inputs
        config = inputs.configs.get(ip)
        if config is None:
            return False
        health = CandidateHealth(inputs.member_health)
        return any(n != self._hostname and n in inputs.members and health.ok(n, ip)
                   for n in nodes_running(config, inputs.containers))

    def _report(self) -> None:
        """Each VIP whose decided verdict changed (up <-> down) goes to ``on_verdict``."""
        verdicts = {}
        for ip in self.targets:
            verdict = self.local(ip)
            verdict = self._verdicts.get(ip) if verdict is None else verdict
            if verdict is not None:
                verdicts[ip] = verdict
                if self._verdicts.get(ip, True) != verdict:
                    self.on_verdict(ip, verdict, self.why(ip))
        self._verdicts = verdicts

    def _listen(self, published: Mapping[str, frozenset[str] | None], now: float) -> None:
        """Note when each member's healthy list changed, as we see it (a new member: now)."""
        if published is self._heard_from:
            return
        before, self._heard_from = self._heard_from, published
        self.heard = {n: self.heard[n] if n in self.heard and before.get(n, ()) == healthy else now
                      for n, healthy in published.items()}

    def plan(self, held: frozenset[str], settled: frozenset[str] | None = None,
             unready: frozenset[str] = frozenset(), *, floating=None, wanted=None) -> FloatingPlan:
        """The planner's answer with every candidate's health and readiness (networkd.vips.readiness);
        hold-downs start for VIPs we release for ill health."""
        inputs, now = self._inputs, self._reactor.seconds()
        held_down = bool(self.hold_down)
        self.hold_down = {ip: until for ip, until in self.hold_down.items() if until > now}
        mine = {ip: self.local(ip) for ip in self.targets}
        unsaid = {ip: seen for ip, seen in self.first_seen.items() if now - seen < UNSAID_MAX}
        fresh = frozenset(ip for ip, seen in unsaid.items() if now - seen < FRESH)
        self._listen(inputs.member_health, now)
        health = CandidateHealth(inputs.member_health, mine, frozenset(self.hold_down), fresh, unsaid, self.heard)
        plan = plan_floating(inputs.configs, inputs.containers, self._hostname, inputs.holders, inputs.members,
                             held, health, settled, unready, floating, wanted)
        self.notes = {}
        for ip in plan.release:
            if plan.reasons.get(ip) == UNHEALTHY:
                plan.reasons[ip] = f"unhealthy here ({self.why(ip) or 'probe down'}); a healthy candidate takes it"
                self.hold_down[ip] = now + HOLD_DOWN
        for ip in plan.keep:
            if mine.get(ip) is False:
                self.notes[ip] = f"unhealthy here ({self.why(ip)}), but no candidate is healthy: keeping it"
        for ip in plan.campaign_later & self.hold_down.keys():
            self.notes[ip] = "hold-down after ill health: contested only if no other candidate takes it"
        if held_down or self.hold_down:
            self._publish()
        return plan

    def local(self, ip: str) -> bool | None:
        """This node's probe verdict for ``ip`` (True when nothing is probed)."""
        if self.prober is None:
            return True
        verdicts = [self.prober.up(t) for t in self.targets.get(ip, ())]
        if False in verdicts:
            return False
        return None if None in verdicts else True

    def why(self, ip: str) -> str | None:
        """The last error of a down target of ``ip``, for the log and the API."""
        if self.prober is None:
            return None
        for target in self.targets.get(ip, ()):
            state = self.prober.states.get(target)
            if state is not None and state.up is False:
                return f"probe {target}: {state.last_error}"
        return None

    def status(self, ip: str) -> dict:
        """For /v1/vips: our verdict, the probe's last error, why the placement is what it is."""
        verdict = self.local(ip)
        until = self.hold_down.get(ip, 0.0) - self._reactor.seconds()
        return {"here": {True: "healthy", False: "unhealthy", None: "undecided"}[verdict],
                "probes": [str(t) for t in self.targets.get(ip, ())] if self.prober is not None else "off",
                "error": self.why(ip), "note": self.notes.get(ip), "hold_down": round(until, 1) if until > 0 else None}

    def candidates(self, config) -> list[dict]:
        """For /v1/vips: every node with a pod of ``config``'s proc, deployd's word on each pod, whether its
        daemon is live, and its health (ours from the probes, the others' from their members values)."""
        inputs, ip = self._inputs, config.ip
        nodes: dict[str, list] = {}
        for c in every_of(inputs.containers, config.app, config.proc):  # not a walk of every container per VIP
            nodes.setdefault(c.node_name, []).append(
                {"instance": c.instance, "state": c.state, "health": c.health, "running": c.candidate})
        out = []
        for node, pods in sorted(nodes.items()):
            live = node in inputs.members or node == self._hostname
            if node == self._hostname:
                health, why = {True: "healthy", False: "unhealthy", None: "undecided"}[self.local(ip)], self.why(ip)
            elif not live:
                health, why = None, "no live networkd"
            else:
                published = inputs.member_health.get(node)
                health = "healthy" if published is None or ip in published else "not healthy"
                why = "an older networkd: says nothing of health" if published is None else None
            out.append({"node": node, "pods": pods, "excluded": config.excludes(node), "live": live,
                        "candidate": live and not config.excludes(node) and any(p["running"] for p in pods),
                        "health": health, "why": why})
        return out

    def stop(self) -> None:
        if self.prober is not None:
            self.prober.stop()
        self._memo = (None, None)
