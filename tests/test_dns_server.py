"""The DNS service in-process, against real etcd, stub upstreams and real dig."""

from __future__ import annotations

import os
import random
import socket
import struct
import tempfile
import time

import pytest
import pytest_twisted
from dnslib import QTYPE, RCODE, DNSRecord
from twisted.internet import defer, reactor, threads

from networkd.dns import wire
from networkd.dns.service import DnsBindError, DnsService
from networkd.etcd.client import EtcdClient
from networkd.etcd.reflector import PrefixWatcher
from networkd.keys import Keys
from networkd.options import ListenAddress, parse_endpoints
from tests.support.dnsstub import StubServer, dig_answers, query
from tests.support.ports import free_port
from tests.support.waiting import eventually, sleep


class Env:
    """A DnsService on 127.0.0.1:<free port> fed by real etcd watchers."""

    def __init__(self, etcd_server, root, upstreams, hosts="", allow=(), node_ip="10.1.1.1", cache_size=1000):
        self.etcd = etcd_server
        self.keys = Keys(root)
        self.dir = tempfile.mkdtemp(prefix="networkd-dns-")
        self.hosts_path = os.path.join(self.dir, "hosts")
        self.write_hosts(hosts)
        self.upstreams = [(u.host, 53) for u in upstreams]
        self.port = free_port()
        self.client = EtcdClient(parse_endpoints(etcd_server.endpoint), call_timeout=2.0)
        self.watchers = [PrefixWatcher(self.client, p, reactor)
                         for p in (self.keys.domains, self.keys.domain_servers, self.keys.vips)]
        self.dns = DnsService(
            reactor, listen=ListenAddress("127.0.0.1", self.port), ttl=60, cache_size=cache_size, allow=allow,
            node_ip=node_ip, hosts_file=self.hosts_path,
            domains=self.watchers[0], domain_servers=self.watchers[1], vips=self.watchers[2],
            domains_prefix=self.keys.domains, domain_servers_prefix=self.keys.domain_servers,
            poll_interval=0.1,
        )

    def write_hosts(self, text):
        tmp = self.hosts_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.hosts_path)

    async def start(self):
        for w in self.watchers:
            w.startService()
        self.dns.startService()
        self.dns.set_upstreams(self.upstreams)  # what the resolv.conf guardian does
        await self.dns.when_listening()
        await eventually(lambda: all(w.snapshot is not None for w in self.watchers), message="first snapshots")
        return self

    async def stop(self):
        await self.dns.stopService()
        for w in self.watchers:
            await w.stopService()
        await self.client.close()

    def put_domain(self, name, value):
        self.etcd.put(self.keys.domains + name, value)

    async def q(self, name, qtype="A", **kw):
        return await threads.deferToThread(query, self.port, name, qtype, **kw)

    async def dig(self, *args):
        return await threads.deferToThread(dig_answers, self.port, *args)

    async def domains_seen(self, name):
        await eventually(lambda: name in self.dns.resolver.zone.exact or name.lstrip("*.") in self.dns.resolver.zone.wildcards,
                         message=f"{name} in the zone")


def answers(reply):
    return sorted(str(rr.rdata) for rr in reply.rr)


