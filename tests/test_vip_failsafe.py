"""The peer-confirmed failsafe (issue 10 item 2): namespaced nodes, a real 3-member etcd, netlink sampling.

* The whole etcd cluster frozen 30 s with the failsafe on: every holder keeps
  its VIP on its peers' promises; after the thaw each VIP is still with its
  holder and its lock is held again.  Off: every VIP drops within the TTL.
* A holder cut from etcd (and, in the second case, from its peers too) is not
  kept: its peers reach etcd and refuse (or never hear it); it fences and
  another node takes over within TTL + 1 s, without overlap.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.support.addrmonitor import AddressMonitor
from tests.support.etcdcluster import EtcdCluster
from tests.support.vipnodes import vip_value
from tests.support.waiting import wait_until
from tests.test_vip_etcd_faults import TTL, VIPS, WEB, ClusterOnEtcdCluster

PEER_PORT = 3010


@pytest.fixture
def etcd_cluster(privileged):
    cluster = EtcdCluster(3).start()
    yield cluster
    cluster.thaw()  # a test that failed mid-freeze
    cluster.destroy()


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "peer-secret"
    path.write_text("a shared secret for the test nodes\n")
    return str(path)


def three_nodes(lan, etcd_cluster, etcd_root, secret: str | None) -> ClusterOnEtcdCluster:
    """n1..n3 holding one VIP each (with the failsafe on when ``secret``), settled."""
    nodes = ClusterOnEtcdCluster(lan, etcd_cluster, etcd_root, "nft", ttl=TTL)
    for i in range(3):
        node = nodes.add(f"n{i + 1}", 11 + i)
        if secret:
            node.extra_args = ["--peer-secret-file", secret]
    nodes.put_pods("hello", "web", [(1, "n1", "10.77.0.11"), (2, "n2", "10.77.0.12"), (3, "n3", "10.77.0.13")])
    for vip in VIPS:
        nodes.put_vip(vip, vip_value("hello", "web", WEB))
    nodes.start()
    if secret:
        for node in nodes.nodes.values():
            node.daemon.wait_for_log("failsafe on: peer channel on", timeout=5)

    def one_each():
        holders = [nodes.holders_of(v) for v in VIPS]
        return all(len(h) == 1 for h in holders) and len(set().union(*holders)) == 3

    wait_until(one_each, 25, message="one VIP per node")
    time.sleep(1.5)  # settled
    return nodes


def lock_holders(nodes) -> dict[str, str | None] | None:
    try:
        return {vip: nodes.lock_holder(vip) for vip in VIPS}
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return None  # etcd not answering yet


def vip_log(nodes) -> str:
    keep = ("fenc", "failsafe", "promise", "lock", "lease", "VIP")
    return "\n".join(f"--- {n}\n" + "\n".join(line for line in node.daemon.log().splitlines()
                                               if any(k in line for k in keep))[-5000:]
                     for n, node in nodes.nodes.items())


def api(node, path: str) -> str:
    return node.ns.run("curl", "-sf", "--max-time", "5", f"http://127.0.0.1:3000{path}").stdout


def namespaces(nodes) -> dict[str, str]:
    return {name: node.ns.name for name, node in nodes.nodes.items()}


def test_whole_etcd_frozen_30s_failsafe_on_no_drop_no_overlap_locks_retaken(lan, etcd_cluster, etcd_root, secret):
    nodes = three_nodes(lan, etcd_cluster, etcd_root, secret)
    try:
        with AddressMonitor(namespaces(nodes), set(VIPS)) as monitor:
            before = monitor.holders_now()
            etcd_cluster.freeze()
            time.sleep(10)
            seen = {name: (api(node, "/v1/vips"), api(node, "/v1/status"), api(node, "/metrics"))
                    for name, node in nodes.nodes.items()}
            time.sleep(20)
            etcd_cluster.thaw()
            thawed = time.monotonic()
            expected = {vip: next(iter(before[vip])) for vip in VIPS}
            try:
                wait_until(lambda: lock_holders(nodes) == expected, 20)
                print(f"FIGURE locks held again {time.monotonic() - thawed:.2f}s after the thaw (etcdctl polling)")
            except AssertionError:
                pass  # the drops, if any, say more: asserted first below
            time.sleep(2)
            after = monitor.holders_now()
        monitor.check()
        logs = vip_log(nodes)
        changes = [i for i in monitor.intervals() if i[2] > monitor.started_at + 0.5 or i[3] < monitor.ended_at - 0.5]
        assert not monitor.overlaps(), f"two holders: {monitor.overlaps()}\n{logs}"
        assert not changes, f"VIPs dropped or moved during the outage: {changes}\n{logs}"
        assert after == before
        assert lock_holders(nodes) == expected, f"locks not held again by {expected}"
        for name, node in nodes.nodes.items():
            assert "every peer promised; keeping" in node.daemon.log(), f"{name} never kept on promises\n{logs}"
            # What an operator sees 10 s into the outage.
            vips, status, metrics = seen[name]
            mine = [e["ip"] for e in json.loads(vips) if e.get("failsafe")]
            assert mine == [vip for vip in VIPS if name in before[vip]], vips
            peers = json.loads(status)["peers"]
            assert peers["failsafe"] == "on" and peers["keeping"] == mine and peers["deadline_in"] > 0, peers
            assert sorted(p["to"] for p in peers["promises_given"]) == sorted(set(nodes.nodes) - {name}), peers
            assert sorted(p["from"] for p in peers["promises_held"]) == sorted(set(nodes.nodes) - {name}), peers
            assert "networkd_vip_failsafe_entered_total 1.0" in metrics
    finally:
        print(nodes.logs())
        nodes.close()


def test_whole_etcd_frozen_failsafe_off_every_vip_drops_within_ttl(lan, etcd_cluster, etcd_root):
    nodes = three_nodes(lan, etcd_cluster, etcd_root, None)
    try:
        with AddressMonitor(namespaces(nodes), set(VIPS)) as monitor:
            frozen = time.monotonic()
            etcd_cluster.freeze()
            time.sleep(TTL + 1)
            during = monitor.holders_now()
            time.sleep(10 - TTL - 1)
            etcd_cluster.thaw()
        monitor.check()
        ends = {ip: end for _, ip, start, end in monitor.intervals() if start < frozen}
        print("FIGURE off: dropped after", sorted(round(e - frozen, 2) for e in ends.values()))
        assert during == {}, f"still held {TTL + 1}s into the outage: {during}"
        assert all(end - frozen <= TTL for end in ends.values()), {ip: round(e - frozen, 2) for ip, e in ends.items()}
        for node in nodes.nodes.values():
            assert "failsafe off: no --peer-secret-file" in node.daemon.log()
    finally:
        print(nodes.logs())
        nodes.close()


@pytest.mark.parametrize("cut_from", ["etcd", "etcd-and-peers"])
def test_holder_cut_off_fences_and_another_node_takes_over(lan, etcd_cluster, etcd_root, secret, cut_from):
    """Its peers reach etcd, so they refuse (or, cut from the peers too, never hear it): no failsafe."""
    nodes = three_nodes(lan, etcd_cluster, etcd_root, secret)
    vip = VIPS[0]
    try:
        with AddressMonitor(namespaces(nodes), set(VIPS)) as monitor:
            holder = next(iter(monitor.holders_now()[vip]))
            node = nodes[holder]
            if cut_from == "etcd-and-peers":
                for chain, port in (("INPUT", "--dport"), ("OUTPUT", "--dport")):
                    node.ns.run("iptables", "-I", chain, "-p", "udp", port, str(PEER_PORT), "-j", "DROP")
            cut = time.monotonic()
            for forwarder in node.forwarders:
                forwarder.cut()
            taken = wait_until(lambda: (monitor.holders_now().get(vip, frozenset()) - {holder}), TTL + 5,
                               message=f"another node takes {vip}")
            time.sleep(1)
        monitor.check()
        logs = vip_log(nodes)
        new = next(iter(taken))
        began = min(s for n, ip, s, _ in monitor.intervals() if n == new and ip == vip and s > cut)
        ended = max(e for n, ip, s, e in monitor.intervals() if n == holder and ip == vip and s < cut)
        print(f"FIGURE {cut_from}: {holder} dropped {vip} {ended - cut:.2f}s after the cut, "
              f"{new} added it {began - cut:.2f}s after")
        assert not monitor.overlaps(), f"two holders: {monitor.overlaps()}\n{logs}"
        assert ended - cut <= TTL, f"{holder} kept {vip} {ended - cut:.2f}s after the cut\n{logs}"
        assert began - cut <= TTL + 1, f"{new} took {vip} {began - cut:.2f}s after the cut\n{logs}"
        holder_log = node.daemon.log()
        assert "fencing" in holder_log
        assert "every peer promised" not in holder_log
        if cut_from == "etcd":
            assert "refuses to promise: I can reach etcd" in holder_log, logs
    finally:
        print(nodes.logs())
        nodes.close()


def test_short_whole_etcd_freeze_the_lease_survives_and_the_failsafe_ends_without_a_move(
        lan, etcd_cluster, etcd_root, secret):
    """Frozen 2.5 s: past the fencing deadline (2.25 s) but, mostly, not past the leases on etcd: the
    same lease acknowledged again ends the failsafe; nothing drops or moves either way."""
    nodes = three_nodes(lan, etcd_cluster, etcd_root, secret)
    try:
        with AddressMonitor(namespaces(nodes), set(VIPS)) as monitor:
            before = monitor.holders_now()
            etcd_cluster.freeze()
            time.sleep(2.5)
            etcd_cluster.thaw()
            expected = {vip: next(iter(before[vip])) for vip in VIPS}
            wait_until(lambda: lock_holders(nodes) == expected, 20, message=f"locks held by {expected}")
            time.sleep(2)
            after = monitor.holders_now()
        monitor.check()
        logs = vip_log(nodes)
        changes = [i for i in monitor.intervals() if i[2] > monitor.started_at + 0.5 or i[3] < monitor.ended_at - 0.5]
        assert not monitor.overlaps(), f"two holders: {monitor.overlaps()}\n{logs}"
        assert not changes and after == before, f"VIPs dropped or moved: {changes}\n{logs}"
        ended = [line for line in logs.splitlines() if "failsafe ended" in line]
        print("FIGURE short freeze:", [line.split("] ")[-1] for line in ended])
        assert ended, f"no failsafe ended\n{logs}"
    finally:
        print(nodes.logs())
        nodes.close()
