"""VIPs through etcd trouble: namespaced nodes, a real 3-member etcd cluster, every endpoint given.

An etcd leader change must neither drop nor move a VIP: the lease lives on
(the new leader extends it), so a holder that keeps its keep-alives going
across the election has no reason to let go of anything.
"""

from __future__ import annotations

import time

import pytest

from tests.support.addrmonitor import AddressMonitor
from tests.support.etcdcluster import EtcdCluster
from tests.support.vipnodes import Cluster, Node, NsForwarder, vip_value
from tests.support.waiting import wait_until

TTL = 3
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
        assert not changes, f"VIP intervals began or ended during the kills: {changes}\n{logs}"
    finally:
        print(nodes.logs())
        nodes.close()
