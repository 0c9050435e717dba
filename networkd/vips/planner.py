"""What this node should do about each VIP, from the snapshots: pure functions.

Inputs are the parsed configs, the containers of every pod group, the lock
holders and the live members (both from the lock prefix), and the VIPs this
process holds.  Nothing here does I/O, so every rule is table-tested.

Balance ([BUG 14], [BUG 15]): the floating VIPs of one app/proc spread over
the live nodes running it.  A free VIP is contested at once by a node that
holds no more of that proc's VIPs than any other eligible live node (when
several free VIPs have several such nodes, each contests only its share at
once: networkd.vips.spread); the others wait (``campaign_later``) so the
least loaded node wins, yet still take it if nobody did.  A node holding two more than some eligible live
node releases one VIP cleanly (address and rules first, then the lock),
one at a time and only while no VIP of the proc is waiting for a holder.

Rebalancing without gaps (issue 10): a node whose members value says it is
not ready to receive a VIP (its lock watch is down, it is fenced...) is no
rival at all: it could not take what we hand it.  A VIP is released for
balance only when every least loaded rival (those that contest it at once)
has been ready for a while (``settled``): else nothing moves.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from networkd.vips.model import Container, VipConfig
from networkd.vips.spread import dealt


@dataclass(frozen=True, order=True)
class DnatRule:
    """``ip:port/proto`` -> ``to_ip:to_port``, tagged with its VIP key."""

    key: str
    ip: str
    proto: str
    port: int
    to_ip: str
    to_port: int


@dataclass(frozen=True)
class FloatingPlan:
    campaign_now: frozenset[str] = frozenset()
    campaign_later: frozenset[str] = frozenset()
    keep: frozenset[str] = frozenset()
    release: frozenset[str] = frozenset()
    # ip -> why we release it (shown in the log and the API)
    reasons: Mapping[str, str] = field(default_factory=dict)
    # of campaign_later: dealt to another least loaded node (networkd.vips.spread), which takes it unless it fails
    dealt: frozenset[str] = frozenset()


class ContainerIndex(tuple):
    """The containers of every pod group, looked up by app/proc (a tuple: iterate it as before).

    Built once per pod-group snapshot, so a pass over a thousand VIP configs
    finds each config's containers without scanning them all.  ``by_proc``
    holds candidates only: pods deployd says are running (``Container.candidate``);
    ``every_of_proc`` every pod whatever its state (what ``/v1/vips`` shows per candidate node).
    """

    def __new__(cls, containers: Iterable[Container] = ()):
        self = super().__new__(cls, sorted(containers))
        self.by_proc: dict[tuple[str, str], list[Container]] = defaultdict(list)
        self.every_of_proc: dict[tuple[str, str], list[Container]] = defaultdict(list)
        for c in self:
            self.every_of_proc[(c.app, c.proc)].append(c)
            if c.candidate:
                self.by_proc[(c.app, c.proc)].append(c)
        return self


def _of(containers: Iterable[Container], app: str, proc: str) -> Iterable[Container]:
    """The candidate containers of app/proc: a pod deployd reports exited, failed, pending or unhealthy is none."""
    by_proc = getattr(containers, "by_proc", None)
    if by_proc is not None:
        return by_proc.get((app, proc), ())
    return [c for c in containers if c.app == app and c.proc == proc and c.candidate]


def every_of(containers: Iterable[Container], app: str, proc: str) -> Iterable[Container]:
    """Every container of app/proc, candidate or not, in the containers' order."""
    every = getattr(containers, "every_of_proc", None)
    if every is not None:
        return every.get((app, proc), ())
    return [c for c in containers if c.app == app and c.proc == proc]


def floating_configs(configs: Mapping[str, VipConfig]) -> dict[str, VipConfig]:
    """The floating VIP configs by IP."""
    return {c.ip: c for c in configs.values() if c.floating}


