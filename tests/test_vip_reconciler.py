"""VipManager with a driven clock and recording fakes for etcd, netlink, ARP and iptables.

The namespace tests show the behaviour end to end; these pin down the
safety rules exactly: when fencing happens, the kernel lifetime, and the
order of a release (host first, then the lock).
"""

from __future__ import annotations

import json

import pytest
from twisted.internet import defer, task

from networkd.etcd.client import KeyValue
from networkd.etcd.reflector import Snapshot
from networkd.keys import Keys
from networkd.vips import firewall as fw
from networkd.vips.reconciler import VipManager
from tests.support.vipnodes import pod_group

VIP = "10.0.0.5"
LEASE = 0x42


class Journal(list):
    """Every host and etcd change, in order."""


class FakeSession:
    ttl = 3

    def __init__(self, clock):
        self._clock = clock
        self.lease = LEASE
        self.last_ack = clock.seconds()
        self.acks, self.losses = [], []

    def ack_age(self):
        return None if self.last_ack is None else self._clock.seconds() - self.last_ack

    def on_ack(self, cb):
        self.acks.append(cb)

    def on_lost(self, cb):
        self.losses.append(cb)

    def ack(self):
        self.last_ack = self._clock.seconds()
        for cb in self.acks:
            cb(self.lease)


class FakeEtcd:
    def __init__(self, journal):
        self.journal = journal
        self.kv = {}

    def put_if_absent(self, key, value, lease):
        if key in self.kv:
            return defer.succeed(False)
        self.kv[key] = (value, lease)
        self.journal.append(("lock", key.decode().rsplit("/", 1)[-1]))
        return defer.succeed(True)

    def delete_if_lease(self, key, lease):
        if self.kv.get(key, (None, None))[1] == lease:
            del self.kv[key]
            self.journal.append(("unlock", key.decode().rsplit("/", 1)[-1]))
            return defer.succeed(True)
        return defer.succeed(False)

    def put(self, key, value, lease=None):
        self.kv[key] = (value, lease)
        return defer.succeed(None)

    def get(self, key):
        if key not in self.kv:
            return defer.succeed(None)
        value, lease = self.kv[key]
        return defer.succeed(KeyValue(key, value, 1, lease or 0))


class FakeNetlink:
    mac = b"\x02\x00\x00\x00\x00\x01"

    def __init__(self, journal):
        self.journal = journal
        self.present = {}
        self.on_address_removed = self.on_link_up = None

    def start(self):
        return defer.succeed(None)

    def stop(self):
        return defer.succeed(None)

    def addresses(self):
        return defer.succeed(set(self.present))

    def put(self, ip, lifetime, then=None):
        self.journal.append(("addr", ip, lifetime) if ip not in self.present else ("renew", ip, lifetime))
        self.present[ip] = lifetime
        if then:
            then()
        return defer.succeed(None)

    def remove(self, ip):
        self.journal.append(("unaddr", ip))
        return defer.succeed(self.present.pop(ip, None) is not None)


class FakeArp:
    def __init__(self, journal):
        self.journal = journal

    def announce(self, ip):
        self.journal.append(("arp", ip))

    def cancel(self, ip):
        pass

    def cancel_all(self):
        pass


class FakeBackend:
    name = "fake"

    def __init__(self, journal):
        self.journal = journal
        self.rules = []

    def read(self):
        return fw.ChainState(list(self.rules), [], [], 0)

    def write(self, rules, jumps):
        self.rules = list(rules)
        self.journal.append(("iptables", len(rules)))


class Watchers:
    def __init__(self):
        self.subscribers = {}

    def __call__(self, prefix):
        watchers = self

        class W:
            def subscribe(self, cb):
                watchers.subscribers[prefix] = cb

        return W()

    def publish(self, prefix, values):
        self.subscribers[prefix](Snapshot(prefix, 1, values))


@pytest.fixture
def node():
    clock = task.Clock()
    journal = Journal()
    keys = Keys("/lain")
    watchers = Watchers()
    session = FakeSession(clock)
    etcd = FakeEtcd(journal)
    manager = VipManager(
        reactor=clock, client=etcd, keys=keys, watch=watchers, session=session, hostname="n1",
        interface="eth0", node_ip="10.9.0.1", firewall_backend=FakeBackend(journal),
        netlink=FakeNetlink(journal), announcer=FakeArp(journal), to_thread=defer.maybeDeferred,
    )
    manager.startService()
    clock.advance(0)

    class Node:
        pass

    n = Node()
    n.clock, n.journal, n.keys, n.watchers, n.session, n.etcd, n.manager = (
        clock, journal, keys, watchers, session, etcd, manager)

    def publish(vips=None, pods=None, locks=None):
        if vips is not None:
            watchers.publish(keys.vips, vips)
        if pods is not None:
            watchers.publish(keys.pod_groups, pods)
        if locks is not None:
            watchers.publish(keys.vip_locks, locks)
        clock.advance(0)

    n.publish = publish
    return n


