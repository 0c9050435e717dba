"""Leader election and the leader's tasks, in-process against real etcd.

Each "node" has its own etcd client, lease session and watchers, as two
networkd processes would; what the tests check is what an operator sees
in etcd (``etcdctl get``) and in each node's state.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time

import pytest_twisted
from twisted.internet import defer

from networkd.etcd.lock import LeaseLocks
from networkd.keys import Keys
from tests.support.builder import BuiltNode
from tests.support.daemon import Daemon
from tests.support.dnsstub import dig_answers
from tests.support.ports import free_port
from tests.support.waiting import eventually, sleep


class Node(BuiltNode):
    """What add_leader builds in a daemon (session, election, tasks), built by networkd/app.py."""

    def __init__(self, etcd_server, root: str, hostname: str, tasks=("deployd", "swarm", "tinydns"),
                 domain: str | None = "example.lain", ttl: int = 2):
        args = ["--no-dns", "--no-vips", "--lock-ttl", str(ttl), *(f"--{task}" for task in tasks)]
        if domain is not None:
            args += ["--domain", domain]
        super().__init__(etcd_server.endpoint, root, hostname, *args, call_timeout=2.0)
        self.election, self.tasks = self.leader, self.leader_tasks


async def in_etcd(predicate, timeout: float = 10.0, message: str = ""):
    """``eventually`` for a predicate that runs etcdctl: each run blocks the
    reactor, so poll every 100 ms and leave the nodes time to work."""
    return await eventually(predicate, timeout=timeout, interval=0.1, message=message)


async def two_nodes_one_leader(etcd_server, root: str) -> list:
    """Nodes n1 and n2, started, once exactly one of them leads."""
    nodes = [Node(etcd_server, root, name).start() for name in ("n1", "n2")]
    try:
        await eventually(lambda: sum(n.election.is_leader for n in nodes) == 1, message="one leader")
    except BaseException:
        for n in nodes:
            await n.stop()
        raise
    return nodes


def published(etcd_server, key: str):
    value = etcd_server.get_prefix(key).get(key)
    return None if value is None else json.loads(value)


def mod_revision(etcd_server, key: str) -> int:
    out = json.loads(etcd_server.ctl("get", key, "-w", "json").stdout)
    return int(out["kvs"][0]["mod_revision"])


@pytest_twisted.ensureDeferred
async def test_one_leader_publishes_and_hands_over_on_stop(etcd_server, etcd_root):
    keys = Keys(etcd_root)
    nodes = await two_nodes_one_leader(etcd_server, etcd_root)
    try:
        leader = next(n for n in nodes if n.election.is_leader)
        other = next(n for n in nodes if n is not leader)
        assert etcd_server.get_prefix(keys.leader)[keys.leader] == leader.election.hostname
        await eventually(lambda: other.election.holder == leader.election.hostname, message="the other sees it")

        etcd_server.put(keys.deployd_leader, "10.1.2.3:9003")
        etcd_server.put(keys.swarm_leader, "10.1.2.4:2376")
        await in_etcd(lambda: published(etcd_server, keys.domains + "deployd.lain") == {
            "ips": ["10.1.2.3"], "type": ""}, message="deployd.lain")
        await in_etcd(lambda: published(etcd_server, keys.domains + "swarm.lain") == {
            "ips": ["10.1.2.4"], "type": ""}, message="swarm.lain")

        stopped_at = time.monotonic()
        # The election stops before the rest of the daemon (its lease lives on
        # while VIPs are released): resigning hands over at once.
        await defer.maybeDeferred(leader.tasks.stopService)
        await defer.maybeDeferred(leader.election.stopService)
        await eventually(lambda: other.election.is_leader, timeout=5, message="the other takes over")
        assert time.monotonic() - stopped_at < 1.5
        etcd_server.put(keys.deployd_leader, "10.1.2.9:9003")
        await in_etcd(lambda: published(etcd_server, keys.domains + "deployd.lain") == {
            "ips": ["10.1.2.9"], "type": ""}, message="the new leader publishes")
        assert sum(n.election.is_leader for n in nodes) == 1
    finally:
        for n in nodes:
            await n.stop()
    assert keys.leader not in etcd_server.get_prefix(keys.leader), "the last leader resigned too"


@pytest_twisted.ensureDeferred
async def test_a_deleted_leader_key_is_contested_again(etcd_server, etcd_root):
    """An operator's `etcdctl del` of the key: the old leader steps down, one node leads again."""
    keys = Keys(etcd_root)
    nodes = await two_nodes_one_leader(etcd_server, etcd_root)
    try:
        etcd_server.delete(keys.leader)
        deleted_at = etcd_server.revision()

        def settled():
            leaders = [n for n in nodes if n.election.is_leader]
            if len(leaders) != 1 or any(n.election.holder != leaders[0].election.hostname for n in nodes):
                return False
            kv = etcd_server.get_prefix_kvs(keys.leader).get(keys.leader)
            # a new key (not the deleted one, which the nodes may still show), on the leader's lease
            return kv is not None and kv[2] > deleted_at and kv[1] == leaders[0].election.lease

        await in_etcd(settled, message="one leader again, holding a new key, seen by both")
    finally:
        for n in nodes:
            await n.stop()


