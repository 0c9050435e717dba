"""The planner: which VIPs this node contests, keeps and releases (table-driven)."""

from __future__ import annotations

from collections import Counter

import pytest

from networkd.vips.model import Container, PortMap, VipConfig
from networkd.vips.planner import (
    AppEndpoint, DnatRule, app_endpoints, dnat_rules, local_container, lock_holders, plan_floating,
    port_scoped_rules,
)


def config(key, app="hello", proc="web", excluded=(), ports=((("tcp", 80, 8080)),)):
    ip, _, port = key.partition(":")
    return VipConfig(key, ip, int(port) if port else None, app, proc,
                     tuple(PortMap(*p) for p in ports), frozenset(excluded))


def running(*placements, app="hello", proc="web"):
    return [Container(app, proc, instance, node, f"10.1.0.{instance}", cip) for instance, node, cip in placements]


BOTH = running((1, "n1", "172.20.0.1"), (2, "n2", "172.20.0.2"))


def test_local_container_is_the_lowest_instance_here():
    containers = running((3, "n1", "172.20.0.3"), (1, "n2", "172.20.0.1"), (2, "n1", "172.20.0.2"))
    assert local_container(config("10.0.0.5"), containers, "n1").instance == 2
    assert local_container(config("10.0.0.5", proc="db"), containers, "n1") is None
    assert local_container(config("10.0.0.5", excluded=["n1"]), containers, "n1") is None


def test_dnat_rules_and_node_local_keys():
    vip = config("10.0.0.5", ports=(("tcp", 80, 8080), ("udp", 53, 53)))
    assert dnat_rules(vip, BOTH[0], "10.9.0.1") == (
        DnatRule("10.0.0.5", "10.0.0.5", "tcp", 80, "172.20.0.1", 8080),
        DnatRule("10.0.0.5", "10.0.0.5", "udp", 53, "172.20.0.1", 53),
    )
    local = config("0.0.0.0:9000", ports=(("tcp", 9000, 80),))
    scoped = config("10.0.0.7:7000", proc="db", ports=(("tcp", 7000, 7000),))
    rules = port_scoped_rules({"0.0.0.0:9000": local, "10.0.0.7:7000": scoped, "10.0.0.5": vip},
                              BOTH, "n1", "10.9.0.1")
    assert rules == {DnatRule("0.0.0.0:9000", "10.9.0.1", "tcp", 9000, "172.20.0.1", 80)}


def test_app_endpoints_are_the_port_scoped_keys_served_here():
    vips = {
        "0.0.0.0:9000": config("0.0.0.0:9000", ports=(("udp", 9000, 53),)),
        "10.0.0.7:7000": config("10.0.0.7:7000"),
        "10.0.0.5": config("10.0.0.5"),  # floating: no app key
        "10.0.0.8:8000": config("10.0.0.8:8000", proc="db"),  # not running here
        "10.0.0.9:9900": config("10.0.0.9:9900", excluded=["n1"]),
    }
    assert app_endpoints(vips, BOTH, "n1", "10.9.0.1") == {
        AppEndpoint("hello", "web", "10.9.0.1", 9000), AppEndpoint("hello", "web", "10.0.0.7", 7000)}
    assert app_endpoints(vips, BOTH, "n1", None) == {AppEndpoint("hello", "web", "10.0.0.7", 7000)}, \
        "no node IP: no 0.0.0.0 rules, no app key"
    assert app_endpoints(vips, BOTH, "n3", "10.9.0.3") == set()


def configs(*keys, **kw):
    return {k: config(k, **kw) for k in keys}


