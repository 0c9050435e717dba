"""VipManager in process, with recording fakes for netlink, ARP and iptables.

The namespace tests show the behaviour end to end; the first tests here
drive a clock and a fake etcd to pin down the safety rules exactly: when
fencing happens, the kernel lifetime, and the order of a release (host
first, then the lock).  The app-key tests at the end run on a real etcd
and a real lease, and check what an operator sees there.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer, task

from networkd.keys import Keys
from networkd.vips.reconciler import VipManager
from tests.support.builder import BuiltNode
# Journal, FakeEtcd and Watchers are imported from here by test_vip_delays too.
from tests.support.fakeetcd import FakeEtcd, FakeSession, Journal, Watchers
from tests.support.hostfakes import FakeArp, FakeBackend, FakeNetlink
from tests.support.logcapture import LogCapture
from tests.support.tcpproxy import TCPProxy
from tests.support.vipnodes import pod_group, vip_value
from tests.support.waiting import eventually, sleep

VIP = "10.0.0.5"


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


def test_acquire_adds_address_with_lifetime_then_dnat_and_arp(node):
    hold_vip(node)
    # The ARP goes out on the reactor's next turn, if the address is still ours then (issue 10).
    assert node.journal[-4:] == [("lock", f"{VIP}.lock"), ("addr", VIP, 2), ("iptables", 2), ("arp", VIP)]
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
    assert node.journal[-3:] == [("addr", VIP, 2), ("iptables", 2), ("arp", VIP)]


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


# -- app keys, against a real etcd and a real lease ---------------------------------
# The host side stays recorded; what is asserted is what `etcdctl get --prefix` shows.

HELLO = {"app": "hello", "proc": "web"}


class LiveNode(BuiltNode):
    """A VipManager on a real etcd session, built by networkd/app.py with a recorded host;
    ``proxy`` (a TCPProxy) carries the lease and the writes."""

    def __init__(self, etcd, root, hostname, node_ip, proxy=None, ttl=2):
        self.journal = Journal()
        endpoint = proxy.endpoint if proxy else etcd.endpoint
        host = dict(firewall_backend=FakeBackend(self.journal), netlink=FakeNetlink(self.journal),
                    announcer=FakeArp(self.journal), to_thread=defer.maybeDeferred)
        # Snapshots come over a direct connection, so a cut proxy only stops the writes.
        super().__init__(endpoint, root, hostname, "--no-dns", "--interface", "eth0", "--node-ip", node_ip,
                         "--lock-ttl", str(ttl), call_timeout=0.5, watch_endpoint=etcd.endpoint, vip_host=host)
        self.manager = self.vips


@pytest.fixture
def live(etcd_server, etcd_root):
    """``live(hostname, node_ip, proxy=None)`` starts a LiveNode under this test's root."""
    made = []

    def make(hostname="n1", node_ip="10.9.0.1", proxy=None):
        made.append(LiveNode(etcd_server, etcd_root, hostname, node_ip, proxy).start())
        return made[-1]

    yield make
    for n in made:
        pytest_twisted.blockon(defer.Deferred.fromCoroutine(n.stop()))


class Cluster:
    """Writes configs and pod groups as operators and deployd do; reads the app keys back."""

    def __init__(self, etcd, root):
        self.etcd, self.root = etcd, root
        self.apps = f"{root}/networkd/apps/"

    def vip(self, key, ports, excluded=None, **who):
        self.etcd.put(f"{self.root}/config/vips/{key}", vip_value(**(who or HELLO), ports=ports, excluded=excluded))

    def unvip(self, key):
        self.etcd.delete(f"{self.root}/config/vips/{key}")

    def runs(self, *placements, app="hello", proc="web"):
        """placements: (instance, node, node ip, container ip)."""
        self.etcd.put(f"{self.root}/deployd/pod_groups/{app}/{app}.proc.{proc}", pod_group(app, proc, list(placements)))

    def app_keys(self):
        """Relative app key -> hostname."""
        return {k[len(self.apps):]: v for k, v in self.etcd.get_prefix(self.apps).items()}

    def app_kvs(self):
        """Relative app key -> (hostname, lease, mod revision)."""
        return {k[len(self.apps):]: v for k, v in self.etcd.get_prefix_kvs(self.apps).items()}

    def lease_alive(self, lease):
        return "already expired" not in self.etcd.ctl("lease", "timetolive", f"{lease:x}").stdout


