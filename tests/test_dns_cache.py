"""The forwarding cache as a client sees it (issue 12): real sockets on
127.0.0.x, a DnsService without etcd (``LocalDns``) and stub upstreams."""

from __future__ import annotations

import pytest_twisted
from dnslib import RCODE

from tests.support.dnsstub import LocalDns, StubServer
from tests.support.waiting import eventually, sleep


def ips(reply) -> list:
    return sorted(str(rr.rdata) for rr in reply.rr)


@pytest_twisted.ensureDeferred
async def test_the_cache_size_bounds_every_cached_answer_hot_or_not():
    """--dns-cache-size 20, 200 names each asked three times over UDP (the
    last two from the cache and the hot table, with and without EDNS): no more
    than 20 answers are kept anywhere, and the first names are gone (asked
    again, they go upstream again)."""
    stub = StubServer(ttl=300)
    names = [f"n{i}.example.com" for i in range(200)]
    for i, name in enumerate(names):
        stub.records[name] = [f"10.2.{i // 250}.{i % 250}"]
    env = await LocalDns([stub], cache_size=20).start()
    resolver = env.dns.resolver
    try:
        for name in names:
            for edns in (False, True, False, True):
                assert ips(await env.q(name, edns=edns)) == stub.records[name], name
            assert len(resolver.cache) <= 20, f"{len(resolver.cache)} cache entries"
            assert len(resolver.hot_cached) <= 20, f"{len(resolver.hot_cached)} hot answers after {name}"
        asked = len(stub.queries)
        assert ips(await env.q(names[0])) == stub.records[names[0]]
        assert len(stub.queries) == asked + 1, "the oldest name was evicted, hot answers included"
        assert ips(await env.q(names[-1])) == stub.records[names[-1]]
        assert len(stub.queries) == asked + 1, "the newest is still cached"
    finally:
        await env.stop()
        stub.close()


@pytest_twisted.ensureDeferred
async def test_an_expired_answer_is_served_stale_while_no_upstream_answers():
    """RFC 8767: once the upstream fails (SERVFAIL, then silence past the
    budget), an answer past its TTL is served with TTL 30 instead of
    SERVFAIL, over UDP and TCP, and asked again only once meanwhile; a name
    never cached still gets SERVFAIL; when the upstream answers again, the
    fresh answer replaces the stale one.  With --dns-stale-max 0: SERVFAIL."""
    stub = StubServer(ttl=1)
    stub.records["stale.example.com"] = ["10.0.0.3"]
    stub.records["quiet.example.com"] = ["10.0.0.6"]
    env = await LocalDns([stub]).start()
    env.dns.resolver.forwarding.stale_recheck = 2.0  # not 30 s: the test sees a refresh after it
    try:
        for name in ("stale.example.com", "quiet.example.com"):
            assert ips(await env.q(name)) == stub.records[name]
        await sleep(1.2)  # both expired
        stub.mode = "servfail"
        asked = len(stub.queries)
        for tcp in (False, False, True, False):
            reply = await env.q("stale.example.com", tcp=tcp)
            assert reply.header.rcode == RCODE.NOERROR, f"tcp={tcp}: {RCODE[reply.header.rcode]}"
            assert ips(reply) == ["10.0.0.3"] and [rr.ttl for rr in reply.rr] == [30]
        assert len(stub.queries) - asked == 1, "one refresh, then stale at once until the recheck (2 s)"
        assert (await env.q("never.example.com")).header.rcode == RCODE.SERVFAIL
        stub.mode = "silent"
        reply = await env.q("quiet.example.com", timeout=4)  # the budget runs out first
        assert reply.header.rcode == RCODE.NOERROR and ips(reply) == ["10.0.0.6"] and reply.rr[0].ttl == 30

        stub.mode = "answer"
        stub.records["stale.example.com"] = ["10.0.0.4"]

        async def fresh():
            reply = await env.q("stale.example.com")
            return reply.header.rcode == RCODE.NOERROR and ips(reply) == ["10.0.0.4"] and reply.rr[0].ttl <= 1

        await eventually(fresh, timeout=5, message="the fresh answer replaces the stale one")
    finally:
        await env.stop()
        stub.close()

    stub = StubServer(ttl=1)
    stub.records["stale.example.com"] = ["10.0.0.3"]
    env = await LocalDns([stub], stale_max=0).start()
    try:
        assert ips(await env.q("stale.example.com")) == ["10.0.0.3"]
        await sleep(1.2)
        stub.mode = "servfail"
        assert (await env.q("stale.example.com")).header.rcode == RCODE.SERVFAIL
    finally:
        await env.stop()
        stub.close()


@pytest_twisted.ensureDeferred
async def test_a_popular_name_is_refreshed_before_it_expires_and_never_misses():
    """A name asked five times a second (TTL 3 s) for three of its lifetimes:
    the upstream is asked again before each answer expires, so after the
    first every answer comes from the cache or the hot table, none waits
    for an upstream, and a change upstream still shows.  A name asked once
    is left to expire."""
    stub = StubServer(ttl=3)
    stub.records["pop.example.com"] = ["10.0.0.1"]
    stub.records["once.example.com"] = ["10.0.0.9"]
    env = await LocalDns([stub]).start()
    queries = env.dns.resolver.stats.queries
    try:
        assert ips(await env.q("once.example.com")) == ["10.0.0.9"]
        seen = []
        for i in range(45):
            if i == 10:
                stub.records["pop.example.com"] = ["10.0.0.2"]
            reply = await env.q("pop.example.com")
            assert reply.header.rcode == RCODE.NOERROR, f"query {i}: {RCODE[reply.header.rcode]}"
            seen.append(ips(reply)[0])
            await sleep(0.2)
        forwarded = queries.get(("NOERROR", "forward"), 0)
        assert forwarded == 2, f"{forwarded} answers waited for an upstream (the first of each name only)"
        assert stub.names_asked().count("pop.example.com") >= 3, "refreshed ahead of each expiry"
        assert seen[0] == "10.0.0.1" and seen[-1] == "10.0.0.2", seen
        assert stub.names_asked().count("once.example.com") == 1, "an unpopular name is not prefetched"
    finally:
        await env.stop()
        stub.close()


@pytest_twisted.ensureDeferred
async def test_a_fresh_answer_that_cannot_be_cached_still_ends_serving_stale():
    """Served stale after the upstream failed; the upstream recovers but now
    answers with TTL 0 (nothing to cache): clients get that fresh answer,
    never the stale one again."""
    stub = StubServer(ttl=1)
    stub.records["zero.example.com"] = ["10.0.0.3"]
    env = await LocalDns([stub]).start()
    env.dns.resolver.forwarding.stale_recheck = 1.0
    try:
        assert ips(await env.q("zero.example.com")) == ["10.0.0.3"]
        await sleep(1.2)
        stub.mode = "servfail"
        assert [rr.ttl for rr in (await env.q("zero.example.com")).rr] == [30], "served stale"
        stub.ttl, stub.mode = 0, "answer"
        stub.records["zero.example.com"] = ["10.0.0.5"]

        async def fresh():
            return ips(await env.q("zero.example.com")) == ["10.0.0.5"]

        await eventually(fresh, timeout=5, message="the fresh (uncacheable) answer")
        for _ in range(3):
            assert ips(await env.q("zero.example.com")) == ["10.0.0.5"], "never the stale answer again"
    finally:
        await env.stop()
        stub.close()