@pytest.mark.parametrize("case, vips, containers, holders, members, held, expect", [
    ("free VIP, nobody else: contest now",
     configs("10.0.0.1"), BOTH, {}, {"n1"}, set(), {"now": {"10.0.0.1"}}),
    ("free VIP, rival holds no more: contest now (ties race)",
     configs("10.0.0.1"), BOTH, {}, {"n1", "n2"}, set(), {"now": {"10.0.0.1"}}),
    ("free VIP, rival holds fewer: let it go first",
     configs("10.0.0.1", "10.0.0.2"), BOTH, {}, {"n1", "n2"}, {"10.0.0.2"}, {"later": {"10.0.0.1"}, "keep": {"10.0.0.2"}}),
    ("rival is not alive: its count does not matter",
     configs("10.0.0.1", "10.0.0.2"), BOTH, {}, {"n1"}, {"10.0.0.2"}, {"now": {"10.0.0.1"}, "keep": {"10.0.0.2"}}),
    ("held by someone else: nothing",
     configs("10.0.0.1"), BOTH, {"10.0.0.1": "n2"}, {"n1", "n2"}, set(), {}),
    ("our previous process's lock: wait for its lease",
     configs("10.0.0.1"), BOTH, {"10.0.0.1": "n1"}, {"n1", "n2"}, set(), {}),
    ("no local container: never contest, release if held",
     configs("10.0.0.1", "10.0.0.2", proc="db"), BOTH, {}, {"n1"}, {"10.0.0.1"}, {"release": {"10.0.0.1"}}),
    ("excluded: release",
     configs("10.0.0.1", excluded=["n1"]), BOTH, {"10.0.0.1": "n1"}, {"n1", "n2"}, {"10.0.0.1"}, {"release": {"10.0.0.1"}}),
    ("config deleted: release",
     {}, BOTH, {"10.0.0.1": "n1"}, {"n1"}, {"10.0.0.1"}, {"release": {"10.0.0.1"}}),
    ("4 held, live rival with 0: release exactly one, the highest",
     configs("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"), BOTH,
     {f"10.0.0.{i}": "n1" for i in range(1, 5)}, {"n1", "n2"}, {f"10.0.0.{i}" for i in range(1, 5)},
     {"keep": {"10.0.0.1", "10.0.0.2", "10.0.0.3"}, "release": {"10.0.0.4"}}),
    ("3 held, rival 1: differ by two, so one moves (2 and 2)",
     configs("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"), BOTH,
     {"10.0.0.1": "n1", "10.0.0.2": "n1", "10.0.0.3": "n1", "10.0.0.4": "n2"}, {"n1", "n2"},
     {"10.0.0.1", "10.0.0.2", "10.0.0.3"}, {"keep": {"10.0.0.1", "10.0.0.2"}, "release": {"10.0.0.3"}}),
    ("a VIP of the proc is still free: no release meanwhile",
     configs("10.0.0.1", "10.0.0.2", "10.0.0.3"), BOTH,
     {"10.0.0.1": "n1", "10.0.0.2": "n1"}, {"n1", "n2"}, {"10.0.0.1", "10.0.0.2"},
     {"keep": {"10.0.0.1", "10.0.0.2"}, "later": {"10.0.0.3"}}),
    ("rival excluded from this VIP does not count for it",
     configs("10.0.0.1", "10.0.0.2", excluded=["n2"]), BOTH, {}, {"n1", "n2"}, {"10.0.0.2"},
     {"now": {"10.0.0.1"}, "keep": {"10.0.0.2"}}),
])
def test_plan_floating(case, vips, containers, holders, members, held, expect):
    plan = plan_floating(vips, containers, "n1", holders, frozenset(members), frozenset(held))
    got = {"now": plan.campaign_now, "later": plan.campaign_later, "keep": plan.keep, "release": plan.release}
    assert {k: v for k, v in got.items() if v} == expect, case


def test_converges_to_balance_on_three_nodes():
    """Simulate nodes taking turns on the same lock table: counts end within one of each other."""
    nodes = ["n1", "n2", "n3"]
    containers = [Container("hello", "web", i + 1, n, "", f"172.20.0.{i + 1}") for i, n in enumerate(nodes)]
    vips = configs(*(f"10.0.0.{i}" for i in range(1, 8)))
    holders = {ip: "n1" for ip in (f"10.0.0.{i}" for i in range(1, 8))}  # n1 started first
    for _ in range(40):
        for node in nodes:
            held = frozenset(ip for ip, h in holders.items() if h == node)
            plan = plan_floating(vips, containers, node, dict(holders), frozenset(nodes), held)
            for ip in plan.release:
                del holders[ip]
            for ip in sorted(plan.campaign_now):
                holders.setdefault(ip, node)
    counts = sorted(sum(1 for h in holders.values() if h == n) for n in nodes)
    assert len(holders) == 7 and counts[-1] - counts[0] <= 1, counts


def test_lock_holders_reads_locks_and_members():
    holders, members = lock_holders({
        "10.0.0.1.lock": "n1\n", "members/n1": "10.9.0.1", "members/n2": "", "junk": "x", "a/b.lock": "n3",
    })
    assert holders == {"10.0.0.1": "n1"}
    assert members == {"n1", "n2"}