@pytest_twisted.ensureDeferred
async def test_bad_source_values_are_reported_and_the_rest_published(etcd_server, etcd_root):
    keys = Keys(etcd_root)
    etcd_server.put(keys.deployd_leader, "no-port-here")
    etcd_server.put(keys.swarm_leader, "10.2.0.1:2376")
    node = Node(etcd_server, etcd_root, "n1").start()
    try:
        await in_etcd(lambda: published(etcd_server, keys.domains + "swarm.lain"), message="swarm.lain")
        await eventually(lambda: keys.deployd_leader in node.tasks.invalid_keys, message="reported")
        assert "not IP:PORT" in node.tasks.invalid_keys[keys.deployd_leader]
        assert published(etcd_server, keys.domains + "deployd.lain") is None
        etcd_server.put(keys.deployd_leader, "10.2.0.2:9003")
        await in_etcd(lambda: published(etcd_server, keys.domains + "deployd.lain") == {
            "ips": ["10.2.0.2"], "type": ""}, message="fixed value published")
        assert node.tasks.invalid_keys == {}
    finally:
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_tinydns_zones_follow_the_registered_workers(etcd_server, etcd_root):
    keys = Keys(etcd_root)
    lain, own = keys.domain_servers + "lain", keys.domain_servers + "example.lain"
    node = Node(etcd_server, etcd_root, "n1").start()
    try:
        await eventually(lambda: node.election.is_leader, message="leader")
        etcd_server.put(keys.tinydns_workers + "10.0.0.2:5353", "n2")
        etcd_server.put(keys.tinydns_workers + "10.0.0.1:53", "n1")
        etcd_server.put(keys.tinydns_workers + "garbage", "n3")
        want = {"servers": ["10.0.0.1#53", "10.0.0.2#5353"]}
        await in_etcd(lambda: published(etcd_server, lain) == want and published(etcd_server, own) == want,
                         message="both zones")
        assert keys.tinydns_workers + "garbage" in node.tasks.invalid_keys

        etcd_server.delete(keys.tinydns_workers + "10.0.0.2:5353")
        await in_etcd(lambda: published(etcd_server, lain) == {"servers": ["10.0.0.1#53"]}, message="shrunk")
        etcd_server.delete(keys.tinydns_workers + "10.0.0.1:53")
        await sleep(0.5)
        assert published(etcd_server, lain) == {"servers": ["10.0.0.1#53"]}, \
            "no worker left: the last list stays rather than leaking .lain names upstream"

        etcd_server.put(lain, '{"servers": ["10.9.9.9#53"]}')  # a hand edit is put right
        etcd_server.put(keys.tinydns_workers + "10.0.0.3:53", "n1")
        await in_etcd(lambda: published(etcd_server, lain) == {"servers": ["10.0.0.3#53"]}, message="restored")
    finally:
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_tinydns_records_come_from_the_whole_cluster(etcd_server, etcd_root):
    """[BUG 27]: one writer (the leader), from every node's app keys, not each node's own view."""
    keys = Keys(etcd_root)
    fqdns = keys.tinydns_fqdns
    vip = '{{"app": "{app}", "proc": "{proc}", "ports": [{{"src": "{port}"}}]}}'
    etcd_server.put(keys.vips + "10.5.0.100", vip.format(app="webrouter", proc="worker", port=80))
    etcd_server.put(keys.vips + "0.0.0.0:8080", vip.format(app="hello", proc="web", port=8080))
    etcd_server.put(keys.vips + "10.5.0.200:53", vip.format(app="dns", proc="worker", port=53))
    etcd_server.put(keys.vips + "not-a-key", "{}")  # the VIP part reports it; the records ignore it
    etcd_server.put(keys.app_key("hello", "web", "10.5.0.12", 8080), "n2")
    etcd_server.put(keys.app_key("hello", "web", "10.5.0.11", 8080), "n1")
    etcd_server.put(keys.app_key("hello", "web", "10.5.0.13", 9999), "n3")  # no such key: ignored
    node = Node(etcd_server, etcd_root, "n1", tasks=("webrouter",)).start()
    try:
        expected = {
            fqdns + "webrouter.lain": ["+webrouter.lain:10.5.0.100:300"],
            fqdns + "lain": ["+*.lain:10.5.0.100:300", ".lain:10.5.0.100:a:300"],
            fqdns + "example.lain": ["+*.example.lain:10.5.0.100:300", ".example.lain:10.5.0.100:a:300"],
            fqdns + "hello.lain": ["+hello.lain:10.5.0.11:300", "+hello.lain:10.5.0.12:300"],
            fqdns + "dns.lain": ["+dns.lain:10.5.0.200:300"],
        }

        def records():
            return {k: json.loads(v) for k, v in etcd_server.get_prefix(fqdns).items()}

        await in_etcd(lambda: records() == expected, message="all records")
        etcd_server.delete(keys.app_key("hello", "web", "10.5.0.12", 8080))  # n2 stopped serving hello
        await in_etcd(lambda: records()[fqdns + "hello.lain"] == ["+hello.lain:10.5.0.11:300"], message="shrunk")
        untouched = [fqdns + "dns.lain", fqdns + "hello.lain"]
        before = [mod_revision(etcd_server, key) for key in untouched]
        etcd_server.put(keys.vips + "10.5.0.101", vip.format(app="webrouter", proc="worker", port=80))
        await in_etcd(lambda: len(records()[fqdns + "lain"]) == 4, message="second webrouter VIP")
        await sleep(0.2)
        assert [mod_revision(etcd_server, key) for key in untouched] == before, "untouched records are not rewritten"
    finally:
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_values_are_written_only_when_they_change(etcd_server, etcd_root):
    keys = Keys(etcd_root)
    target = keys.domains + "deployd.lain"
    node = Node(etcd_server, etcd_root, "n1").start()
    try:
        etcd_server.put(keys.deployd_leader, "10.3.0.1:9003")
        await in_etcd(lambda: published(etcd_server, target), message="published")
        first = mod_revision(etcd_server, target)
        etcd_server.put(keys.deployd_leader, "10.3.0.1:9003")  # deployd refreshes its key: same value
        etcd_server.put(keys.swarm_leader, "10.3.0.2:2376")
        await in_etcd(lambda: published(etcd_server, keys.domains + "swarm.lain"), message="swarm.lain")
        await sleep(0.3)
        assert mod_revision(etcd_server, target) == first
    finally:
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_guarded_write_needs_the_leader_key_on_our_lease(etcd_server, etcd_root):
    keys = Keys(etcd_root)
    node = Node(etcd_server, etcd_root, "n1").start()
    try:
        await eventually(lambda: node.election.is_leader, message="leader")
        locks = LeaseLocks(node.client)
        target = keys.domains + "x.lain"
        assert await locks.put_while_held(keys.leader, node.election.lease + 1, target, "{}") == 0
        assert published(etcd_server, target) is None, "a deposed leader writes nothing"
        assert await locks.put_while_held(keys.leader, node.election.lease, target, "{}") == etcd_server.revision()
    finally:
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_a_restarted_leader_waits_for_its_old_key(etcd_server, etcd_root):
    """[BUG 28]: the key says our host name, but it is the old process's lease."""
    keys = Keys(etcd_root)
    lease_out = etcd_server.ctl("lease", "grant", "4").stdout  # "lease 694d... granted with TTL(4s)"
    lease_id = lease_out.split()[1]
    etcd_server.ctl("put", "--lease", lease_id, keys.leader, "n1")
    node = Node(etcd_server, etcd_root, "n1").start()
    try:
        await eventually(lambda: node.election.holder == "n1", message="sees the old key")
        await sleep(0.8)
        assert not node.election.is_leader, "the old incarnation's key is not ours"
        await eventually(lambda: node.election.is_leader, timeout=10, message="leader once the old key expired")
    finally:
        await node.stop()


