"""Service-aware VIPs across namespaced nodes (issue 11): real daemons, real etcd, real netlink.

A VIP goes to a node whose container runs: deployd's own pod state first.
"""

from __future__ import annotations

import time

from tests.support.vipnodes import AddressSampler, vip_value
from tests.support.waiting import wait_until
from tests.test_vip_nodes import VIP, WEB, cluster_factory, one_vip_on_two_nodes  # noqa: F401 (fixture)

CONTAINERS = {"n1": (1, "10.77.0.11"), "n2": (2, "10.77.0.12")}


def pods(c, states=None):
    c.put_pods("hello", "web", [(i, n, cip) for n, (i, cip) in CONTAINERS.items()], states=states)


def test_pod_state_exit_moves_the_vip_within_2s_without_overlap(cluster_factory):
    c = cluster_factory()
    holder, other = one_vip_on_two_nodes(c)
    pods(c, {1: {"State": 2, "Healthst": 2}, 2: {"State": 2, "Healthst": 0}})
    time.sleep(0.5)
    assert c.holders_of(VIP) == {holder}, "running pods: nothing moves"
    with AddressSampler(list(c.nodes.values()), VIP) as sampler:
        written = time.monotonic()
        pods(c, {CONTAINERS[holder][0]: {"State": 3, "Healthst": 0}, CONTAINERS[other][0]: {"State": 2}})
        wait_until(lambda: sampler.first(lambda h: h == {other}, after=written), 3, interval=0.05,
                   message="moved to the running pod's node")
        time.sleep(0.2)
    taken = sampler.first(lambda h: other in h, after=written)
    assert taken - written < 2.0, f"the move took {taken - written:.2f}s"
    assert not sampler.overlaps(), "never both at once"
    assert c.lock_holder(VIP) == other
    assert "no local container" in c[holder].daemon.log()