@pytest_twisted.ensureDeferred
async def test_local_names_exact_wildcards_and_case(etcd_server, etcd_root, upstream):
    env = await Env(etcd_server, etcd_root, [upstream]).start()
    try:
        env.put_domain("exact.lain", '{"ips": ["10.0.0.1"]}')
        env.put_domain("*.lain", '{"ips": ["10.0.0.9"]}')
        env.put_domain("*.web.lain", '{"ips": ["10.0.0.8"]}')
        env.put_domain("*.web.exact.lain", '{"ips": ["10.0.0.7"]}')
        await env.domains_seen("*.web.exact.lain")
        expect = {
            "exact.lain": "10.0.0.1",  # exact
            "lain": "10.0.0.9",  # *.lain answers the bare domain (BUG 31)
            "one.lain": "10.0.0.9",  # wildcard depth 1
            "a.b.c.lain": "10.0.0.9",  # depth 3
            "x.web.lain": "10.0.0.8",  # longest wildcard wins
            "a.b.c.web.lain": "10.0.0.8",
            "q.web.exact.lain": "10.0.0.7",
        }
        for name, ip in expect.items():
            assert await env.dig(name, "A") == [f"{name}. 60 IN A {ip}"], name
        # exact beats a wildcard that also matches
        assert await env.dig("exact.lain") == ["exact.lain. 60 IN A 10.0.0.1"]
        # case-insensitive, the answer echoes the query's case
        assert await env.dig("ExAcT.LaIn") == ["ExAcT.LaIn. 60 IN A 10.0.0.1"]
        assert await env.dig("Deep.X.Web.LAIN") == ["Deep.X.Web.LAIN. 60 IN A 10.0.0.8"]
        # flags: authoritative, recursion available; nothing went upstream
        reply = await env.q("exact.lain")
        assert reply.header.aa == 1 and reply.header.ra == 1 and reply.header.rcode == RCODE.NOERROR
        assert upstream.queries == []
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_nodata_with_soa_for_missing_family_and_other_types(etcd_server, etcd_root, upstream):
    env = await Env(etcd_server, etcd_root, [upstream]).start()
    try:
        env.put_domain("v4.lain", '{"ips": ["10.0.0.1"]}')
        env.put_domain("v6.lain", '{"ips": ["fd00::6"]}')
        await env.domains_seen("v6.lain")
        for name, qtype in (("v4.lain", "AAAA"), ("v6.lain", "A"), ("v4.lain", "MX"), ("v4.lain", "TXT")):
            for edns in (False, True):
                reply = await env.q(name, qtype, edns=edns)
                assert reply.header.rcode == RCODE.NOERROR, (name, qtype)
                assert reply.rr == [], f"{name} {qtype}: no answer, and never ::ffff:a.b.c.d (BUG 33)"
                assert [QTYPE[a.rtype] for a in reply.auth] == ["SOA"]
                assert reply.header.aa == 1
                assert bool(reply.ar) == edns, "an OPT in the answer only if the query had one"
        assert answers(await env.q("v6.lain", "AAAA")) == ["fd00::6"]
        assert upstream.queries == [], "local names are never forwarded"
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_types_node_and_webrouter_follow_the_vips(etcd_server, etcd_root, upstream):
    env = await Env(etcd_server, etcd_root, [upstream], node_ip="10.1.1.1").start()
    try:
        env.put_domain("node.lain", '{"type": "node"}')
        env.put_domain("webrouter.lain", '{"type": "webrouter"}')
        etcd_server.put(env.keys.vips + "10.2.0.1", '{"app": "webrouter", "proc": "worker", "ports": [{"src": "80"}]}')
        etcd_server.put(env.keys.vips + "10.2.0.2", '{"app": "hello", "proc": "web"}')
        await env.domains_seen("webrouter.lain")
        assert answers(await env.q("node.lain")) == ["10.1.1.1"]
        await eventually(lambda: env.dns.resolver.zone.exact["webrouter.lain"].ips == ("10.2.0.1",))
        assert answers(await env.q("webrouter.lain")) == ["10.2.0.1"]
        etcd_server.put(env.keys.vips + "0.0.0.0:8080", '{"app": "webrouter"}')
        etcd_server.put(env.keys.vips + "10.2.0.3:443", '{"app": "webrouter"}')
        await eventually(lambda: len(env.dns.resolver.zone.exact["webrouter.lain"].ips) == 3)
        assert answers(await env.q("webrouter.lain")) == ["10.1.1.1", "10.2.0.1", "10.2.0.3"]

        # A VIP of another app changes nothing here: the zone (and its hot answers) stay.
        zone, hot = env.dns.resolver.zone, len(env.dns.resolver.hot_local)
        assert hot > 0
        etcd_server.put(env.keys.vips + "10.2.0.9", '{"app": "hello", "proc": "web", "ports": [{"src": "80"}]}')
        await eventually(lambda: "10.2.0.9" in env.watchers[2].snapshot.values)
        await sleep(0.05)
        assert env.dns.resolver.zone is zone and len(env.dns.resolver.hot_local) == hot
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_hosts_file_is_served_and_reread(etcd_server, etcd_root, upstream):
    env = await Env(etcd_server, etcd_root, [upstream], hosts="10.7.0.1 db.internal db\n::1 localhost\n").start()
    try:
        assert answers(await env.q("db")) == ["10.7.0.1"]
        assert answers(await env.q("DB.internal")) == ["10.7.0.1"]
        assert answers(await env.q("localhost", "AAAA")) == ["::1"]
        env.write_hosts("10.7.0.2 db\n")  # replaced by rename, as editors and tools do
        await eventually(lambda: "db.internal" not in env.dns.resolver.zone.exact, timeout=3)
        assert answers(await env.q("db")) == ["10.7.0.2"]
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_invalid_keys_are_skipped_and_listed(etcd_server, etcd_root, upstream):
    env = await Env(etcd_server, etcd_root, [upstream]).start()
    try:
        env.put_domain("good.lain", '{"ips": ["10.0.0.1"]}')
        env.put_domain("json.lain", '{"ips": [')
        env.put_domain("ip.lain", '{"ips": ["10.0.0.1", "nope"]}')
        etcd_server.put(env.keys.domain_servers + "zone", '{"servers": ["1.2.3.4:53"]}')
        await eventually(lambda: len(env.dns.invalid_keys) == 3)
        assert set(env.dns.invalid_keys) == {env.keys.domains + "json.lain", env.keys.domains + "ip.lain",
                                             env.keys.domain_servers + "zone"}
        assert answers(await env.q("good.lain")) == ["10.0.0.1"]
        view = env.dns.config_view()
        assert ("good.lain", ("10.0.0.1",)) in view.exact
        assert view.nameservers == (f"{upstream.host}:53",)
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_domain_servers_zone_goes_only_to_its_server(etcd_server, etcd_root, upstream):
    zone_server = StubServer(port=0)
    zone_server.records["svc.tiny.lain"] = ["10.3.0.1"]
    env = await Env(etcd_server, etcd_root, [upstream]).start()
    try:
        etcd_server.put(env.keys.domain_servers + "Tiny.Lain",
                        f'{{"servers": ["{zone_server.host}#{zone_server.port}"]}}')
        await eventually(lambda: env.dns.resolver.forward_zones.zones)
        assert answers(await env.q("svc.tiny.lain")) == ["10.3.0.1"]
        reply = await env.q("missing.TINY.lain")
        assert reply.header.rcode == RCODE.NXDOMAIN
        assert zone_server.names_asked() == ["svc.tiny.lain", "missing.tiny.lain"]
        assert upstream.queries == [], "zone names never reach the resolv.conf upstreams"
        assert answers(await env.q("example.com")) == ["93.184.216.34"]
        assert upstream.names_asked() == ["example.com"] and len(zone_server.queries) == 2
        assert ("tiny.lain", f"{zone_server.host}:{zone_server.port}") in env.dns.config_view().servers
    finally:
        await env.stop()
        zone_server.close()