def test_daemon_publishes_deployd_lain_and_serves_it(etcd_server, etcd_root, upstream):
    """End to end: twistd networkd --deployd --tinydns; deployd's key put, dig answers deployd.lain;
    a tinydns worker registered (a stub on 127.0.0.x:53), dig gets .lain names from it."""
    keys = Keys(etcd_root)
    port, api = free_port(), free_port()
    workdir = tempfile.mkdtemp(prefix="networkd-leader-")
    hosts, resolv = os.path.join(workdir, "hosts"), os.path.join(workdir, "resolv.conf")
    open(hosts, "w").close()
    open(resolv, "w").close()
    daemon = Daemon([
        "--etcd", etcd_server.endpoint, "--etcd-root", etcd_root, "--dns-listen", f"127.0.0.1:{port}",
        "--api-listen", f"127.0.0.1:{api}", "--no-vips", "--no-resolv-conf", "--node-ip", "10.1.1.1",
        "--hosts-file", hosts, "--resolv-conf", resolv, "--hostname", "leader-node", "--deployd", "--tinydns",
    ]).start()
    try:
        daemon.wait_for_log("this node is the networkd leader")
        etcd_server.put(keys.deployd_leader, "10.4.0.7:9003")
        deadline = time.monotonic() + 10
        while dig_answers(port, "deployd.lain") != ["deployd.lain. 60 IN A 10.4.0.7"]:
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
        upstream.records["db.prod.lain"] = ["10.4.0.8"]
        etcd_server.put(keys.app_key("tinydns", "worker", upstream.host, 53), "some-node")
        while dig_answers(port, "db.prod.lain") != ["db.prod.lain. 300 IN A 10.4.0.8"]:
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
        import urllib.request

        status = json.load(urllib.request.urlopen(f"http://127.0.0.1:{api}/v1/status", timeout=5))
        assert status["leader"]["is_leader"] is True and status["leader"]["holder"] == "leader-node"
        assert status["leader"]["published"] == {
            keys.domains + "deployd.lain": '{"ips": ["10.4.0.7"], "type": ""}',
            keys.domain_servers + "lain": json.dumps({"servers": [f"{upstream.host}#53"]}),
        }
    finally:
        assert daemon.stop() in (0, -signal.SIGTERM), daemon.log()
    assert "Traceback" not in daemon.log()
    assert keys.leader not in etcd_server.get_prefix(keys.leader), "resigned on SIGTERM"


@pytest_twisted.ensureDeferred
async def test_leadership_and_publishing_survive_an_etcd_restart(private_etcd):
    root = "/restart"
    keys = Keys(root)
    nodes = await two_nodes_one_leader(private_etcd, root)
    try:
        private_etcd.stop()
        await sleep(3)  # longer than the lease TTL (2 s)
        private_etcd.start()
        private_etcd.put(keys.deployd_leader, "10.6.0.1:9003")
        await in_etcd(lambda: published(private_etcd, keys.domains + "deployd.lain") == {
            "ips": ["10.6.0.1"], "type": ""}, timeout=15, message="published after the restart")

        def one_leader_holding_the_key():
            leaders = [n for n in nodes if n.election.is_leader]
            out = json.loads(private_etcd.ctl("get", keys.leader, "-w", "json").stdout)
            return (len(leaders) == 1 and out.get("kvs")
                    and int(out["kvs"][0]["lease"]) == leaders[0].election.lease)

        await in_etcd(one_leader_holding_the_key, timeout=10, message="one leader, holding the key")
    finally:
        for n in nodes:
            await n.stop()