@pytest.fixture
def cluster(etcd_server, etcd_root):
    return Cluster(etcd_server, etcd_root)


ON_N1 = (1, "n1", "10.9.0.1", "172.20.0.5")
ON_N2 = (2, "n2", "10.9.0.2", "172.20.0.6")


@pytest_twisted.ensureDeferred
async def test_app_keys_of_served_port_scoped_keys_are_on_our_lease_and_written_once(cluster, live):
    cluster.runs(ON_N1)
    cluster.vip("0.0.0.0:9000", [{"src": "9000", "proto": "udp", "dest": "53"}])
    cluster.vip("10.0.0.7:7000", [{"dest": "7001"}])
    cluster.vip("10.0.0.5", [{"src": "80"}])  # floating: lock and address, no app key
    cluster.vip("10.0.0.8:8000", [{}], app="other", proc="web")  # not running here
    n1 = live()
    expected = {"hello/web/10.9.0.1:9000": "n1", "hello/web/10.0.0.7:7000": "n1"}
    await eventually(lambda: cluster.app_keys() == expected, 5, message=f"app keys {cluster.app_keys()}")
    kvs = cluster.app_kvs()
    assert {lease for _, lease, _ in kvs.values()} == {n1.session.lease}, "attached to our lease"
    await eventually(lambda: n1.manager.held_count() == 1, 5, message="the floating VIP is held")
    assert cluster.app_keys() == expected, "a held floating VIP publishes no app key"
    await sleep(1.5)  # reconcile passes and keep-alives: nothing is written again
    assert cluster.app_kvs() == kvs


@pytest_twisted.ensureDeferred
async def test_app_key_goes_when_config_deleted_container_moves_node_excluded_and_on_stop(cluster, live):
    cluster.runs(ON_N1)
    cluster.vip("0.0.0.0:9000", [{"dest": "80"}])
    cluster.vip("10.0.0.7:7000", [{}])
    n1 = live()
    both = {"hello/web/10.9.0.1:9000": "n1", "hello/web/10.0.0.7:7000": "n1"}
    await eventually(lambda: cluster.app_keys() == both, 5)

    cluster.unvip("10.0.0.7:7000")
    await eventually(lambda: cluster.app_keys() == {"hello/web/10.9.0.1:9000": "n1"}, 3, message="config deleted")
    cluster.vip("0.0.0.0:9000", [{"dest": "80"}], excluded=["n1"])
    await eventually(lambda: cluster.app_keys() == {}, 3, message="node excluded")
    cluster.vip("0.0.0.0:9000", [{"dest": "80"}])
    await eventually(lambda: cluster.app_keys() == {"hello/web/10.9.0.1:9000": "n1"}, 3, message="included again")
    cluster.runs(ON_N2)
    await eventually(lambda: cluster.app_keys() == {}, 3, message="container moved to n2")
    cluster.runs(ON_N1)
    await eventually(lambda: cluster.app_keys() == {"hello/web/10.9.0.1:9000": "n1"}, 3, message="back on n1")

    lease = n1.session.lease
    await n1.manager.stopService()
    assert cluster.app_keys() == {}, "withdrawn on stop"
    assert cluster.lease_alive(lease), "by the VIP manager itself, not by the lease going"


@pytest_twisted.ensureDeferred
async def test_app_keys_vanish_with_a_revoked_lease_and_return_on_the_new_one(cluster, live):
    cluster.runs(ON_N1)
    cluster.vip("0.0.0.0:9000", [{}])
    n1 = live()
    await eventually(lambda: cluster.app_keys() == {"hello/web/10.9.0.1:9000": "n1"}, 5)
    old = n1.session.lease
    cluster.etcd.ctl("lease", "revoke", f"{old:x}")
    assert cluster.app_keys() == {}, "they die with the lease ([BUG 22])"
    await eventually(lambda: cluster.app_keys() == {"hello/web/10.9.0.1:9000": "n1"}, 5, message="written again")
    [(_, lease, _)] = cluster.app_kvs().values()
    assert lease == n1.session.lease != old