@pytest_twisted.ensureDeferred
async def test_upstream_order_and_failover(etcd_server, etcd_root):
    silent = StubServer(mode="silent")
    first = StubServer()
    second = StubServer()
    for stub in (first, second):
        stub.records["example.com"] = ["1.1.1.1" if stub is first else "2.2.2.2"]
        stub.records["other.com"] = ["3.3.3.3"]
    env = await Env(etcd_server, etcd_root, [first, second]).start()
    try:
        assert answers(await env.q("example.com")) == ["1.1.1.1"], "resolv.conf order: the first one is asked"
        assert second.queries == []

        # A dead (silent) first upstream: the answer still comes, well within 1.8 s.
        env.dns.set_upstreams([(silent.host, 53), (second.host, 53)])
        start = time.monotonic()
        reply = await env.q("other.com", timeout=3)
        elapsed = time.monotonic() - start
        assert answers(reply) == ["3.3.3.3"] and elapsed < 1.0, elapsed
        assert silent.names_asked() == ["other.com"] and second.names_asked() == ["other.com"]

        # SERVFAIL from the first upstream: the next one answers.
        first.mode = "servfail"
        env.dns.set_upstreams([(first.host, 53), (second.host, 53)])
        assert answers(await env.q("example.com")) == ["2.2.2.2"]

        # Too many questions in flight: the next one fails at once instead of piling up.
        env.dns.set_upstreams([(silent.host, 53)])
        env.dns.resolver.max_forwards = 1
        waiting = defer.ensureDeferred(env.q("slow1.com", timeout=3))
        await eventually(lambda: env.dns.resolver._inflight, message="slow1.com in flight")
        start = time.monotonic()
        assert (await env.q("slow2.com")).header.rcode == RCODE.SERVFAIL and time.monotonic() - start < 0.5
        assert (await waiting).header.rcode == RCODE.SERVFAIL
        env.dns.resolver.max_forwards = 1000

        # Nobody answers: SERVFAIL within 1.8 s.
        env.dns.set_upstreams([(silent.host, 53)])
        start = time.monotonic()
        reply = await env.q("nobody.com", timeout=3)
        assert reply.header.rcode == RCODE.SERVFAIL and time.monotonic() - start < 1.8
    finally:
        await env.stop()
        for stub in (silent, first, second):
            stub.close()