def test_container_index_answers_like_the_plain_list():
    """The reconciler indexes containers by app/proc; every answer must be the list's answer."""
    from networkd.vips.planner import ContainerIndex, nodes_running

    containers = (running((3, "n1", "172.20.0.3"), (1, "n2", "172.20.0.1"), (2, "n1", "172.20.0.2"))
                  + running((1, "n3", "172.21.0.1"), app="other")
                  + running((5, "n1", "172.22.0.5"), proc="db"))
    index = ContainerIndex(containers)
    assert sorted(index) == sorted(containers)
    configs = {c.key: c for c in (config("10.0.0.5"), config("10.0.0.6", app="other"),
                                  config("10.0.0.7", proc="db", excluded=["n2"]), config("10.0.0.8", app="none"),
                                  config("0.0.0.0:9000", excluded=["n1"]))}
    for vip in configs.values():
        for node in ("n1", "n2", "n3"):
            assert local_container(vip, index, node) == local_container(vip, containers, node)
        assert nodes_running(vip, index) == nodes_running(vip, containers)
    for node in ("n1", "n2", "n3"):
        assert (plan_floating(configs, index, node, {}, frozenset({"n1", "n2", "n3"}), frozenset())
                == plan_floating(configs, containers, node, {}, frozenset({"n1", "n2", "n3"}), frozenset()))
        assert port_scoped_rules(configs, index, node, "10.9.0.1") == port_scoped_rules(configs, containers, node,
                                                                                        "10.9.0.1")


def test_pods_deployd_reports_not_running_are_not_candidates():
    """State 3 (exit) or Healthst 3 (unhealthy): no container for the planner, in the index or a list."""
    from networkd.vips.planner import ContainerIndex, nodes_running

    containers = [Container("hello", "web", 1, "n1", "", "172.20.0.1", state=3, health=0),
                  Container("hello", "web", 2, "n2", "", "172.20.0.2", state=2, health=2),
                  Container("hello", "web", 3, "n3", "", "172.20.0.3", state=2, health=3)]
    vips = configs("10.0.0.1")
    for given in (containers, ContainerIndex(containers)):
        assert local_container(vips["10.0.0.1"], given, "n1") is None
        assert nodes_running(vips["10.0.0.1"], given) == {"n2"}
        plan = plan_floating(vips, given, "n1", {"10.0.0.1": "n1"}, frozenset({"n1", "n2"}), frozenset({"10.0.0.1"}))
        assert plan.release == {"10.0.0.1"} and plan.reasons["10.0.0.1"] == "no local container"
        plan = plan_floating(vips, given, "n2", {}, frozenset({"n1", "n2"}), frozenset())
        assert plan.campaign_now == {"10.0.0.1"}


# -- health (issue 11 item 3) --------------------------------------------------------


def health(published=None, mine=None, hold_down=()):
    from networkd.vips.planner import CandidateHealth

    return CandidateHealth({n: None if v is None else frozenset(v) for n, v in (published or {}).items()},
                           mine or {}, frozenset(hold_down))


V = "10.0.0.1"


@pytest.mark.parametrize("case, holders, held, h, expect", [
    ("free, n2 healthy, we are down: n2 takes it",
     {}, set(), health({"n2": [V]}, {V: False}), {}),
    ("free, n2 healthy, we are undecided: n2 takes it",
     {}, set(), health({"n2": [V]}, {V: None}), {}),
    ("free, we are healthy, n2 is not: ours at once",
     {}, set(), health({"n2": []}, {V: True}), {"now": {V}}),
    ("free, nobody is healthy: placed among all, as before",
     {}, set(), health({"n2": []}, {V: False}), {"now": {V}}),
    ("free, n2 an older daemon (no health in its value): a healthy candidate",
     {}, set(), health({"n2": None}, {V: False}), {}),
    ("held, we are down, n2 healthy: hand it over",
     {V: "n1"}, {V}, health({"n2": [V]}, {V: False}), {"release": {V}}),
    ("held, we are down, nobody healthy: keep it",
     {V: "n1"}, {V}, health({"n2": []}, {V: False}), {"keep": {V}}),
    ("held, we are undecided: keep it",
     {V: "n1"}, {V}, health({"n2": [V]}, {V: None}), {"keep": {V}}),
    ("free, hold-down, n2 healthy too: only after the grace",
     {}, set(), health({"n2": [V]}, {V: True}, [V]), {"later": {V}}),
    ("free, hold-down, we are the only healthy candidate: at once",
     {}, set(), health({"n2": []}, {V: True}, [V]), {"now": {V}}),
])
def test_plan_places_on_healthy_candidates(case, holders, held, h, expect):
    plan = plan_floating(configs(V), BOTH, "n1", holders, frozenset({"n1", "n2"}), frozenset(held), h)
    got = {"now": plan.campaign_now, "later": plan.campaign_later, "keep": plan.keep, "release": plan.release}
    assert {k: v for k, v in got.items() if v} == expect, case