@pytest_twisted.ensureDeferred
async def test_node_cut_off_from_etcd_loses_its_app_keys_and_retries_its_writes(cluster, live):
    proxy = TCPProxy(cluster.etcd.client_port)
    try:
        cluster.runs(ON_N1)
        cluster.vip("0.0.0.0:9000", [{}])
        n1 = live(proxy=proxy)
        await eventually(lambda: cluster.app_keys() == {"hello/web/10.9.0.1:9000": "n1"}, 5)
        with LogCapture() as logs:
            proxy.cut()  # as if the node died: nobody keeps its lease alive
            cluster.vip("10.0.0.7:7000", [{}])  # seen (snapshots), not writable
            await eventually(lambda: logs.has("could not publish app keys"), 3, message="the failed write is logged")
            await eventually(lambda: cluster.app_keys() == {}, n1.session.ttl + 2,
                             message="gone with the lease ([BUG 22])")
            assert n1.manager.running
            proxy.heal()
            expected = {"hello/web/10.9.0.1:9000": "n1", "hello/web/10.0.0.7:7000": "n1"}
            await eventually(lambda: cluster.app_keys() == expected, 10, message="retried on the new lease")
        assert {lease for _, lease, _ in cluster.app_kvs().values()} == {n1.session.lease}
    finally:
        proxy.close()


@pytest_twisted.ensureDeferred
async def test_shared_ip_port_key_stays_published_while_any_node_serves_it(cluster, live):
    cluster.runs(ON_N1, ON_N2)
    cluster.vip("10.0.0.7:7000", [{}])
    cluster.vip("0.0.0.0:9000", [{}])
    nodes = {"n1": live("n1", "10.9.0.1"), "n2": live("n2", "10.9.0.2")}
    await eventually(lambda: set(cluster.app_keys()) == {
        "hello/web/10.0.0.7:7000", "hello/web/10.9.0.1:9000", "hello/web/10.9.0.2:9000"}, 5)
    await sleep(1)
    kvs = cluster.app_kvs()
    await sleep(1)
    assert cluster.app_kvs() == kvs, "no node rewrites the other's entry"
    writer = kvs["hello/web/10.0.0.7:7000"][0]
    other = "n2" if writer == "n1" else "n1"
    await nodes[writer].manager.stopService()
    await eventually(lambda: cluster.app_keys().get("hello/web/10.0.0.7:7000") == other, 3,
                     message="the remaining node publishes it")
    assert cluster.app_kvs()["hello/web/10.0.0.7:7000"][1] == nodes[other].session.lease
    assert set(cluster.app_keys()) == {"hello/web/10.0.0.7:7000", f"hello/web/10.9.0.{other[1]}:9000"}


def test_fencing_happens_at_the_deadline_by_a_timer_not_at_the_next_poll(node):
    """The rules and the log follow the deadline to the millisecond (the addresses already do)."""
    import math

    hold_vip(node)
    now = node.clock.seconds()
    node.clock.advance(math.ceil(now / 0.5) * 0.5 - now)  # on a 0.5 s tick: the deadline falls between two
    node.session.ack()
    node.clock.advance(0)
    assert node.manager.fenced_since is None
    node.clock.pump([0.001] * 2255)  # 5 ms past the deadline (the next tick is 0.25 s later)
    assert node.manager.fenced_since is not None
    assert node.journal[-1] == ("iptables", 0), "the DNAT rules went with the fencing"


def test_a_pass_at_rest_does_not_walk_the_vip_configs_again(node, monkeypatch):
    """What the host carries is derived once per snapshot: passes on unchanged inputs cost set operations."""
    from networkd.vips import wants

    hold_vip(node)
    calls = []
    real = wants.local_container
    monkeypatch.setattr(wants, "local_container", lambda *a: (calls.append(1), real(*a))[1])
    for _ in range(3):
        node.manager._reconcile()
    assert calls == [], "unchanged snapshots: nothing recomputed"
    node.publish(pods={"hello/hello.proc.web": pod_group("hello", "web", [(1, "n1", "10.9.0.1", "172.20.0.6")])})
    assert calls, "a new pods snapshot is derived again"
    assert node.manager.held_count() == 1