@pytest_twisted.ensureDeferred
async def test_forged_answers_are_ignored(etcd_server, etcd_root):
    tricky = StubServer(mode="tricky")
    tricky.records["example.com"] = ["93.184.216.34"]
    env = await Env(etcd_server, etcd_root, [tricky]).start()
    try:
        assert answers(await env.q("example.com")) == ["93.184.216.34"]
        assert answers(await env.q("example.com")) == ["93.184.216.34"], "the cache holds the real answer"
    finally:
        await env.stop()
        tricky.close()


@pytest_twisted.ensureDeferred
async def test_cache_positive_negative_and_flush(etcd_server, etcd_root, upstream):
    upstream.nxdomain.add("gone.example.com")
    env = await Env(etcd_server, etcd_root, [upstream]).start()
    try:
        first = await env.q("example.com")
        await sleep(1.1)
        second = await env.q("EXAMPLE.com")
        assert answers(second) == ["93.184.216.34"] and str(second.q.qname) == "EXAMPLE.com."
        assert second.rr[0].ttl < first.rr[0].ttl, "TTLs count down on cache hits"
        third = await env.q("EXAMPLE.com")  # from the pre-packed answer
        await sleep(1.1)
        fourth = await env.q("EXAMPLE.com")  # last second's packed answer, aged again
        assert third.rr[0].ttl == second.rr[0].ttl and fourth.rr[0].ttl < third.rr[0].ttl
        assert str(fourth.q.qname) == "EXAMPLE.com."
        assert upstream.names_asked() == ["example.com"]

        for _ in range(3):
            reply = await env.q("gone.example.com")
            assert reply.header.rcode == RCODE.NXDOMAIN and [QTYPE[a.rtype] for a in reply.auth] == ["SOA"]
        assert upstream.names_asked().count("gone.example.com") == 1, "NXDOMAIN is cached (RFC 2308)"
        # dig sees it too
        assert await env.dig("gone.example.com") == []

        env.dns.set_upstreams([*env.upstreams, ("127.0.0.254", 53)])  # upstream list changes -> cache flushed
        assert len(env.dns.resolver.upstreams) == 2
        await env.q("example.com")
        assert upstream.names_asked().count("example.com") == 2
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_truncated_upstream_answer_is_retried_over_tcp(etcd_server, etcd_root, upstream):
    upstream.big.add("big.example.com")
    env = await Env(etcd_server, etcd_root, [upstream]).start()
    try:
        reply = await env.q("big.example.com", "TXT", tcp=True)
        assert len(reply.rr) == 60
        assert [p for p, n, _ in upstream.queries] == ["udp", "tcp"]
        # Too big for the client's UDP size: TC set, and dig's own TCP retry gets it all.
        reply = await env.q("big.example.com", "TXT", edns=True)
        assert reply.header.tc == 1 and reply.rr == []
        assert len(await env.dig("big.example.com", "TXT")) == 60
        assert len(upstream.queries) == 2, "served from the cache"
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_clients_outside_loopback_are_refused(etcd_server, etcd_root, upstream):
    env = await Env(etcd_server, etcd_root, [upstream]).start()
    try:
        env.put_domain("a.lain", '{"ips": ["10.0.0.1"]}')
        await env.domains_seen("a.lain")
        packet = bytes(DNSRecord.question("a.lain", "A").pack())
        await env.q("a.lain")  # warms the hot path
        await env.q("a.lain")
        proto = env.dns._udp_port
        sent = []
        proto._sendto = lambda data, addr: sent.append((data, addr))
        proto.datagramReceived(packet, ("10.9.8.7", 5000))
        proto.datagramReceived(packet, ("::ffff:127.0.0.1", 5000))
        refused, allowed = (DNSRecord.parse(d) for d, _ in sent)
        assert refused.header.rcode == RCODE.REFUSED and refused.rr == []
        assert allowed.header.rcode == RCODE.NOERROR and answers(allowed) == ["10.0.0.1"]
        assert env.dns.resolver.resolve(packet, "10.9.8.7", udp=False) is not None
        assert DNSRecord.parse(env.dns.resolver.resolve(packet, "10.9.8.7", udp=False)).header.rcode == RCODE.REFUSED
        assert env.dns.resolver.resolve(b"garbage", "10.9.8.7", udp=True) is None, "no FORMERR to strangers"
        assert upstream.queries == []
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_dns_allow_admits_listed_networks(etcd_server, etcd_root, upstream):
    from networkd.options import parse_cidrs
    env = await Env(etcd_server, etcd_root, [upstream], allow=parse_cidrs("10.9.0.0/16", "x")).start()
    try:
        env.put_domain("a.lain", '{"ips": ["10.0.0.1"]}')
        await env.domains_seen("a.lain")
        packet = DNSRecord.question("a.lain", "A").pack()
        assert DNSRecord.parse(env.dns.resolver.resolve(packet, "10.9.8.7", udp=True)).header.rcode == RCODE.NOERROR
        assert DNSRecord.parse(env.dns.resolver.resolve(packet, "10.8.8.7", udp=True)).header.rcode == RCODE.REFUSED
    finally:
        await env.stop()