def local_container(config: VipConfig, containers: Iterable[Container], hostname: str) -> Container | None:
    """The container of ``config``'s app/proc on this node with the lowest instance number."""
    if config.excludes(hostname):
        return None
    mine = [c for c in _of(containers, config.app, config.proc) if c.node_name == hostname]
    return min(mine, key=lambda c: (c.instance, c.container_ip)) if mine else None


def nodes_running(config: VipConfig, containers: Iterable[Container]) -> frozenset[str]:
    """Every node with a container of ``config``'s app/proc that the config does not exclude."""
    return frozenset(c.node_name for c in _of(containers, config.app, config.proc)
                     if not config.excludes(c.node_name))


def node_address(config: VipConfig, node_ip: str | None) -> str | None:
    """The address a key's rules match: its IP, or this node's for ``0.0.0.0:PORT`` (None if unknown)."""
    if config.node_local:
        return node_ip or None
    return config.ip


def dnat_rules(config: VipConfig, container: Container, node_ip: str | None) -> tuple[DnatRule, ...]:
    """The DNAT rules of one VIP key towards ``container``."""
    ip = node_address(config, node_ip)
    if ip is None:
        return ()
    return tuple(DnatRule(config.key, ip, p.proto, p.src, container.container_ip, p.dest) for p in config.ports)


def _port_scoped_served(configs: Mapping[str, VipConfig], containers: list[Container],
                        hostname: str) -> Iterable[tuple[VipConfig, Container]]:
    """Port-scoped keys this node serves (it runs the app and is not excluded), with the container."""
    for config in configs.values():
        if config.floating:
            continue
        container = local_container(config, containers, hostname)
        if container is not None:
            yield config, container


def port_scoped_rules(configs: Mapping[str, VipConfig], containers: list[Container],
                      hostname: str, node_ip: str | None) -> frozenset[DnatRule]:
    """DNAT for ``IP:PORT`` / ``0.0.0.0:PORT`` keys: on every node running the app, no lock."""
    rules: set[DnatRule] = set()
    for config, container in _port_scoped_served(configs, containers, hostname):
        rules.update(dnat_rules(config, container, node_ip))
    return frozenset(rules)


@dataclass(frozen=True, order=True)
class AppEndpoint:
    """``ip:port`` of a port-scoped key this node serves for app/proc.

    The Go daemon's "app key" (docs/go-compatibility.md, key layout).
    """

    app: str
    proc: str
    ip: str
    port: int


def app_endpoints(configs: Mapping[str, VipConfig], containers: list[Container],
                  hostname: str, node_ip: str | None) -> frozenset[AppEndpoint]:
    """What this node publishes under ``networkd/apps``: the port-scoped keys it DNATs.

    Same inputs and the same address as ``port_scoped_rules``; floating VIPs
    publish nothing (Go writes app keys for port-scoped keys only).
    """
    endpoints: set[AppEndpoint] = set()
    for config, _ in _port_scoped_served(configs, containers, hostname):
        ip = node_address(config, node_ip)
        if ip is not None:
            endpoints.add(AppEndpoint(config.app, config.proc, ip, config.port))
    return frozenset(endpoints)


