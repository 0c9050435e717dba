"""DNS building blocks without sockets: zone lookup, parsers, wire, cache."""

from __future__ import annotations

import pytest
from dnslib import EDNS0, QTYPE, RCODE, RR, SOA, A, DNSRecord
from twisted.internet.task import Clock

from networkd.dns import wire
from networkd.dns.cache import Cache, render
from networkd.dns.hostsfile import parse_hosts
from networkd.dns.upstreams import parse_forward_zones, without_self
from networkd.dns.zone import build_zone, webrouter_ips


def zone_of(domains, hosts=(), node_ip="10.1.1.1", webrouters=()):
    return build_zone(dict(domains), list(hosts), node_ip=node_ip, webrouters=tuple(webrouters), ttl=60,
                      key_prefix="/lain/config/domains/")


ips = lambda *a: '{"ips": [%s]}' % ",".join(f'"{x}"' for x in a)


@pytest.mark.parametrize("name, expected", [
    ("exact.lain", ("exact.lain", ("10.0.0.1",))),
    ("lain", ("lain", ("10.0.0.9",))),  # *.lain answers lain itself
    ("a.lain", ("lain", ("10.0.0.9",))),
    ("a.b.c.lain", ("lain", ("10.0.0.9",))),  # any depth
    ("x.web.lain", ("web.lain", ("10.0.0.8",))),  # the longest wildcard wins
    ("y.x.web.lain", ("web.lain", ("10.0.0.8",))),
    ("web.lain", ("web.lain", ("10.0.0.8",))),
    ("mixed.lain", ("mixed.lain", ("10.0.0.7",))),  # keys are lower-cased
    ("other.com", None),
    ("notlain", None),
])
def test_zone_lookup(name, expected):
    zone, invalid = zone_of({
        "exact.lain": ips("10.0.0.1"),
        "*.lain": ips("10.0.0.9"),
        "*.web.lain": ips("10.0.0.8"),
        "MiXeD.Lain": ips("10.0.0.7"),
    })
    assert invalid == {}
    found = zone.lookup(name)
    assert (found and (found[0], found[1].ips)) == expected


def test_exact_beats_wildcard_and_etcd_beats_hosts():
    zone, _ = zone_of({"*.lain": ips("10.0.0.9"), "a.lain": ips("10.0.0.1")},
                      hosts=[("a.lain", "10.5.5.5"), ("h.lain", "10.6.6.6")])
    assert zone.lookup("a.lain")[1].ips == ("10.0.0.1",)
    assert zone.lookup("h.lain")[1].ips == ("10.6.6.6",)  # hosts file names are exact names
    assert zone.lookup("z.lain")[1].ips == ("10.0.0.9",)


def test_types_node_and_webrouter():
    vips = {
        "10.2.0.1": '{"app": "webrouter", "proc": "worker"}',
        "10.2.0.2": '{"app": "hello"}',
        "0.0.0.0:80": '{"app": "webrouter"}',
        "10.2.0.3:8080": '{"app": "webrouter"}',
        "10.2.0.1:443": '{"app": "webrouter"}',  # duplicate IP
        "10.2.0.4": "garbage",
    }
    routers = webrouter_ips(vips, "10.1.1.1")
    assert sorted(routers) == ["10.1.1.1", "10.2.0.1", "10.2.0.3"]
    zone, invalid = zone_of({"n.lain": '{"type": "node"}', "w.lain": '{"type": "webrouter", "ips": []}'},
                            webrouters=routers)
    assert invalid == {}
    assert zone.lookup("n.lain")[1].ips == ("10.1.1.1",)
    assert sorted(zone.lookup("w.lain")[1].ips) == ["10.1.1.1", "10.2.0.1", "10.2.0.3"]


def test_invalid_values_are_skipped_and_named():
    zone, invalid = zone_of({
        "good.lain": ips("10.0.0.1"),
        "json.lain": "{not json",
        "ip.lain": ips("10.0.0.300"),
        "bad_-.na me": ips("10.0.0.2"),
        "list.lain": "[1, 2]",
        "type.lain": '{"type": "mystery"}',
    })
    assert set(invalid) == {f"/lain/config/domains/{k}" for k in
                            ("json.lain", "ip.lain", "bad_-.na me", "list.lain", "type.lain")}
    assert "bad JSON" in invalid["/lain/config/domains/json.lain"]
    assert "10.0.0.300" in invalid["/lain/config/domains/ip.lain"]
    assert zone.lookup("good.lain")[1].ips == ("10.0.0.1",)
    assert zone.lookup("ip.lain") is None


def test_hosts_file_parsing():
    text = "# comment\n127.0.0.1 localhost loc\n::1 localhost ip6-localhost # inline\n\n10.0.0.5\tTab.Host\nnot-an-ip x\n"
    assert parse_hosts(text) == [
        ("localhost", "127.0.0.1"), ("loc", "127.0.0.1"), ("localhost", "::1"), ("ip6-localhost", "::1"),
        ("tab.host", "10.0.0.5"),
    ]
    zone, _ = zone_of({}, hosts=parse_hosts(text))
    assert zone.lookup("localhost")[1].ips == ("127.0.0.1", "::1")


