"""The zone kept up to date key by key (networkd.dns.zonefeed, issue 13).

Equivalence: after any sequence of puts, deletes, webrouter and hosts-file
changes, lost watch events and full re-reads, the incremental zone answers
every question exactly as a zone built from scratch from the same inputs
(seeded random sequences).  Cost shape: a put makes one Record, whatever the
number of domains (no timing).  End to end: puts, deletes, wildcards,
reverse names and a forwarded name becoming local, asked with real dig of
the DNS service fed by a real etcd holding a few thousand domains.
"""

from __future__ import annotations

import base64
import http.client
import json
import random
from types import MappingProxyType

import pytest
import pytest_twisted
from dnslib import DNSRecord
from twisted.internet import task

from networkd.dns import wire, zone as zone_module
from networkd.dns.ptrindex import PtrIndex
from networkd.dns.reverse import ReverseZones
from networkd.dns.zone import build_zone
from networkd.dns.zonefeed import ZoneFeed
from networkd.etcd.reflector import Snapshot
from tests.support.waiting import eventually
from tests.test_dns_server import Env

PREFIX = "/lain/config/domains/"
NODE = "10.1.1.1"

# A small universe, so that sequences collide: case and trailing-dot twins,
# wildcards over exact names, shared addresses (PTR lists), bad names.
NAMES = ["a.lain", "A.lain", "a.lain.", "b.lain", "x.b.lain", "*.lain", "*.b.lain", "*.B.lain", "*.x.b.lain",
         "db", "web.lain", "bad..lain", "-x.lain", "*.", "c.d.lain"]
IPS = ["10.0.0.1", "10.0.0.2", "10.0.1.1", "192.168.3.4", "fd00::1", "fd00::2"]
HOSTS = [[("db", "10.7.0.1")], [("db", "10.7.0.2"), ("a.lain", "10.0.0.2")], [], [("web.lain", "10.0.0.1")]]
WEBROUTERS = [(), ("10.9.0.1",), ("10.9.0.1", "10.0.0.2")]