def plan_floating(
    configs: Mapping[str, VipConfig],
    containers: list[Container],
    hostname: str,
    holders: Mapping[str, str],
    members: frozenset[str],
    held: frozenset[str],
    health: "CandidateHealth | None" = None,
    settled: frozenset[str] | None = None,
    unready: frozenset[str] = frozenset(),
    floating: Mapping[str, VipConfig] | None = None,
    wanted: frozenset[str] | None = None,
) -> FloatingPlan:
    """Which floating VIPs to contest now / later, keep and release.

    ``holders``: ip -> hostname from the lock snapshot; ``held``: the IPs
    this process holds on its current lease; ``health``: who is a healthy
    candidate (None: every candidate is).  A VIP is placed on healthy
    candidates and balanced among them; when none is healthy, among all
    (serving something beats serving nothing).  A holder that is unhealthy
    releases it only when a healthy candidate exists.  A VIP this node lost
    for ill health (``hold_down``) is contested only after the grace period:
    another healthy candidate takes it first.  ``unready``: members that say
    they cannot take a VIP now (ignored as rivals); ``settled``: those ready
    long enough to be handed one for balance (None: every member).  ``floating`` (ip -> config) and
    ``wanted`` (the floating VIPs placeable here) may come memoized on the snapshots (networkd.vips.wants):
    then a pass costs in proportion to this node's VIPs, not to every config.
    """
    if floating is None:
        floating = floating_configs(configs)
    if wanted is None:
        wanted = frozenset(ip for ip, c in floating.items() if local_container(c, containers, hostname) is not None)
    release: dict[str, str] = {}
    for ip in held - wanted:
        if ip not in floating:
            release[ip] = "config deleted"
        elif floating[ip].excludes(hostname):
            release[ip] = "node excluded"
        else:
            release[ip] = "no local container"

    groups: dict[tuple[str, str], list[VipConfig]] = defaultdict(list)
    for ip in sorted(wanted):
        config = floating[ip]
        groups[(config.app, config.proc)].append(config)

    now: set[str] = set()
    later: set[str] = set()
    others_hand: set[str] = set()
    keep: set[str] = set()
    for group in groups.values():
        group_ips = {c.ip for c in group}
        counts: dict[str, int] = defaultdict(int)
        for ip in group_ips:
            holder = holders.get(ip)
            if holder and holder != hostname:
                counts[holder] += 1
        mine = len(held & group_ips)

        def split(config: VipConfig, lenient: bool = False) -> tuple[set[str], set[str]]:
            """(healthy live rivals, all live rivals) running ``config``'s proc; ``lenient``: a rival that
            has not said since the VIP appeared counts as healthy (``CandidateHealth.may_be_ok``)."""
            rivals = {n for n in nodes_running(config, containers)
                      if n in members and n != hostname and n not in unready}
            if health is None:
                return rivals, rivals
            ok = health.may_be_ok if lenient else health.ok
            return {n for n in rivals if ok(n, config.ip)}, rivals

        def others(config: VipConfig, me: bool | None, lenient: bool = False) -> set[str]:
            """Whom to balance against: the healthy candidates, or everyone when none is healthy."""
            good, everyone = split(config, lenient)
            return good if me is True or good else everyone

        waiting = False
        tied: list[tuple[str, list[str]]] = []  # free VIPs for which we are among the least loaded
        for config in group:
            me = True if health is None else health.mine.get(config.ip, True)
            if config.ip in held:
                if me is False and split(config)[0]:
                    release[config.ip] = UNHEALTHY
                else:
                    keep.add(config.ip)  # healthy, or nobody is: serving something beats serving nothing
                continue
            holder = holders.get(config.ip)
            if holder:
                continue  # someone holds it (maybe our previous process: its lease expires)
            waiting = True
            if me is not True and split(config)[0]:
                continue  # a healthy candidate takes it
            rivals = others(config, me, lenient=True)
            if rivals and health is not None and config.ip in health.hold_down:
                later.add(config.ip)  # lost for ill health lately: only if no other candidate takes it
            elif not rivals or mine <= min(counts[n] for n in rivals):
                tied.append((config.ip, [n for n in rivals if counts[n] == mine]))
            else:
                later.add(config.ip)
        if waiting:
            first, after = dealt((group[0].app, group[0].proc), tied, hostname)  # our share at once
            now |= first
            later |= after
            others_hand |= after
            continue
        for config in sorted(group, key=lambda c: c.ip, reverse=True):
            if config.ip not in held or config.ip in release:
                continue
            rivals = others(config, True if health is None else health.mine.get(config.ip, True))
            least = min((counts[n] for n in rivals), default=mine)
            if least <= mine - 2:
                takers = {n for n in rivals if counts[n] == least}  # they contest it at once
                if settled is not None and not takers <= settled:
                    continue  # one of them just became ready (or flaps): moving nothing beats a gap
                keep.discard(config.ip)
                release[config.ip] = f"rebalancing: this node holds {mine} VIPs of {config.app}.{config.proc}"
                break
    return FloatingPlan(frozenset(now), frozenset(later), frozenset(keep), frozenset(release), release,
                        frozenset(others_hand))