def test_balance_counts_only_healthy_candidates():
    """n2 holds nothing but is unhealthy for these VIPs: no rebalancing towards it; n3 healthy: one goes."""
    three = BOTH + running((3, "n3", "172.20.0.3"))
    vips = configs("10.0.0.1", "10.0.0.2", "10.0.0.3")
    held = frozenset(vips)
    holders = {ip: "n1" for ip in vips}
    sick = health({"n2": [], "n3": []}, {ip: True for ip in vips})
    plan = plan_floating(vips, three, "n1", holders, frozenset({"n1", "n2", "n3"}), held, sick)
    assert plan.keep == held and not plan.release
    well = health({"n2": [], "n3": list(vips)}, {ip: True for ip in vips})
    plan = plan_floating(vips, three, "n1", holders, frozenset({"n1", "n2", "n3"}), held, well)
    assert plan.release == {"10.0.0.3"} and plan.reasons["10.0.0.3"].startswith("rebalancing")


def test_members_value_old_and_new():
    from networkd.vips.planner import member_health, member_value

    value = member_value("10.9.0.1", {"10.0.0.2", "10.0.0.1"})
    assert value == '{"node_ip":"10.9.0.1","healthy":["10.0.0.1","10.0.0.2"]}'
    assert member_health(value) == {"10.0.0.1", "10.0.0.2"}
    assert member_health(member_value(None, ())) == frozenset()
    for older in ("10.9.0.1", "", "{broken", '{"node_ip": "10.9.0.1"}', '{"healthy": "10.0.0.1"}'):
        assert member_health(older) is None, older


THREE = BOTH + running((3, "n3", "172.20.0.3"))
TWO_HELD = {"10.0.0.1": "n1", "10.0.0.2": "n1", "10.0.0.3": "n2"}  # n1 2, n2 1, n3 0 (it just came back)


@pytest.mark.parametrize("case, settled, unready, expect", [
    ("n3 says ready and has for the hysteresis: one goes to it",
     {"n2", "n3"}, set(), {"release": {"10.0.0.2"}, "keep": {"10.0.0.1"}}),
    ("n3 says ready, but not for long enough yet: nothing moves",
     {"n2"}, set(), {"keep": {"10.0.0.1", "10.0.0.2"}}),
    ("n3 says it is not ready (its lock watch is down): no rival; n2 holds one less only: nothing moves",
     {"n2"}, {"n3"}, {"keep": {"10.0.0.1", "10.0.0.2"}}),
    ("older daemons say nothing (settled None): as before, one goes",
     None, set(), {"release": {"10.0.0.2"}, "keep": {"10.0.0.1"}}),
])
def test_rebalancing_only_towards_a_rival_ready_long_enough(case, settled, unready, expect):
    vips = configs("10.0.0.1", "10.0.0.2", "10.0.0.3")
    plan = plan_floating(vips, THREE, "n1", TWO_HELD, frozenset({"n1", "n2", "n3"}),
                         frozenset({"10.0.0.1", "10.0.0.2"}), None,
                         None if settled is None else frozenset(settled), frozenset(unready))
    got = {"now": plan.campaign_now, "later": plan.campaign_later, "keep": plan.keep, "release": plan.release}
    assert {k: v for k, v in got.items() if v} == expect, case


def test_an_unready_least_loaded_rival_does_not_delay_a_free_vip():
    """n2 holds nothing but says it cannot take a VIP now: n1 contests a free one at once, not after the grace."""
    vips = configs("10.0.0.1", "10.0.0.2")
    plan = plan_floating(vips, BOTH, "n1", {"10.0.0.2": "n1"}, frozenset({"n1", "n2"}), frozenset({"10.0.0.2"}))
    assert plan.campaign_later == {"10.0.0.1"}
    plan = plan_floating(vips, BOTH, "n1", {"10.0.0.2": "n1"}, frozenset({"n1", "n2"}), frozenset({"10.0.0.2"}),
                         unready=frozenset({"n2"}))
    assert plan.campaign_now == {"10.0.0.1"}