def _garbage():
    rng = random.Random(7)
    good = DNSRecord.question("a.lain", "A").pack()
    yield b""
    yield b"\x00"
    yield good[:11]
    yield good[:-1]
    yield good[:12] + b"\xc0\x0c" + good[14:]
    yield good[:2] + b"\x80\x00" + good[4:]  # a response
    yield good[:4] + b"\x00\x05" + good[6:]  # 5 questions
    yield good[:10] + b"\x00\x02" + good[12:] + b"\x00\x00\x29\x04\xd0" * 2  # broken additional
    yield good + b"\x00\x00\x29\x10\x00\x00\x01\x00\x00\x00\x00"  # OPT with EDNS version 1 (not counted)
    for _ in range(300):
        yield bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 80)))
    for _ in range(300):
        data = bytearray(good)
        for _ in range(3):
            data[rng.randrange(len(data))] = rng.getrandbits(8)
        yield bytes(data)


@pytest_twisted.ensureDeferred
async def test_garbage_does_not_stop_the_server(etcd_server, etcd_root, upstream):
    env = await Env(etcd_server, etcd_root, [upstream]).start()
    try:
        env.put_domain("a.lain", '{"ips": ["10.0.0.1"]}')
        await env.domains_seen("a.lain")

        def spray():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for data in _garbage():
                    s.sendto(data, ("127.0.0.1", env.port))
            for data in list(_garbage())[:40]:
                with socket.create_connection(("127.0.0.1", env.port), timeout=2) as c:
                    c.sendall(len(data).to_bytes(2, "big") + data + b"\xff\xff\x00")
            # an oversize length prefix and a half-sent message, then hang up
            with socket.create_connection(("127.0.0.1", env.port), timeout=2) as c:
                c.sendall(b"\xff\xff" + b"x" * 1000)

        await threads.deferToThread(spray)
        await sleep(0.3)
        assert answers(await env.q("a.lain")) == ["10.0.0.1"]
        assert answers(await env.q("a.lain", tcp=True)) == ["10.0.0.1"]
        reply = DNSRecord.parse(env.dns.resolver.resolve(
            DNSRecord.question("a.lain").pack()[:-2] + b"", "127.0.0.1", udp=True))
        assert reply.header.rcode == RCODE.FORMERR
        assert env.dns.listening()
        axfr = await env.q("a.lain", "AXFR", tcp=True)
        assert axfr.header.rcode == RCODE.NOTIMP
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_tcp_idle_timeout_and_connection_cap(etcd_server, etcd_root, upstream):
    env = await Env(etcd_server, etcd_root, [upstream], hosts="10.7.0.1 db\n").start()
    try:
        factory = env.dns._tcp_port.factory
        factory.idle_timeout = 0.3
        factory.max_connections = 2

        def closed_by_server(c) -> bool:
            """An idle or surplus connection ends with FIN or, when aborted, RST."""
            try:
                return c.recv(10) == b""
            except ConnectionResetError:
                return True

        def idle():
            with socket.create_connection(("127.0.0.1", env.port), timeout=3) as c:
                start = time.monotonic()
                assert closed_by_server(c)
                return time.monotonic() - start

        assert await threads.deferToThread(idle) < 2

        def over_the_cap():
            held = [socket.create_connection(("127.0.0.1", env.port), timeout=3) for _ in range(2)]
            try:
                time.sleep(0.1)
                with socket.create_connection(("127.0.0.1", env.port), timeout=3) as extra:
                    data = DNSRecord.question("db").pack()
                    extra.sendall(struct.pack(">H", len(data)) + data)
                    length = struct.unpack(">H", extra.recv(2, socket.MSG_WAITALL))[0]
                    reply = DNSRecord.parse(extra.recv(length, socket.MSG_WAITALL))
                    return answers(reply), closed_by_server(held[0])
            finally:
                for c in held:
                    c.close()

        served, oldest_closed = await threads.deferToThread(over_the_cap)
        assert served == ["10.7.0.1"] and oldest_closed, "over the cap, the idlest connection makes room"
        await eventually(lambda: factory.connections == 0, message="closed connections are no longer counted")
        assert answers(await env.q("db", tcp=True)) == ["10.7.0.1"], "under the cap again"
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_listens_on_ipv6_loopback(etcd_server, etcd_root, upstream):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    env = Env(etcd_server, etcd_root, [upstream], hosts="10.7.0.1 db\n")
    env.dns.listen = ListenAddress("::1", env.port)
    try:
        await env.start()
    except Exception as e:
        await env.stop()
        pytest.skip(f"no ::1 here: {e}")
    try:
        for _ in range(2):  # the second one is a hot answer
            assert answers(await env.q("db", host="::1")) == ["10.7.0.1"]
        assert answers(await env.q("db", host="::1", tcp=True)) == ["10.7.0.1"]
        assert env.dns.stats.queries[("NOERROR", "local")] == 3
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_bind_failure_is_reported(etcd_server, etcd_root, upstream):
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind(("127.0.0.1", 0))
    env = Env(etcd_server, etcd_root, [upstream])
    env.dns.listen = ListenAddress("127.0.0.1", blocker.getsockname()[1])
    waiting = env.dns.when_listening()
    try:
        with pytest.raises(SystemExit, match="DNS cannot listen on"):
            env.dns.privilegedStartService()
        with pytest.raises(DnsBindError):
            await waiting
        with pytest.raises(DnsBindError):
            env.dns.startService()
        with pytest.raises(DnsBindError):
            await env.dns.when_listening()
        assert not env.dns.listening()
    finally:
        blocker.close()
        await env.client.close()