UNHEALTHY = "unhealthy here, a healthy candidate exists"


@dataclass(frozen=True)
class CandidateHealth:
    """Who is a healthy candidate for which floating VIP (issue 11, item 3).

    ``published``: node -> the VIPs its members value says it is a healthy
    candidate for (None: an older daemon that says nothing, healthy for all);
    ``mine``: this node's own verdicts (True, False or None = undecided; absent
    = True); ``hold_down``: VIPs this node lost for ill health lately;
    ``fresh``: VIPs too new here for the others to have said (each counts as
    healthy for them: networkd.vips.health.FRESH).
    """

    published: Mapping[str, frozenset[str] | None] = field(default_factory=dict)
    mine: Mapping[str, bool | None] = field(default_factory=dict)
    hold_down: frozenset[str] = frozenset()
    fresh: frozenset[str] = frozenset()
    unsaid: Mapping[str, float] = field(default_factory=dict)  # recent VIPs -> when they appeared here
    heard: Mapping[str, float] = field(default_factory=dict)  # node -> when its healthy list last changed here

    def ok(self, node: str, ip: str) -> bool:
        healthy = self.published.get(node)
        return healthy is None or ip in healthy or ip in self.fresh

    def may_be_ok(self, node: str, ip: str) -> bool:
        """``ok``, or ``node`` has not said anything since ``ip`` appeared here (its healthy list, as we
        see it, is older than the VIP): it may well take it.  Whom a healthy node shares free VIPs
        with: judged by time alone (``fresh``), a node whose view of the others lagged behind a burst
        took every VIP of the burst at once (bench/cluster.py: ~70 lock requests from each of 20 nodes)."""
        appeared = self.unsaid.get(ip)
        return self.ok(node, ip) or (appeared is not None and self.heard.get(node, float("-inf")) < appeared)


def member_value(node_ip: str | None, healthy: Iterable[str], ready: bool | None = None,
                 peer: str | None = None) -> str:
    """Our members value: node IP, the VIPs we are a healthy candidate for, (when known) whether
    we are ready to receive one now: lock watch live, inputs complete, not fenced, and our peer
    channel if on (JSON)."""
    value = {"node_ip": node_ip or "", "healthy": sorted(healthy)}
    if ready is not None:
        value["ready"] = ready
    if peer:
        value["peer"] = peer
    return json.dumps(value, separators=(",", ":"))


def member_field(value: str, name: str):
    """One field of a members value (JSON); None when absent or for an older daemon's value (its node IP,
    or empty, or not an object)."""
    value = value.strip()
    if not value.startswith("{"):
        return None
    try:
        fields = json.loads(value)
    except ValueError:
        return None
    return fields.get(name) if isinstance(fields, dict) else None


def member_ready(value: str) -> bool | None:
    """Whether a members value says its node is ready to receive a VIP; None: it says nothing (an older
    daemon: treated as ready, as before)."""
    ready = member_field(value, "ready")
    return ready if isinstance(ready, bool) else None


def member_health(value: str) -> frozenset[str] | None:
    """The healthy VIPs of a members value; None for an older daemon's value (its node IP, or empty)."""
    healthy = member_field(value, "healthy")
    if not isinstance(healthy, list):
        return None
    return frozenset(ip for ip in healthy if isinstance(ip, str))


def lock_holders(values: Mapping[str, str]) -> tuple[dict[str, str], frozenset[str]]:
    """(ip -> holder, live members) from the lock prefix snapshot.

    Locks are ``<ip>.lock``; members are ``members/<hostname>`` (each
    daemon's presence, on its lease).  Anything else is ignored.
    """
    holders: dict[str, str] = {}
    members: set[str] = set()
    for key, value in values.items():
        if key.startswith(MEMBERS):
            name = key[len(MEMBERS):]
            if name:
                members.add(name)
        elif key.endswith(".lock") and "/" not in key:
            holders[key[: -len(".lock")]] = value.strip()
    return holders, frozenset(members)


MEMBERS = "members/"