def test_without_self_drops_our_address_and_keeps_order():
    servers = [("10.0.0.2", 53), ("127.0.0.1", 53), ("fe80::1%eth0", 53), ("10.0.0.1", 53), ("10.0.0.2", 53)]
    assert without_self(servers, "127.0.0.1", 53) == [("10.0.0.2", 53), ("fe80::1%eth0", 53), ("10.0.0.1", 53)]
    assert without_self(servers, "0.0.0.0", 53)[0] == ("10.0.0.2", 53)
    assert ("127.0.0.1", 53) not in without_self(servers, "0.0.0.0", 53)
    assert ("127.0.0.1", 53) in without_self(servers, "127.0.0.1", 5353)


def test_forward_zones():
    zones, invalid = parse_forward_zones({
        "lain": '{"servers": ["10.0.0.20#53", "10.0.0.21#5353"]}',
        "Sub.Lain": '{"servers": ["10.0.0.30"]}',
        "bad": '{"servers": ["10.0.0.1:53"]}',
        "worse": "[]",
    }, "/lain/config/domain_servers/")
    assert set(invalid) == {"/lain/config/domain_servers/bad", "/lain/config/domain_servers/worse"}
    assert zones.servers_for("a.lain") == (("10.0.0.20", 53), ("10.0.0.21", 5353))
    assert zones.servers_for("lain") == (("10.0.0.20", 53), ("10.0.0.21", 5353))
    assert zones.servers_for("x.sub.lain") == (("10.0.0.30", 53),)
    assert zones.servers_for("notlain") is None


def test_question_key_ignores_cookie_but_not_do_or_case():
    def packet(name, do=False, cookie=b"", edns=True):  # noqa: E306
        q = DNSRecord.question(name, "A")
        q.header.id = 1234
        if edns:
            opts = []
            if cookie:
                from dnslib import EDNSOption
                opts = [EDNSOption(10, cookie)]
            q.add_ar(EDNS0(udp_len=4096, flags="do" if do else "", opts=opts))
        return q.pack()

    base = wire.question_key(packet("a.lain", cookie=b"12345678"))
    assert base == wire.question_key(packet("a.lain", cookie=b"abcdefgh"))
    assert base != wire.question_key(packet("a.lain", do=True))
    assert base != wire.question_key(packet("A.lain"))
    assert base != wire.question_key(packet("a.lain", edns=False))
    assert wire.question_key(b"\x00" * 11) is None
    assert wire.question_key(packet("a.lain", edns=False) + b"junk") is None, "a plain query with trailing bytes is unusual"