@pytest_twisted.ensureDeferred
async def test_hot_path_answers_equal_slow_path(etcd_server, etcd_root, upstream):
    """A query answered from pre-packed bytes is byte-identical to the full path's answer."""
    env = await Env(etcd_server, etcd_root, [upstream]).start()
    try:
        env.put_domain("a.lain", '{"ips": ["10.0.0.1", "fd00::1"]}')
        await env.domains_seen("a.lain")
        for name, qtype, edns in (("a.lain", "A", False), ("A.Lain", "AAAA", True), ("example.com", "A", True)):
            await env.q(name, qtype, edns=edns)  # local: slow path; forwarded: fills the cache
            slow = await env.q(name, qtype, edns=edns)  # local: hot; forwarded: from the cache, fills hot
            hot = await env.q(name, qtype, edns=edns)
            slow.header.id = hot.header.id
            assert slow.pack() == hot.pack() and hot.rr
        assert wire.question_key(bytes(DNSRecord.question("a.lain").pack())) in env.dns.resolver.hot_local
        assert len(env.dns.resolver.hot_cached) == 2, "keyed by the question and by the bytes after the ID"
        stats = env.dns.stats
        assert stats.queries[("NOERROR", "local")] == 6, "hot answers are counted too"
        assert stats.queries[("NOERROR", "forward")] == 1 and stats.queries[("NOERROR", "cache")] == 2
        assert stats.upstream_latency_count == 1 and stats.cache_misses == 1
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_no_upstream_at_all_answers_servfail_at_once(etcd_server, etcd_root):
    """An empty resolv.conf (or one naming only us): the client gets SERVFAIL now, not a timeout."""
    env = await Env(etcd_server, etcd_root, []).start()
    try:
        for attempt in range(2):  # the first asker, and one served from the cached failure
            started = time.monotonic()
            reply = await env.q(f"nowhere{attempt}.example.com", timeout=3.0)
            assert reply.header.rcode == 2, f"SERVFAIL, got rcode {reply.header.rcode}"
            assert time.monotonic() - started < 0.5, "at once"
    finally:
        await env.stop()
