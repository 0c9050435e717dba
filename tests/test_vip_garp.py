"""Periodic gratuitous ARP (issue 11 item 5): --garp-interval, spread over the interval."""

from __future__ import annotations

import time

import pytest
from twisted.internet import task

from networkd.vips.arp import Announcer
from tests.support.vipnodes import ArpWatch, vip_value
from tests.support.waiting import wait_until
from tests.test_vip_nodes import VIP, WEB, cluster_factory  # noqa: F401 (fixture)


class Recording(Announcer):
    def __init__(self, clock, **kw):
        super().__init__(clock, "eth0", **kw)
        self.clock, self.log = clock, []

    def send(self, ip):
        self.log.append((self.clock.seconds(), ip))
        return True


def test_held_vips_are_announced_again_every_interval_at_a_phase_of_their_own():
    clock = task.Clock()
    arp = Recording(clock, refresh_every=10.0)
    ips = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(1000)]
    for ip in ips:
        arp.announce(ip)  # a thousand VIPs acquired together
    clock.pump([0.1] * 400)  # 40 s
    periodic = [t for t, _ in arp.log if t >= 10.0]
    per_second = [sum(1 for t in periodic if 10 + k <= t < 11 + k) for k in range(10)]
    assert min(per_second) > 50 and max(per_second) < 150, f"spread, no burst: {per_second}"
    one = [t for t, ip in arp.log if ip == ips[0]]
    gaps = [b - a for a, b in zip(one[3:], one[4:])]  # after the immediate, +1 s and +3 s frames
    assert gaps and all(g == pytest.approx(10.0, abs=0.15) for g in gaps), one
    arp.allowed = lambda ip: ip != ips[1]  # e.g. fenced: quiet, and still scheduled
    arp.cancel(ips[0])
    before = len(arp.log)
    clock.pump([0.1] * 100)
    sent = {ip for _, ip in arp.log[before:]}
    assert ips[0] not in sent and ips[1] not in sent and len(sent) == 998
    arp.cancel_all()
    assert not clock.getDelayedCalls()


def test_no_periodic_announcements_with_interval_0():
    clock = task.Clock()
    arp = Recording(clock)
    arp.announce("10.0.0.1")
    clock.pump([1.0] * 100)
    assert [t for t, _ in arp.log] == [0.0, 1.0, 3.0]


def test_periodic_announcements_seen_on_the_wire_at_the_configured_interval(cluster_factory):
    c = cluster_factory(nodes=1)
    c["n1"].extra_args = ["--garp-interval", "2"]
    c.put_pods("hello", "web", [(1, "n1", "10.77.0.11")])
    c.start()
    watch = ArpWatch(c["n1"].ns.name, VIP)
    try:
        c.put_vip(VIP, vip_value("hello", "web", WEB))
        wait_until(lambda: watch.added, 5, message="acquired")
        time.sleep(10)
        requests = [t - watch.added[0] for t, op in watch.frames if op == 1]
        periodic = [t for t in requests if t > 1.5 and abs(t - 3.0) > 0.1]  # besides +0, +1 s and +3 s
        gaps = [b - a for a, b in zip(periodic, periodic[1:])]
        print(f"periodic ARP requests at {[round(t, 2) for t in periodic]}")
        assert len(periodic) >= 3 and 2.0 <= periodic[0] < 4.1, requests
        assert all(g == pytest.approx(2.0, abs=0.2) for g in gaps), gaps
        assert len([op for _, op in watch.frames if op == 2]) == len(requests), "a reply with every request"
    finally:
        watch.close()