def test_with_the_lock_watch_down_the_last_lock_snapshot_starts_no_contest():
    """A VIP free in the last lock snapshot, while the lock watch is down: not contested (that snapshot is
    stale; 20 daemons whose connections dropped under a burst contested ~2,000 long-taken VIPs from
    theirs); contested as soon as the watch is live again."""
    from types import SimpleNamespace

    clock, journal, keys = task.Clock(), Journal(), Keys("/lain")
    watchers = Watchers()
    status = SimpleNamespace(connected=True)
    listeners = []

    def watch(prefix):
        w = watchers(prefix)
        if prefix == keys.vip_locks:
            w.status, w.on_status = status, listeners.append
        return w

    manager = VipManager(
        reactor=clock, client=FakeEtcd(journal), keys=keys, watch=watch, session=FakeSession(clock), hostname="n1",
        interface="eth0", node_ip="10.9.0.1", firewall_backend=FakeBackend(journal),
        netlink=FakeNetlink(journal), announcer=FakeArp(journal), to_thread=defer.maybeDeferred,
    )
    manager.startService()
    clock.advance(0)
    watchers.publish(keys.pod_groups, {"hello/hello.proc.web": pod_group("hello", "web", [(1, "n1", "10.9.0.1", "172.20.0.5")])})
    watchers.publish(keys.vip_locks, {"members/n1": "10.9.0.1"})
    status.connected = False  # the watch drops; its last snapshot stays
    for listener in listeners:
        listener(False)
    watchers.publish(keys.vips, {VIP: json.dumps({"app": "hello", "proc": "web", "ports": [{"src": 80, "dest": 8080}]})})
    clock.advance(1)
    assert ("lock", f"{VIP}.lock") not in journal, "contested from a stale lock snapshot"
    status.connected = True
    for listener in listeners:
        listener(True)
    clock.advance(0.2)
    assert ("lock", f"{VIP}.lock") in journal
    manager.stopService()
    clock.advance(5)


def test_at_rest_the_level_triggered_tick_comes_every_anti_entropy_pass_not_twice_a_second(node, monkeypatch):
    """Issue 13, "timers only where something can change": holding a VIP with nothing unsettled, the
    node ticks once per anti-entropy pass (5 s), not every 0.5 s; it still keeps and renews the VIP."""
    from networkd.vips import reconciler

    hold_vip(node)
    ticks = []
    real = node.manager._tick
    monkeypatch.setattr(node.manager, "_tick", lambda: (ticks.append(node.clock.seconds()), real())[1])
    node.manager._tick_call.cancel()
    node.manager._tick_call = None
    node.manager._arm_tick()
    for _ in range(120):  # a minute of keep-alives every 0.5 s
        node.session.ack()
        node.clock.advance(0.5)
    assert node.manager.held_count() == 1 and node.manager.fenced_since is None
    assert 60 / reconciler.ANTI_ENTROPY - 1 <= len(ticks) <= 60 / reconciler.ANTI_ENTROPY + 1, ticks


def _held_by_n2_then(node, locks_after):
    """n2 holds VIP (only n1 has a container for it); then the lock snapshot becomes ``locks_after``."""
    node.publish(
        vips={VIP: json.dumps({"app": "hello", "proc": "web", "ports": [{"src": 80, "dest": 8080}]})},
        pods={"hello/hello.proc.web": pod_group("hello", "web", [(1, "n1", "10.9.0.1", "172.20.0.5")])},
        locks={"members/n1": "10.9.0.1", "members/n2": "10.9.0.2", f"{VIP}.lock": "n2"},
    )
    assert ("lock", f"{VIP}.lock") not in node.journal
    node.publish(locks=locks_after)
    node.clock.advance(0)
    assert ("lock", f"{VIP}.lock") in node.journal, "n1 took the free lock at once"