def random_value(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.6:
        return json.dumps({"ips": rng.sample(IPS, rng.randint(0, 3))})
    if kind < 0.7:
        return '{"type": "node"}'
    if kind < 0.82:
        return '{"type": "webrouter"}'
    return rng.choice(['{"ips": ["10.0.0.300"]}', "not json", '{"type": "other"}', '["10.0.0.1"]',
                       '{"ips": "10.0.0.1"}'])


class Inputs:
    """What a from-scratch build reads, and the snapshots the feed gets."""

    def __init__(self):
        self.values: dict[str, str] = {}
        self.revision = 1
        self.generation = 0
        self.hosts: list = []
        self.webrouters: tuple = ()

    def snapshot(self, changed) -> Snapshot:
        self.revision += 1
        self.generation += 1
        return Snapshot("", self.revision, MappingProxyType(dict(self.values)), self.generation,
                        None if changed is None else frozenset(changed))

    def scratch(self):
        return build_zone(self.values, self.hosts, node_ip=NODE, webrouters=self.webrouters, ttl=60,
                          serial=self.revision, key_prefix=PREFIX)


def questions():
    """Every name the universe can make local, names under wildcards, and reverse names."""
    names = {n.lower().rstrip(".").lstrip("*.") for n in NAMES} | {"q.lain", "q.x.b.lain", "lain", "b.lain",
                                                                     "other.example", "db", "q.c.d.lain"}
    import ipaddress
    for ip in IPS + ["10.7.0.1", "10.7.0.2", "10.9.0.1", NODE]:
        pointer = ipaddress.ip_address(ip).reverse_pointer
        labels = pointer.split(".")
        names.update(".".join(labels[i:]) for i in range(len(labels) - 2))
    out = []
    for name in sorted(n for n in names if n and ".." not in n):
        for qtype in (("PTR", "ANY") if name.endswith("arpa") else ("A", "AAAA", "ANY", "MX")):
            out.append((name, wire.parse_query(DNSRecord.question(name, qtype).pack())))
    return out


QUESTIONS = questions()


def answers(zone) -> dict:
    reverse = ReverseZones()
    out = {}
    for name, query in QUESTIONS:
        found = zone.lookup(name)
        if found is not None:
            out[name, query.qtype] = zone.answer(query, *found)
        else:
            out[name, query.qtype] = reverse.answer(zone, query, name, False)
    return out


def build(feed: ZoneFeed, clock: task.Clock) -> None:
    """Run the reactor turns that fill the zone from the first snapshot."""
    while not feed.built:
        assert clock.getDelayedCalls(), "the first snapshot is being applied: a turn is scheduled"
        clock.advance(0)


def assert_same(feed: ZoneFeed, inputs: Inputs, step):
    reference, invalid = inputs.scratch()
    assert feed.pending() == 0
    assert feed.zone.exact == reference.exact, step
    assert feed.zone.wildcards == reference.wildcards, step
    assert feed.invalid == invalid, step
    index, fresh = feed.zone.ptr_index(), PtrIndex(reference.exact)
    assert (index.ptr, index.above) == (fresh.ptr, fresh.above), step
    assert answers(feed.zone) == answers(reference), step


@pytest.mark.parametrize("seed", range(8))
def test_incremental_zone_answers_as_one_built_from_scratch(seed):
    rng = random.Random(seed)
    clock = task.Clock()
    inputs = Inputs()
    changes = []
    feed = ZoneFeed(clock, ttl=60, node_ip=NODE, key_prefix=PREFIX,
                    on_change=lambda added, wild: changes.append((added, wild)),
                    budget=rng.choice([0.0, 0.003]))  # 0: one key a slice, the most interleaving
    for name in rng.sample(NAMES, 6):
        inputs.values[name] = random_value(rng)
    feed.domains(inputs.snapshot(None))  # the first one, in slices too
    build(feed, clock)
    feed.zone.ptr_index()  # from now on it is kept up to date, not built again
    assert_same(feed, inputs, "first snapshot")
    lost = False
    for step in range(150):
        op = rng.random()
        changed = set()
        for _ in range(rng.choice([1, 1, 1, 2, 5])):
            key = rng.choice(NAMES)
            if rng.random() < 0.3:
                inputs.values.pop(key, None)
            else:
                inputs.values[key] = random_value(rng)
            changed.add(key)
        if op < 0.08:
            inputs.webrouters = rng.choice(WEBROUTERS)
            feed.set_webrouters(inputs.webrouters)
        elif op < 0.14:
            inputs.hosts = rng.choice(HOSTS)
            feed.set_hosts(inputs.hosts)
        if op > 0.93:  # a watch event lost: the keys changed, the snapshot does not say so
            lost = True
            changed = set()
        full = op > 0.97 or (lost and rng.random() < 0.2)  # a full re-read of the prefix
        feed.domains(inputs.snapshot(None if full else changed))
        while clock.getDelayedCalls():
            clock.advance(0)
        if full:
            lost = False
        if not lost:
            assert_same(feed, inputs, f"seed {seed} step {step}")


def test_a_lost_event_converges_on_the_next_full_read_in_slices():
    clock = task.Clock()
    inputs = Inputs()
    slices = []  # one call a slice that changed something
    feed = ZoneFeed(clock, ttl=60, node_ip=NODE, key_prefix=PREFIX, budget=0.0,
                    on_change=lambda added, wild: slices.append(clock.seconds()))
    for i in range(50):
        inputs.values[f"n{i}.lain"] = json.dumps({"ips": [f"10.0.0.{i}"]})
    feed.domains(inputs.snapshot(None))
    build(feed, clock)
    inputs.values["n1.lain"] = '{"ips": ["10.5.5.5"]}'  # delivered
    inputs.values["n2.lain"] = '{"ips": ["10.6.6.6"]}'  # its event was lost
    del inputs.values["n3.lain"]  # lost too
    for i in range(10, 15):
        inputs.values[f"n{i}.lain"] = '{"ips": ["10.7.7.7"]}'  # and these
    feed.domains(inputs.snapshot({"n1.lain"}))
    assert feed.zone.exact["n1.lain"].ips == ("10.5.5.5",)
    assert feed.zone.exact["n2.lain"].ips == ("10.0.0.2",) and "n3.lain" in feed.zone.exact, "not seen yet"
    slices.clear()
    feed.domains(inputs.snapshot(None))  # the periodic re-read of the prefix
    assert feed.pending() > 0 and clock.getDelayedCalls(), "the rest in a later reactor turn"
    clock.advance(0)
    assert len(slices) == 7, "a whole comparison is done in slices, the reactor free in between"
    assert feed.zone.exact["n2.lain"].ips == ("10.6.6.6",) and "n3.lain" not in feed.zone.exact
    assert_same(feed, inputs, "after the full read")


def test_a_big_whole_comparison_starts_in_the_turn_after_the_snapshot(monkeypatch):
    """Listing the keys of a big zone is a turn's worth of work (~1 ms at 40,000): the turn that
    takes the snapshot does nothing more, the comparison goes on in later turns (issue 13)."""
    from networkd.dns import zonefeed

    monkeypatch.setattr(zonefeed, "BIG_SCAN", 30)
    clock = task.Clock()
    inputs = Inputs()
    feed = ZoneFeed(clock, ttl=60, node_ip=NODE, key_prefix=PREFIX)
    for i in range(20):
        inputs.values[f"n{i}.lain"] = json.dumps({"ips": [f"10.0.0.{i}"]})
    feed.domains(inputs.snapshot(None))
    build(feed, clock)
    inputs.values["n1.lain"] = '{"ips": ["10.5.5.5"]}'  # its event was lost
    feed.domains(inputs.snapshot(None))  # 40 keys to compare: over BIG_SCAN
    assert feed.pending() == 40 and clock.getDelayedCalls(), "nothing compared in the snapshot's turn"
    assert feed.zone.exact["n1.lain"].ips == ("10.0.0.1",)
    clock.advance(0)
    assert_same(feed, inputs, "after the comparison")
    inputs.values["n2.lain"] = '{"ips": ["10.6.6.6"]}'
    feed.domains(inputs.snapshot({"n2.lain"}))
    assert feed.pending() == 0 and feed.zone.exact["n2.lain"].ips == ("10.6.6.6",), "a put still goes at once"


def test_the_first_snapshot_is_applied_in_slices_and_said_built_once():
    """Whole, the first snapshot was one reactor turn (~1 s at 10,000 domains, in which no lease
    keep-alive could go out): it is sliced like any comparison, and ``built`` (with one on_built)
    says when the zone holds all of it, which the DNS service waits for before reading a query."""
    clock = task.Clock()
    inputs = Inputs()
    built, slices = [], []
    feed = ZoneFeed(clock, ttl=60, node_ip=NODE, key_prefix=PREFIX, budget=0.0, first_budget=0.0,
                    on_built=lambda: built.append(1),
                    on_change=lambda added, wild: slices.append(len(added)))
    for i in range(600):
        inputs.values[f"n{i}.lain"] = json.dumps({"ips": [f"10.0.{i >> 8}.{i & 255}"]})
    feed.domains(inputs.snapshot(None))
    assert not feed.built and 0 < len(feed.zone.exact) < 600, "a first slice only"
    build(feed, clock)
    assert built == [1] and len(slices) > 1 and sum(slices) == 600, "in slices, the reactor free in between"
    assert_same(feed, inputs, "first snapshot")
    inputs.values["n1.lain"] = '{"ips": ["10.5.5.5"]}'
    feed.domains(inputs.snapshot(None))  # a re-read later: no second on_built
    while clock.getDelayedCalls():
        clock.advance(0)
    assert built == [1] and feed.zone.exact["n1.lain"].ips == ("10.5.5.5",)


def test_a_first_snapshot_that_comes_after_queries_are_read_goes_in_at_once():
    """etcd slow at start-up: DNS reads queries before the first snapshot (HOLD_MAX); then the
    snapshot must not be seen half applied."""
    clock, inputs = task.Clock(), Inputs()
    feed = ZoneFeed(clock, ttl=60, node_ip=NODE, key_prefix=PREFIX, budget=0.0, first_budget=0.0)
    feed.first_at_once()
    for i in range(600):
        inputs.values[f"n{i}.lain"] = json.dumps({"ips": [f"10.0.{i >> 8}.{i & 255}"]})
    feed.domains(inputs.snapshot(None))
    assert feed.built and len(feed.zone.exact) == 600


def test_an_empty_first_snapshot_is_built_at_once():
    feed = ZoneFeed(task.Clock(), ttl=60, node_ip=NODE)
    feed.domains(Inputs().snapshot(None))
    assert feed.built


def test_a_subscriber_that_missed_a_snapshot_compares_everything():
    inputs, clock = Inputs(), task.Clock()
    feed = ZoneFeed(clock, ttl=60, node_ip=NODE)
    inputs.values["a.lain"] = '{"ips": ["10.0.0.1"]}'
    feed.domains(inputs.snapshot(None))
    build(feed, clock)
    inputs.values["b.lain"] = '{"ips": ["10.0.0.2"]}'
    inputs.snapshot({"b.lain"})  # never delivered to the feed
    inputs.values["c.lain"] = '{"ips": ["10.0.0.3"]}'
    feed.domains(inputs.snapshot({"c.lain"}))  # changed since a generation the feed did not see
    assert feed.pending() == 0 and sorted(feed.zone.exact) == ["a.lain", "b.lain", "c.lain"]


def test_a_put_touches_one_name_whatever_the_number_of_domains(monkeypatch):
    """The cost shape, counted: one Record made and one name changed per put,
    with 1,000 or 20,000 domains (issue 13: the whole zone was built again)."""
    made = []
    post_init = zone_module.Record.__post_init__
    monkeypatch.setattr(zone_module.Record, "__post_init__", lambda self: (made.append(1), post_init(self)))
    for size in (1_000, 20_000):
        inputs, clock = Inputs(), task.Clock()
        feed = ZoneFeed(clock, ttl=60, node_ip=NODE)
        inputs.values.update({f"d{i}.lain": json.dumps({"ips": [f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}"]})
                              for i in range(size)})
        feed.domains(inputs.snapshot(None))
        build(feed, clock)
        feed.zone.ptr_index()
        made.clear()
        touched = feed.touched_names
        for i in range(10):
            inputs.values[f"d{i}.lain"] = json.dumps({"ips": [f"10.200.0.{i}"]})
            feed.domains(inputs.snapshot({f"d{i}.lain"}))
        assert (len(made), feed.touched_names - touched) == (10, 10), size
        assert feed.zone.ptr_index().ptr["9.0.200.10.in-addr.arpa"] == ["d9.lain"]


def test_hot_upstream_answers_are_found_by_name_and_the_index_follows_evictions():
    """Names made local drop their hot upstream answers by name (both keys of a query),
    names under a new wildcard too; the index never outgrows the table."""
    from dnslib import EDNS0, QTYPE, RR, A

    from networkd.dns.cache import Cache
    from networkd.dns.hot import HotAnswers

    clock = task.Clock()
    clock.advance(1000)
    cache = Cache(100, clock)
    hot = HotAnswers(cached_limit=8)

    def remember(name):
        record = DNSRecord.question(name, "A")
        record.add_ar(EDNS0(udp_len=1232))  # two hot keys: the bytes after the ID and the question key
        reply = DNSRecord.question(name, "A").reply()
        reply.add_answer(RR(name, QTYPE.A, ttl=300, rdata=A("1.2.3.4")))
        entry = cache.put_answer(name, wire.inspect_answer(reply.pack()))
        hot.remember_cached(bytes(record.pack()), b"\x00\x01" + entry.answer.body[2:], entry, clock.seconds())

    for i in range(20):
        remember(f"n{i}.example")
    assert len(hot.cached) == 8 and sorted(hot._names) == [f"n{i}.example" for i in range(16, 20)]
    remember("A.B.example")
    remember("b.example")
    hot.drop_names(["n19.example"], ())
    assert sorted(hot._names) == ["a.b.example", "b.example", "n18.example"] and len(hot.cached) == 6
    hot.drop_names([], ("b.example",))
    assert sorted(hot._names) == ["n18.example"] and len(hot.cached) == 2


# -- end to end: real etcd, the DNS service, real dig -------------------------------------------


def untimed(lines):
    """dig answer lines without their TTLs (a forwarded answer's counts down)."""
    return [" ".join(line.split()[:1] + line.split()[2:]) for line in lines]


def bulk_put(endpoint: str, items: list[tuple[str, str]]) -> None:
    """Many keys through etcd's HTTP gateway, 128 puts a transaction (as bench/scale.py)."""
    host, port = endpoint.split("//", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    try:
        for k in range(0, len(items), 128):
            body = {"success": [{"requestPut": {"key": b64(key), "value": b64(value)}}
                                for key, value in items[k:k + 128]]}
            conn.request("POST", "/v3/kv/txn", body=json.dumps(body).encode(),
                         headers={"Content-Type": "application/json"})
            reply = conn.getresponse()
            assert reply.status == 200, reply.read()
            reply.read()
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_puts_deletes_wildcards_reverse_and_forwarded_names_among_thousands(
        etcd_server, etcd_root, upstream, monkeypatch):
    made = []
    post_init = zone_module.Record.__post_init__
    monkeypatch.setattr(zone_module.Record, "__post_init__", lambda self: (made.append(1), post_init(self)))
    env = Env(etcd_server, etcd_root, [upstream])
    bulk_put(etcd_server.endpoint, [(env.keys.domains + f"d{i}.bulk.lain",
                                     json.dumps({"ips": [f"10.3.{i >> 8}.{i & 255}"]})) for i in range(3000)])
    upstream.records["app.example.com"] = ["93.184.216.34"]
    upstream.records["x.apps.example.com"] = ["93.184.216.35"]
    await env.start()
    try:
        await eventually(lambda: len(env.dns.resolver.zone.exact) == 3000, message="3,000 domains")
        # Forwarded names, asked twice: the second answer comes from the hot table.
        for _ in range(2):
            assert untimed(await env.dig("app.example.com")) == ["app.example.com. IN A 93.184.216.34"]
            assert untimed(await env.dig("x.apps.example.com")) == ["x.apps.example.com. IN A 93.184.216.35"]
        assert len(env.dns.resolver.hot_cached) >= 2
        made.clear()

        # a put: the new name answers, and so does its reverse name
        env.put_domain("new.lain", '{"ips": ["10.4.0.1"]}')
        await env.domains_seen("new.lain")
        assert await env.dig("new.lain") == ["new.lain. 60 IN A 10.4.0.1"]
        assert await env.dig("-x", "10.4.0.1") == ["1.0.4.10.in-addr.arpa. 60 IN PTR new.lain."]
        # a put that changes the IP: the old reverse name is gone (10/8 is served here: NXDOMAIN)
        env.put_domain("new.lain", '{"ips": ["10.4.0.2"]}')
        await eventually(lambda: env.dns.resolver.zone.exact["new.lain"].ips == ("10.4.0.2",))
        assert await env.dig("new.lain") == ["new.lain. 60 IN A 10.4.0.2"]
        assert await env.dig("-x", "10.4.0.1") == []
        assert (await env.q("1.0.4.10.in-addr.arpa", "PTR")).header.rcode == 3
        assert await env.dig("-x", "10.4.0.2") == ["2.0.4.10.in-addr.arpa. 60 IN PTR new.lain."]
        # a name that was forwarded (and hot) becomes local
        env.put_domain("app.example.com", '{"ips": ["10.4.0.3"]}')
        await env.domains_seen("app.example.com")
        assert await env.dig("app.example.com") == ["app.example.com. 60 IN A 10.4.0.3"]
        # a wildcard over a forwarded, hot name
        env.put_domain("*.apps.example.com", '{"ips": ["10.4.0.4"]}')
        await env.domains_seen("*.apps.example.com")
        assert await env.dig("x.apps.example.com") == ["x.apps.example.com. 60 IN A 10.4.0.4"]
        assert await env.dig("y.z.apps.example.com") == ["y.z.apps.example.com. 60 IN A 10.4.0.4"]
        # a malformed value: an invalid key with its error, the name not local any more
        env.put_domain("new.lain", '{"ips": ["10.4.0.999"]}')
        await eventually(lambda: "new.lain" not in env.dns.resolver.zone.exact)
        assert env.dns.invalid_keys == {env.keys.domains + "new.lain": "bad IP '10.4.0.999'"}
        assert await env.dig("-x", "10.4.0.2") == []
        # deletes: the names go back upstream
        env.etcd.delete(env.keys.domains + "app.example.com")
        env.etcd.delete(env.keys.domains + "*.apps.example.com")
        await eventually(lambda: "apps.example.com" not in env.dns.resolver.zone.wildcards
                         and "app.example.com" not in env.dns.resolver.zone.exact)
        assert untimed(await env.dig("app.example.com")) == ["app.example.com. IN A 93.184.216.34"]
        assert untimed(await env.dig("x.apps.example.com")) == ["x.apps.example.com. IN A 93.184.216.35"]
        assert await env.dig("d2999.bulk.lain") == ["d2999.bulk.lain. 60 IN A 10.3.11.183"]
        assert len(made) <= 10, f"{len(made)} records made for 7 changes among 3,000 domains"
    finally:
        await env.stop()
