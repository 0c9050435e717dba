"""The rtnetlink codec and socket code of the VIP path.

Packing is checked against pyroute2's parser (an independent reading of the
same kernel headers); the socket code against a real kernel, inside a
namespace of the test's own: lifetimes as the kernel reports them, batches,
removal of what is already gone, and the event filter that keeps our own
renewals from waking the daemon.
"""

from __future__ import annotations

import errno
import socket
import time

import pytest
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from networkd.vips import netlink as netlink_module
from networkd.vips import rtnl


def decode(raw: bytes, cls):
    msg = cls(raw)
    msg.decode()
    return msg


def test_put_address_is_what_pyroute2_reads():
    raw = rtnl.put_address(7, 3, "10.0.0.5", 2)
    msg = decode(raw, ifaddrmsg)
    assert msg["header"]["type"] == rtnl.RTM_NEWADDR and msg["header"]["sequence_number"] == 7
    assert msg["header"]["flags"] == (rtnl.NLM_F_REQUEST | rtnl.NLM_F_CREATE | rtnl.NLM_F_REPLACE), "no ack: errors only"
    assert msg["header"]["length"] == len(raw)
    assert (msg["family"], msg["prefixlen"], msg["index"]) == (socket.AF_INET, 32, 3)
    assert msg.get_attr("IFA_LOCAL") == msg.get_attr("IFA_ADDRESS") == "10.0.0.5"
    assert msg.get_attr("IFA_CACHEINFO")["ifa_valid"] == 2
    assert msg.get_attr("IFA_CACHEINFO")["ifa_preferred"] == 2


def test_delete_and_get_link_are_what_pyroute2_reads():
    msg = decode(rtnl.delete_address(9, 4, "192.168.1.200"), ifaddrmsg)
    assert msg["header"]["type"] == rtnl.RTM_DELADDR and msg["index"] == 4
    assert msg.get_attr("IFA_LOCAL") == "192.168.1.200"
    link = decode(rtnl.get_link(1, "eth0"), ifinfmsg)
    assert link["header"]["type"] == rtnl.RTM_GETLINK and link.get_attr("IFLA_IFNAME") == "eth0"


def test_parse_address_reads_what_pyroute2_writes():
    msg = ifaddrmsg()
    msg["header"]["type"] = rtnl.RTM_NEWADDR
    msg["family"], msg["prefixlen"], msg["index"] = socket.AF_INET, 32, 5
    msg["attrs"] = [("IFA_ADDRESS", "10.1.2.3"), ("IFA_LOCAL", "10.1.2.3"), ("IFA_LABEL", "eth0"),
                    ("IFA_CACHEINFO", {"ifa_preferred": 1, "ifa_valid": 2, "cstamp": 10, "tstamp": 12345})]
    msg.encode()
    [message] = list(rtnl.messages(msg.data))
    assert rtnl.parse_address(message) == rtnl.Address("10.1.2.3", 32, 5, 2, 12345, 0)


def test_garbage_never_raises():
    for data in (b"", b"\x00" * 15, b"\xff" * 64, rtnl.put_address(1, 1, "10.0.0.1", 1)[:30]):
        for message in rtnl.messages(data):
            rtnl.parse_address(message)
            rtnl.parse_link(message)
    assert rtnl.parse_address(rtnl.Message(rtnl.RTM_NEWADDR, 0, 0, b"\x02\x20")) is None


# -- against the kernel, in a namespace ------------------------------------------------


@pytest.fixture
def in_namespace(privileged, monkeypatch):
    """A namespace with an ``eth0`` (veth); Netlink sockets made from now on live in it."""
    from tests.support.nlnamespace import netlink_namespace

    with netlink_namespace(monkeypatch) as ns:
        yield ns


def lifetimes(ns) -> dict[str, str]:
    """ip -> 'valid_lft Ns' as `ip addr` prints it."""
    out = ns.run("ip", "-o", "-4", "addr", "show", "dev", "eth0").stdout
    found = {}
    for line in out.splitlines():
        parts = line.split()
        ip = parts[parts.index("inet") + 1]
        if ip.endswith("/32"):
            found[ip[:-3]] = parts[parts.index("valid_lft") + 1] if "valid_lft" in parts else "?"
    return found


def test_batch_of_adds_renewals_and_removals_in_one_exchange(in_namespace):
    nl = netlink_module.Netlink("eth0")
    nl.start()
    try:
        assert nl.index and nl.mac and len(nl.mac) == 6 and nl.link_up
        ips = [f"10.66.{i // 200}.{i % 200 + 1}" for i in range(300)]
        assert set(nl.apply([], [(ip, 9) for ip in ips]).values()) == {0}
        assert set(lifetimes(in_namespace)) == set(ips)
        assert {a.ip: a.valid for a in nl.addresses()} == {ip: 9 for ip in ips}
        results = nl.apply(ips[:100] + ["10.66.9.9"], [(ip, 2) for ip in ips[100:]])
        assert results["10.66.9.9"] == errno.EADDRNOTAVAIL, "already gone counts as removed"
        assert all(results[ip] == 0 for ip in ips)
        now = lifetimes(in_namespace)
        assert set(now) == set(ips[100:]) and set(now.values()) <= {"2sec", "1sec"}
        time.sleep(3.2)
        assert lifetimes(in_namespace) == {}, "the kernel removed them when their lifetime ran out"
    finally:
        nl.stop()


def test_events_say_removed_and_added_by_others_and_filter_our_own_renewals(in_namespace):
    nl = netlink_module.Netlink("eth0")
    nl.start()
    events = netlink_module._EventReader(nl, nl.port)
    nl._events = events  # as start() with a reactor would have it
    removed, added = [], []
    nl.on_address_removed = lambda ip, lifetime_left: removed.append((ip, lifetime_left))
    nl.on_address_added = added.append
    try:
        nl.apply([], [("10.66.0.1", 5), ("10.66.0.2", 5)])
        for _ in range(50):
            nl.apply([], [("10.66.0.1", 5)])  # renewals: RTM_NEWADDR, dropped by the filter
        in_namespace.run("ip", "addr", "del", "10.66.0.2/32", "dev", "eth0")
        in_namespace.run("ip", "addr", "add", "10.66.0.3/32", "dev", "eth0")
        in_namespace.run("ip", "addr", "replace", "10.66.0.1/32", "dev", "eth0")
        time.sleep(0.05)
        received = []
        original = nl._event
        nl._event = lambda m: (received.append(m.type), original(m))
        events.doRead()
        assert removed == [("10.66.0.2", 5)], "removed by hand with its lifetime left"
        assert nl.sees_others_adds
        assert added == ["10.66.0.3", "10.66.0.1"], "others' adds and changes arrive; our own 52 never do"
        assert received.count(rtnl.RTM_NEWADDR) == 2
    finally:
        nl._events = None
        events.close()
        nl.stop()


def test_missing_interface_is_reported_not_raised(in_namespace):
    nl = netlink_module.Netlink("nosuch0")
    nl.start()
    try:
        assert nl.apply(["10.66.0.1"], [("10.66.0.2", 2)]) == {"10.66.0.1": errno.EADDRNOTAVAIL,
                                                               "10.66.0.2": errno.ENODEV}
        with pytest.raises(netlink_module.InterfaceMissing):
            nl.addresses()
    finally:
        nl.stop()