def hold_vip(n):
    n.publish(
        vips={VIP: json.dumps({"app": "hello", "proc": "web", "ports": [{"src": 80, "dest": 8080}]})},
        pods={"hello/hello.proc.web": pod_group("hello", "web", [(1, "n1", "10.9.0.1", "172.20.0.5")])},
        locks={"members/n1": "10.9.0.1"},
    )
    n.publish(locks={"members/n1": "10.9.0.1", f"{VIP}.lock": "n1"})
    assert n.manager.held_count() == 1


def test_acquire_adds_address_with_lifetime_then_arp_and_dnat(node):
    hold_vip(node)
    assert node.journal[-4:] == [("lock", f"{VIP}.lock"), ("addr", VIP, 2), ("arp", VIP), ("iptables", 2)]
    status = node.manager.status()[0]
    assert status["held_by_me"] and status["holder"] == "n1" and status["local_container"]["ip"] == "172.20.0.5"
    assert status["dnat"] == [f"{VIP}:80/tcp -> 172.20.0.5:8080"]


def test_fences_before_the_lease_can_expire_and_comes_back_on_ack(node):
    hold_vip(node)
    node.clock.pump([0.1] * 22)  # 2.2 s without an acknowledged keep-alive
    assert ("unaddr", VIP) not in node.journal
    node.clock.pump([0.1] * 1)  # 2.3 s > TTL - max(0.5, TTL/4) = 2.25 s
    assert node.journal[-2:] == [("unaddr", VIP), ("iptables", 0)]
    assert node.manager.held_count() == 0
    node.clock.pump([0.1] * 10)
    assert node.journal[-1] == ("iptables", 0), "nothing added or announced while fenced"
    node.session.ack()  # etcd answers again: the lease and the lock survived
    node.clock.advance(0)
    assert node.journal[-3:] == [("addr", VIP, 2), ("arp", VIP), ("iptables", 2)]


def test_every_ack_renews_the_kernel_lifetime(node):
    hold_vip(node)
    node.clock.advance(1.0)
    node.session.ack()
    assert ("renew", VIP, 2) in node.journal


def test_resumed_process_announces_nothing(node):
    """After a freeze the first tick sees the stale ack: fence, never add or ARP."""
    hold_vip(node)
    before = len(node.journal)
    node.clock.advance(10)  # SIGSTOP: nothing ran for 10 s; now the first timer fires
    assert node.journal[before:] == [("unaddr", VIP), ("iptables", 0)]
    node.manager._address_removed(VIP)
    node.clock.advance(0)
    assert ("arp", VIP) not in node.journal[before:]


def test_release_removes_rules_and_address_before_the_lock(node):
    hold_vip(node)
    node.journal.clear()
    node.publish(vips={})  # config deleted
    node.clock.pump([0.005] * 10)
    assert node.journal == [("unaddr", VIP), ("iptables", 0), ("unlock", f"{VIP}.lock")]


def test_stop_releases_everything_host_first(node):
    hold_vip(node)
    node.journal.clear()
    d = node.manager.stopService()
    node.clock.pump([0.01] * 20)
    assert d.called
    # presence first (a successor must not wait for us), then host, then the lock
    assert node.journal == [("unlock", "n1"), ("unaddr", VIP), ("iptables", 0), ("unlock", f"{VIP}.lock")]


def test_invalid_keys_are_shown_and_do_not_block(node):
    node.publish(vips={"10.0.0.300": "{}", VIP: "not json"},
                 pods={"hello/x": "garbage"}, locks={})
    keys = {entry["key"]: entry for entry in node.manager.status()}
    assert set(node.manager.invalid_keys) == {"/lain/config/vips/10.0.0.300", "/lain/config/vips/10.0.0.5"}
    assert "not JSON" in keys["/lain/config/vips/10.0.0.5"]["error"]
    assert "/lain/deployd/pod_groups/hello/x" in node.manager.pod_errors
