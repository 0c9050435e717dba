"""VIPs through etcd trouble: namespaced nodes, a real 3-member etcd cluster, every endpoint given.

An etcd leader change must neither drop nor move a VIP: the lease lives on
(the new leader extends it), so a holder that keeps its keep-alives going
across the election has no reason to let go of anything.  That holds for an
election etcd ends within the budget of the lease (docs/design.md,
"Keep-alives across an etcd leader change"); a longer one (a split vote
takes a second round of the election timeout) can outlast the lease deadline,
and a node then drops its VIP until etcd answers again, moving nothing.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.support.addrmonitor import AddressMonitor
from tests.support.etcdcluster import EtcdCluster
from tests.support.vipnodes import Cluster, Node, NsForwarder, vip_value
from tests.support.waiting import wait_until

TTL = 3
# The longest keep-alive outage (from the first unanswered keep-alive, sent one interval after the last
# answered one) that ends before the fencing deadline, less the kernel's lifetime granularity: 1.51 s.
BUDGET = TTL - max(0.5, TTL / 4) - TTL * 2 / 9 - 0.07
OUTAGE = re.compile(r"acknowledges keep-alives again after ([0-9.]+)s")
VIPS = ["10.77.0.101", "10.77.0.102", "10.77.0.103"]
WEB = [{"src": "80", "dest": "8080"}]


class EveryEndpointNode(Node):
    """A node that reaches every etcd member (one forwarder each) and is given all their endpoints."""

    def __init__(self, name, ns, ip, etcd, etcd_root, firewall, ttl=TTL):
        super().__init__(name, ns, ip, etcd.members[0].client_port, etcd_root, firewall, ttl)
        self.forwarders = [self.forwarder] + [NsForwarder(ns.name, m.client_port) for m in etcd.members[1:]]

    def args(self):
        args = super().args()
        args[args.index("--etcd") + 1] = ",".join(f.endpoint for f in self.forwarders)
        return args

    def close(self):
        super().close()
        for forwarder in self.forwarders[1:]:
            forwarder.close()


class ClusterOnEtcdCluster(Cluster):
    def add(self, name: str, host: int) -> Node:
        ip = f"10.77.0.{host}"
        ns = self.lan.add_node(name, f"{ip}/24")
        node = EveryEndpointNode(name, ns, ip, self.etcd, self.root, self.firewall, self.ttl)
        self.nodes[name] = node
        return node


@pytest.fixture
def etcd_cluster(privileged):
    cluster = EtcdCluster(3).start()
    yield cluster
    cluster.destroy()


def test_etcd_leader_killed_five_times_no_vip_drops_or_moves(lan, etcd_cluster, etcd_root):
    nodes = ClusterOnEtcdCluster(lan, etcd_cluster, etcd_root, "nft", ttl=TTL)
    try:
        for i in range(3):
            nodes.add(f"n{i + 1}", 11 + i)
        nodes.put_pods("hello", "web", [(1, "n1", "10.77.0.11"), (2, "n2", "10.77.0.12"), (3, "n3", "10.77.0.13")])
        for vip in VIPS:
            nodes.put_vip(vip, vip_value("hello", "web", WEB))
        nodes.start()
        def one_each():
            holders = [nodes.holders_of(v) for v in VIPS]
            return all(len(h) == 1 for h in holders) and len(set().union(*holders)) == 3

        wait_until(one_each, 20, message="one VIP per node")
        time.sleep(2)  # settled
        namespaces = {name: node.ns.name for name, node in nodes.nodes.items()}
        with AddressMonitor(namespaces, set(VIPS)) as monitor:
            before = monitor.holders_now()
            for _ in range(5):
                leader = wait_until(etcd_cluster.leader, 10, message="etcd has a leader")
                killed = time.monotonic()
                etcd_cluster.kill(leader)
                wait_until(lambda: etcd_cluster.leader() is not None, 15, message="a new leader")
                time.sleep(max(0.0, killed + TTL + 1 - time.monotonic()))  # past any lease the kill could end
                etcd_cluster.revive(leader)
                etcd_cluster.wait_healthy(20)
                time.sleep(1)
            after = monitor.holders_now()
        monitor.check()
        # Every holding opened with the monitor's first dump and lasted to its last one.
        changes = [i for i in monitor.intervals() if i[2] > monitor.started_at + 0.5 or i[3] < monitor.ended_at - 0.5]
        logs = "\n".join(f"--- {n}\n" + "\n".join(line for line in node.daemon.log().splitlines()
                                                   if "fenc" in line or "VIP" in line or "lock" in line or "lease" in line or "keep-alive" in line)[-4000:]
                         for n, node in nodes.nodes.items())
        assert after == before, f"holders changed: {before} -> {after}\n{logs}"
        outages = {n: max((float(m.group(1)) for m in OUTAGE.finditer(node.daemon.log())), default=0.0)
                   for n, node in nodes.nodes.items()}
        unexplained = [i for i in changes if outages[i[0]] <= BUDGET]
        assert not unexplained, f"VIP intervals began or ended during the kills: {unexplained} (longest " \
                                f"keep-alive outage per node {outages}, budget {BUDGET:.2f}s)\n{logs}"
        held = sorted(changes, key=lambda i: (i[0], i[1], i[2]))
        gaps = [b[2] - a[3] for a, b in zip(held, held[1:]) if (a[0], a[1]) == (b[0], b[1])]
        assert all(gap < 1.0 for gap in gaps), f"a VIP off for long after a long election: {gaps}\n{logs}"
        if changes:
            print(f"VIPs dropped for {gaps} s after elections longer than the budget: outages {outages}")
    finally:
        print(nodes.logs())
        nodes.close()