def test_a_lock_gone_with_its_holders_lease_is_taken_but_its_address_waits_a_grace(node):
    """An expired holder's kernel drops the address by its own deadline, a margin before etcd expires the
    lease; on a starved node the kernel ran later than that margin (tests/test_vip_starvation.py).  A lock
    that went together with its holder's members key (the lease expired) is taken at once, its address
    added EXPIRY_GRACE later."""
    from networkd.vips.locks import EXPIRY_GRACE

    _held_by_n2_then(node, {"members/n1": "10.9.0.1"})
    node.publish(locks={"members/n1": "10.9.0.1", f"{VIP}.lock": "n1"})
    node.clock.pump([0.05] * int(EXPIRY_GRACE / 0.05 - 2))
    assert not [e for e in node.journal if e[0] == "addr"], "no address within the grace"
    node.clock.pump([0.05] * 4)
    assert ("addr", VIP, 2) in node.journal or ("addr", VIP, 1) in node.journal
    assert node.manager.held_count() == 1


def test_a_lock_its_live_holder_released_is_used_at_once(node):
    """A voluntary release (the holder is still a member: it removed its address before the lock)."""
    _held_by_n2_then(node, {"members/n1": "10.9.0.1", "members/n2": "10.9.0.2"})
    node.publish(locks={"members/n1": "10.9.0.1", "members/n2": "10.9.0.2", f"{VIP}.lock": "n1"})
    assert ("addr", VIP, 2) in node.journal


def test_a_holder_that_stops_releases_then_revokes_and_its_lock_is_used_at_once(node):
    """What the watch says tells a stop from an expiry: a stopping holder deletes its locks, then revokes
    its lease (its members key goes at a later revision); an expired lease deletes both at one revision."""
    from networkd.etcd.reflector import Snapshot

    def locks(values, deleted):
        node.watchers.subscribers[node.keys.vip_locks](Snapshot(node.keys.vip_locks, 20, values, deleted=deleted))
        node.clock.advance(0)

    node.publish(
        vips={VIP: json.dumps({"app": "hello", "proc": "web", "ports": [{"src": 80, "dest": 8080}]})},
        pods={"hello/hello.proc.web": pod_group("hello", "web", [(1, "n1", "10.9.0.1", "172.20.0.5")])},
        locks={"members/n1": "10.9.0.1", "members/n2": "10.9.0.2", f"{VIP}.lock": "n2"},
    )
    locks({"members/n1": "10.9.0.1"}, {f"{VIP}.lock": 18, "members/n2": 19})
    locks({"members/n1": "10.9.0.1", f"{VIP}.lock": "n1"}, {})
    assert ("addr", VIP, 2) in node.journal, "a stop's release: the address at once"


def test_a_lock_and_members_key_deleted_at_one_revision_is_an_expiry(node):
    from networkd.etcd.reflector import Snapshot
    from networkd.vips.locks import EXPIRY_GRACE

    def locks(values, deleted):
        node.watchers.subscribers[node.keys.vip_locks](Snapshot(node.keys.vip_locks, 20, values, deleted=deleted))
        node.clock.advance(0)

    node.publish(
        vips={VIP: json.dumps({"app": "hello", "proc": "web", "ports": [{"src": 80, "dest": 8080}]})},
        pods={"hello/hello.proc.web": pod_group("hello", "web", [(1, "n1", "10.9.0.1", "172.20.0.5")])},
        locks={"members/n1": "10.9.0.1", "members/n2": "10.9.0.2", f"{VIP}.lock": "n2"},
    )
    locks({"members/n1": "10.9.0.1"}, {f"{VIP}.lock": 19, "members/n2": 19})
    assert ("lock", f"{VIP}.lock") in node.journal
    locks({"members/n1": "10.9.0.1", f"{VIP}.lock": "n1"}, {})
    assert not [e for e in node.journal if e[0] == "addr"], "no address within the grace"
    node.clock.pump([0.05] * int(EXPIRY_GRACE / 0.05 + 2))
    assert [e for e in node.journal if e[0] == "addr"]