def test_members_value_says_ready():
    from networkd.vips.planner import member_health, member_ready, member_value

    value = member_value("10.9.0.1", {"10.0.0.1"}, ready=False)
    assert value == '{"node_ip":"10.9.0.1","healthy":["10.0.0.1"],"ready":false}'
    assert member_ready(value) is False and member_health(value) == {"10.0.0.1"}
    assert member_ready(member_value("10.9.0.1", (), ready=True)) is True
    for older in (member_value("10.9.0.1", ()), "10.9.0.1", "", "{broken", '{"ready": "yes"}'):
        assert member_ready(older) is None, older


def test_a_burst_of_free_vips_is_dealt_out_among_the_least_loaded():
    """20 nodes holding nothing, 20 free VIPs of one app: each node contests one at once (was: all 20,
    4,000 lock requests for 200 VIPs of 10 apps in bench/cluster.py), every VIP is somebody's, and
    the others wait the campaign grace; one free VIP is still raced for by every tied node."""
    nodes = [f"n{i:02d}" for i in range(1, 21)]
    containers = [Container("hello", "web", i + 1, n, "", f"172.20.0.{i + 1}") for i, n in enumerate(nodes)]
    vips = configs(*(f"10.0.0.{i}" for i in range(1, 21)))
    plans = {n: plan_floating(vips, containers, n, {}, frozenset(nodes), frozenset()) for n in nodes}
    assert {n: len(p.campaign_now) for n, p in plans.items()} == {n: 1 for n in nodes}
    assert set().union(*(p.campaign_now for p in plans.values())) == set(vips)
    assert all(p.campaign_now | p.campaign_later == set(vips) for p in plans.values())

    owner = dict(zip(sorted(vips), nodes))
    holders = {ip: n for ip, n in owner.items() if ip != "10.0.0.7"}  # its holder died: its lock expired
    alive = frozenset(nodes) - {owner["10.0.0.7"]}
    for n in alive:
        plan = plan_floating(vips, containers, n, holders, alive, frozenset(ip for ip, h in holders.items() if h == n))
        assert plan.campaign_now == {"10.0.0.7"}, n

    fewer = configs("10.0.0.1", "10.0.0.2", "10.0.0.3")  # 3 VIPs, 20 tied nodes: each VIP to 6-7 nodes
    takers = Counter(ip for n in nodes for ip in plan_floating(fewer, containers, n, {}, frozenset(nodes),
                                                                frozenset()).campaign_now)
    assert set(takers) == set(fewer) and all(6 <= c <= 7 for c in takers.values()), takers


def test_a_rival_that_has_not_said_since_a_burst_is_still_shared_with():
    """20 nodes, 20 new VIPs of one app; n01's view of the others' members values lags the burst (their
    healthy lists as it sees them predate the VIPs).  They have not said, so each counts as a candidate
    and n01 contests its share at once (it contested all 20 once the 2 s of ``fresh`` ran out: ~70 lock
    requests from each node in bench/cluster.py).  Rivals that did say, and said no, get none."""
    from networkd.vips.planner import CandidateHealth

    nodes = [f"n{i:02d}" for i in range(1, 21)]
    containers = [Container("hello", "web", i + 1, n, "", f"172.20.0.{i + 1}") for i, n in enumerate(nodes)]
    vips = configs(*(f"10.0.0.{i}" for i in range(1, 21)))
    mine = {ip: True for ip in vips}
    stale = {n: frozenset() for n in nodes[1:]}
    appeared = {ip: 100.0 for ip in vips}

    def plan(heard_at, unsaid=appeared):
        h = CandidateHealth(stale, mine, unsaid=unsaid, heard={n: heard_at for n in nodes[1:]})
        return plan_floating(vips, containers, "n01", {}, frozenset(nodes), frozenset(), h)

    assert len(plan(heard_at=99.0).campaign_now) == 1, "not said yet: shared out"
    assert plan(heard_at=101.0).campaign_now == set(vips), "said after the VIPs appeared, and not healthy"
    assert plan(heard_at=99.0, unsaid={}).campaign_now == set(vips), "not said for too long: no candidates"


def test_an_unhealthy_holder_hands_over_only_to_a_rival_that_said_it_is_healthy():
    """A rival that has not said is shared free VIPs with, but never handed one we hold (it may be down)."""
    from networkd.vips.planner import CandidateHealth

    h = CandidateHealth({"n2": frozenset()}, {V: False}, unsaid={V: 100.0}, heard={"n2": 99.0})
    plan = plan_floating(configs(V), BOTH, "n1", {V: "n1"}, frozenset({"n1", "n2"}), frozenset({V}), h)
    assert plan.keep == {V} and not plan.release