@pytest.mark.parametrize("data, rcode", [
    (b"", None), (b"\x01\x02", None), (b"\x00" * 12, wire.FORMERR),
    (b"\x12\x34\x81\x00" + b"\x00\x01" + b"\x00" * 6 + b"\x01a\x00\x00\x01\x00\x01", None),  # a response
    (b"\x12\x34\x28\x00" + b"\x00\x01" + b"\x00" * 6 + b"\x01a\x00\x00\x01\x00\x01", wire.NOTIMP),  # UPDATE
    (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x3fab", wire.FORMERR),  # label past the end
    (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01", wire.FORMERR),  # pointer loop
])
def test_parse_query_rejects_garbage(data, rcode):
    with pytest.raises(wire.QueryError) as e:
        wire.parse_query(data)
    assert e.value.rcode == rcode


def upstream_reply(name="x.com", ttl=300, rcode=0, soa_ttl=None, edns=True):
    q = DNSRecord.question(name, "A")
    if edns:
        q.add_ar(EDNS0(udp_len=1232))
    r = q.reply()
    r.header.rcode = rcode
    if rcode == 0 and soa_ttl is None:
        r.add_answer(RR(name, QTYPE.A, ttl=ttl, rdata=A("1.2.3.4")))
    if soa_ttl is not None:
        r.add_auth(RR("com", QTYPE.SOA, ttl=soa_ttl[0], rdata=SOA("a.", "b.", (1, 2, 3, 4, soa_ttl[1]))))
    return r.pack()


def test_cache_ttl_decrements_and_expires():
    clock = Clock()
    cache = Cache(10, clock)
    answer = wire.inspect_answer(upstream_reply(ttl=100))
    key = (b"\x01x\x03com\x00", 1, 1, False)
    cache.put_answer(key, answer)
    clock.advance(30)
    query = wire.parse_query(DNSRecord.question("X.com", "A").pack())
    out = DNSRecord.parse(render(cache.get(key), query, clock.seconds()))
    assert out.rr[0].ttl == 70
    assert str(out.q.qname) == "X.com."  # the client's case
    assert out.ar == [], "no OPT for a client without EDNS, even though the upstream sent one"
    clock.advance(71)
    assert cache.get(key) is None


def test_negative_caching_uses_the_soa_and_servfail_never_hides_an_answer():
    clock = Clock()
    cache = Cache(10, clock)
    nx = wire.inspect_answer(upstream_reply(rcode=3, soa_ttl=(900, 40)))
    assert cache.put_answer("nx", nx).expires_at == 40
    assert cache.put_answer("nosoa", wire.inspect_answer(upstream_reply(rcode=3))) is None
    assert cache.put_answer("sf", wire.inspect_answer(upstream_reply(rcode=2))) is None
    cache.put_answer("good", wire.inspect_answer(upstream_reply(ttl=100)))
    cache.put_failure("good")
    assert not cache.get("good").failure
    cache.put_failure("bad")
    assert cache.get("bad").failure
    clock.advance(3)
    assert cache.get("bad") is None, "SERVFAIL is kept a few seconds at most"


def test_cache_is_a_bounded_lru():
    clock = Clock()
    cache = Cache(3, clock)
    answer = wire.inspect_answer(upstream_reply())
    for key in "abc":
        cache.put_answer(key, answer)
    cache.get("a")
    cache.put_answer("d", answer)
    assert [k for k in "abcd" if cache.get(k)] == ["a", "c", "d"]


def test_inspect_answer_rejects_garbage():
    good = upstream_reply()
    for bad in (good[:20], good[:12] + b"\xff" * 5, b"\x00" * 5):
        with pytest.raises(wire.WireError):
            wire.inspect_answer(bad)
    assert RCODE  # dnslib imported for building the replies


def test_a_silent_upstream_goes_last_and_gets_another_chance_later():
    from networkd.dns.forward import ServerHealth

    clock = Clock()
    health = ServerHealth(clock)
    a, b = ("10.0.0.1", 53), ("10.0.0.2", 53)
    assert health.order([a, b]) == [a, b]
    for _ in range(3):
        health.missed(a)
    assert health.order([a, b]) == [b, a]
    clock.advance(31)
    assert health.order([a, b]) == [a, b], "retried after a while"
    health.missed(a)
    assert health.order([a, b]) == [b, a], "one more miss and it is last again"
    health.answered(a, 0.001)
    assert health.order([a, b]) == [a, b]
    assert health.stagger(a) == 0.03 and health.stagger(b) == 0.2


class FakeReactor(Clock):
    """A driven clock that keeps the readers added to it (the forwarder's upstream sockets)."""

    def __init__(self):
        super().__init__()
        self.readers = []

    def addReader(self, reader):
        self.readers.append(reader)

    def removeReader(self, reader):
        pass


def test_forwarder_staggers_then_backs_off_and_gives_up_in_time():
    """Drive one exchange with a fake clock against two silent servers."""
    import socket as socketlib

    from networkd.dns.forward import Forwarder, UpstreamFailed
    from networkd.views import DnsStats

    silent = [socketlib.socket(socketlib.AF_INET, socketlib.SOCK_DGRAM) for _ in range(2)]
    try:
        for s in silent:
            s.bind(("127.0.0.1", 0))
        servers = [s.getsockname() for s in silent]
        reactor = FakeReactor()
        forwarder = Forwarder(reactor, DnsStats(), budget=1.6)
        outcome = []
        d = forwarder.query(b"\x01x\x03com\x00\x00\x01\x00\x01", False, servers)
        d.addBoth(outcome.append)
        sends = []
        for _ in range(170):
            sends.append(len(reactor.readers))
            reactor.advance(0.01)
        # t=0 first server, t=0.2 second server, then re-sends at 0.6 and 1.0 (backing off) on the
        # same two sockets (test_dns_hostile counts the datagrams), give up at 1.6
        assert (sends[1], sends[25], sends[65], sends[105], sends[-1]) == (1, 2, 2, 2, 2), sends
        assert isinstance(outcome[0].value, UpstreamFailed)
        assert all(attempt.done for attempt in reactor.readers), "every socket is closed"
    finally:
        for s in silent:
            s.close()


def test_past_its_budget_an_exchange_waits_for_a_late_answer_only_so_long():
    """Silent servers: the asker fails at 1.6 s, the sockets stay open for a
    late answer until 5 s after the question, then all are closed."""
    import socket as socketlib

    from networkd.dns.forward import LATE_LIMIT, Forwarder
    from networkd.views import DnsStats

    silent = socketlib.socket(socketlib.AF_INET, socketlib.SOCK_DGRAM)
    try:
        silent.bind(("127.0.0.1", 0))
        reactor = FakeReactor()
        forwarder = Forwarder(reactor, DnsStats(), budget=1.6)
        outcome, late = [], []
        forwarder.query(b"\x01x\x03com\x00\x00\x01\x00\x01", False, [silent.getsockname()], late.append
                        ).addBoth(outcome.append)
        reactor.advance(1.7)
        assert outcome and not any(a.done for a in reactor.readers) and forwarder.lingering == 1
        reactor.advance(LATE_LIMIT - 1.6)
        assert all(a.done for a in reactor.readers) and forwarder.lingering == 0 and late == []
    finally:
        silent.close()
