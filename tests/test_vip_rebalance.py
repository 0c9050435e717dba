"""A node back after a partition from etcd gets its share of the VIPs without gaps (issue 10, item 3).

Namespaced nodes on a real etcd, every address change seen by netlink: while
the returning node is not yet ready to take a VIP (its lock watch not back),
nobody releases one to it; once it is, exactly one VIP moves, unheld for no
more than ``MAX_GAP``.
"""

from __future__ import annotations

import json
import time

from tests.support.addrmonitor import AddressMonitor
from tests.support.faultrun import counts, longest_unheld, moves
from tests.support.vipnodes import Cluster, vip_value
from tests.support.waiting import wait_until

TTL = 3
VIPS = ["10.77.0.101", "10.77.0.102", "10.77.0.103"]
WEB = [{"src": "80", "dest": "8080"}]
MAX_GAP = 0.2  # seconds a rebalancing move may leave a VIP unheld
PARTITION = 9.0  # long enough for the returning node's VIP to move away and for any retry backoff to grow


def test_node_back_after_partition_gets_one_vip_without_gap(lan, etcd_server, etcd_root):
    nodes = Cluster(lan, etcd_server, etcd_root, "nft", ttl=TTL)
    try:
        for i in range(3):
            nodes.add(f"n{i + 1}", 11 + i)
        nodes.put_pods("hello", "web", [(1, "n1", "10.77.0.11"), (2, "n2", "10.77.0.12"), (3, "n3", "10.77.0.13")])
        for vip in VIPS:
            nodes.put_vip(vip, vip_value("hello", "web", WEB))
        nodes.start()
        namespaces = {name: node.ns.name for name, node in nodes.nodes.items()}
        with AddressMonitor(namespaces, set(VIPS), poll=0.005) as monitor:
            def balanced():
                holders = monitor.holders_now()
                return (len(holders) == 3 and all(len(h) == 1 for h in holders.values())
                        and set(counts(holders, namespaces).values()) == {1})

            wait_until(balanced, 20, message="one VIP per node")
            cut = time.monotonic()
            nodes["n3"].forwarder.cut()
            wait_until(lambda: len(monitor.holders_now()) == 3 and counts(monitor.holders_now(), namespaces)["n3"] == 0,
                       TTL + 10, message="n3's VIP moved away")
            time.sleep(max(0.0, cut + PARTITION - time.monotonic()))
            healed = time.monotonic()
            nodes["n3"].forwarder.heal()
            wait_until(balanced, 10, interval=0.05, message="balanced within 10 s of the heal")
            back = time.monotonic()
            time.sleep(4)  # would a VIP move again (ping-pong)?
            end = time.monotonic()
            members = nodes.etcd.get_prefix(f"{etcd_root}/networkd/vips/members/")
        monitor.check()
        intervals = monitor.intervals()
        timeline = "\n".join(f"{n} {ip} {s - healed:+.3f} .. {e - healed:+.3f}" for n, ip, s, e in intervals)
        logs = "\n".join(f"--- {n}\n" + "\n".join(line for line in node.daemon.log().splitlines()
                                                   if "VIP" in line or "lock" in line or "etcd" in line)[-3000:]
                         for n, node in nodes.nodes.items())
        detail = f"heal at 0; balanced at {back - healed:.2f}s\n{timeline}\n{logs}"
        assert not monitor.overlaps(), f"two nodes had a VIP at once: {monitor.overlaps()}\n{detail}"
        gaps = longest_unheld(intervals, VIPS, healed, end)
        assert max(gaps.values()) <= MAX_GAP, f"a VIP unheld too long after the heal: {gaps}\n{detail}"
        arrived = moves(intervals, healed, end)
        assert len(arrived) == 1 and arrived[0][0] == "n3", f"moves after the heal: {arrived}\n{detail}"
        ready = {key.rsplit("/", 1)[1]: json.loads(value).get("ready") for key, value in members.items()}
        assert ready == {"n1": True, "n2": True, "n3": True}, f"members values say ready: {members}"
        print(f"longest unheld after the heal: {gaps}\n{detail}")
    finally:
        nodes.close()
