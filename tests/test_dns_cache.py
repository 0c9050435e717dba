"""The forwarding cache as a client sees it (issue 12): real sockets on
127.0.0.x, a DnsService without etcd (``LocalDns``) and stub upstreams."""

from __future__ import annotations

import pytest_twisted

from tests.support.dnsstub import LocalDns, StubServer


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
