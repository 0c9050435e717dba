"""Local names as a client sees them (issue 12): real sockets on 127.0.0.x,
a DnsService without etcd (``LocalDns``, its domains published by the test)
and stub upstreams."""

from __future__ import annotations

import json

import pytest_twisted
from dnslib import RCODE

from tests.support.dnsstub import LocalDns, Snapshots, StubServer


def ips(reply) -> list:
    return sorted(str(rr.rdata) for rr in reply.rr)


def domain(*addresses: str) -> str:
    return json.dumps({"ips": list(addresses)})


@pytest_twisted.ensureDeferred
async def test_a_forwarded_name_that_becomes_local_is_answered_locally_at_once():
    """Forwarded names answered from the hot table over UDP (plain and EDNS,
    any case, exact and under a wildcard); then the zone takes them over: the
    very next UDP query gets the local answer, not the upstream's for the rest
    of its TTL."""
    stub = StubServer(ttl=300)
    names = ("moved.example.com", "MoVed.Example.COM", "a.wild.example.com", "kept.example.com")
    for name in names:
        stub.records[name.lower()] = ["10.0.0.1"]
    domains = Snapshots({})
    env = await LocalDns([stub], domains=domains).start()
    try:
        for _ in range(3):  # forwarded, from the cache, from the hot table
            for name in names:
                for edns in (False, True):
                    assert ips(await env.q(name, edns=edns)) == ["10.0.0.1"], name
        asked = len(stub.queries)
        domains.publish({"moved.example.com": domain("10.9.9.9"), "*.wild.example.com": domain("10.9.9.8")})
        for name, ip in (("moved.example.com", "10.9.9.9"), ("MoVed.Example.COM", "10.9.9.9"),
                         ("a.wild.example.com", "10.9.9.8"), ("kept.example.com", "10.0.0.1")):
            for edns in (False, True):
                reply = await env.q(name, edns=edns)
                assert ips(reply) == [ip], f"{name} edns={edns}: {ips(reply)} after the zone change"
                assert reply.header.rcode == RCODE.NOERROR and reply.header.aa == (ip != "10.0.0.1")
        assert len(stub.queries) == asked, "nothing more went upstream"
    finally:
        await env.stop()
        stub.close()
