"""The slow path's parts without sockets, on a driven clock: who is admitted,
the hot answers and their re-ageing, the resolver chain."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from dnslib import EDNS0, QTYPE, RCODE, RR, A, DNSRecord
from twisted.internet import defer
from twisted.internet.task import Clock

from networkd.dns import wire
from networkd.dns.cache import Cache
from networkd.dns.clients import ClientFilter
from networkd.dns.hot import HotAnswers, HotEntry
from networkd.dns.resolver import Resolver
from networkd.dns.zone import build_zone


@pytest.mark.parametrize("host, admitted", [
    ("127.0.0.1", True),
    ("127.255.0.9", True),
    ("::1", True),
    ("::ffff:127.0.0.1", True),  # a v4-mapped loopback on an IPv6 socket
    ("10.9.8.7", True),  # --dns-allow 10.9.0.0/16
    ("10.8.8.7", False),
    ("fd00::9", True),  # --dns-allow fd00::/64
    ("fd01::9", False),
    ("::ffff:10.9.8.7", True),
    ("fe80::1%eth0", False),
    ("192.168.1.1", False),
])
def test_client_admission_is_the_same_for_text_and_packed_addresses(host, admitted):
    clients = ClientFilter([ipaddress.ip_network("10.9.0.0/16"), ipaddress.ip_network("fd00::/64")])
    bare = host.split("%")[0]
    packed = socket.inet_pton(socket.AF_INET6 if ":" in bare else socket.AF_INET, bare)
    assert clients.admits(host) is admitted
    assert clients.admits(packed) is admitted
    assert clients.admits(host) is admitted, "memoised"
    assert set(clients.verdicts) == {host, packed}


def test_client_admission_rejects_what_is_not_an_address():
    clients = ClientFilter()
    assert clients.admits("nonsense") is False and clients.admits(b"\x7f\x00\x00") is False


def question(name: str, qid: int = 1, edns: bool = False) -> bytes:
    record = DNSRecord.question(name, "A")
    record.header.id = qid
    if edns:
        record.add_ar(EDNS0(udp_len=1232))
    return bytes(record.pack())


def upstream_answer(name: str, ttl: int) -> wire.UpstreamAnswer:
    reply = DNSRecord.question(name, "A").reply()
    reply.add_answer(RR(name, QTYPE.A, ttl=ttl, rdata=A("1.2.3.4")))
    return wire.inspect_answer(reply.pack())


def test_hot_lookup_reages_cached_answers_and_drops_them_near_expiry():
    clock = Clock()
    clock.advance(1000.5)
    cache = Cache(10, clock)
    entry = cache.put_answer("key", upstream_answer("x.com", 10))
    hot = HotAnswers()
    data = question("x.com", edns=True)  # two keys: the bytes after the ID and the question key
    hot.remember_cached(data, b"\x00\x01" + entry.answer.body[2:], entry, clock.seconds())
    assert set(hot.cached) == {data[2:], wire.question_key(data)}

    def ttl_at(now: float) -> int | None:
        hit = hot.lookup(data[2:], now)
        return None if hit is None else DNSRecord.parse(b"\x00\x01" + hit.body).rr[0].ttl

    assert ttl_at(1000.9) == 10
    assert ttl_at(1001.5) == 9 and hot.cached[data[2:]].good_until == 1002.5, "patched, good for a second"
    assert ttl_at(1004.7) == 6
    assert ttl_at(1008.6) is None and data[2:] not in hot.cached, "2 s before expiry: left to the slow path"
    assert wire.question_key(data) in hot.cached, "each key is aged (or dropped) on its own hit"


def test_hot_local_answers_never_age():
    hot = HotAnswers()
    data = question("a.lain")
    hot.remember_local(data, data[:2] + b"answer")
    assert hot.lookup(data[2:], 10 ** 9) == HotEntry(b"answer", ("NOERROR", "local"), 0, None)
    assert hot.lookup(b"unknown", 0) is None


def test_a_large_answer_or_an_odd_question_is_not_kept_hot():
    hot = HotAnswers()
    hot.remember_local(question("a.lain"), b"\x00\x01" + b"x" * 600)
    hot.remember_local(question("a.lain")[:-1], b"\x00\x01answer")
    assert hot.local == {}


class Link:
    """A stub chain link: answers its names, passes on the others."""

    def __init__(self, label: str, names: set, log: list):
        self.label, self.names, self.log = label, names, log

    def answer(self, ask):
        self.log.append((self.label, ask.name))
        return self.label.encode() if ask.name in self.names else None


def test_the_chain_is_asked_in_order_until_one_answers():
    resolver = Resolver(Clock(), cache_size=10)
    asked: list = []
    resolver.chain = (Link("zone", {"a.lain"}, asked), Link("cache", {"b.com"}, asked),
                      Link("forward", {"b.com", "c.com"}, asked))
    table = [
        ("a.lain", b"zone", [("zone", "a.lain")]),
        ("b.com", b"cache", [("zone", "b.com"), ("cache", "b.com")]),
        ("c.com", b"forward", [("zone", "c.com"), ("cache", "c.com"), ("forward", "c.com")]),
        ("d.com", None, [("zone", "d.com"), ("cache", "d.com"), ("forward", "d.com")]),
    ]
    for name, expected, order in table:
        asked.clear()
        assert resolver.resolve(question(name), "127.0.0.1", udp=True) == expected, name
        assert asked == order, name
    asked.clear()
    refused = resolver.resolve(question("a.lain"), "10.0.0.1", udp=True)
    assert DNSRecord.parse(refused).header.rcode == RCODE.REFUSED and asked == [], "admission comes first"


def test_the_real_chain_local_then_cache_then_forwarder():
    clock = Clock()
    resolver = Resolver(clock, cache_size=10)
    zone, _ = build_zone({"a.lain": '{"ips": ["10.0.0.1"]}'}, [], node_ip=None, webrouters=(), ttl=60)
    resolver.set_zone(zone)
    local = DNSRecord.parse(resolver.resolve(question("A.lain"), "127.0.0.1", udp=True))
    assert local.header.aa and [str(rr.rdata) for rr in local.rr] == ["10.0.0.1"]
    key = (b"\x01b\x03com\x00", 1, 1, False, False)
    resolver.cache.put_answer(key, upstream_answer("b.com", 60))
    cached = DNSRecord.parse(resolver.resolve(question("b.com"), "127.0.0.1", udp=False))
    assert [str(rr.rdata) for rr in cached.rr] == ["1.2.3.4"] and resolver.hot_cached == {}, "TCP: not kept hot"
    asked = []
    resolver.forwarding.forwarder = FakeForwarder(asked)
    forwarded = [resolver.resolve(question("c.com", qid), "127.0.0.1", udp=True) for qid in (7, 8)]
    assert len(asked) == 1 and resolver._inflight, "one question upstream for both"
    asked[0].callback(upstream_answer("c.com", 60))
    out = [DNSRecord.parse(d.result) for d in forwarded]
    assert [(r.header.id, [str(rr.rdata) for rr in r.rr]) for r in out] == [(7, ["1.2.3.4"]), (8, ["1.2.3.4"])]
    assert resolver.stats.queries == {("NOERROR", "local"): 1, ("NOERROR", "cache"): 1, ("NOERROR", "forward"): 2}
    again = DNSRecord.parse(resolver.resolve(question("c.com"), "127.0.0.1", udp=True))
    assert [str(rr.rdata) for rr in again.rr] == ["1.2.3.4"] and len(asked) == 1, "now from the cache"


class FakeForwarder:
    def __init__(self, asked: list):
        self.asked = asked

    def query(self, question: bytes, do: bool, servers, late=None, cd=False) -> defer.Deferred:
        self.asked.append(defer.Deferred())
        return self.asked[-1]
