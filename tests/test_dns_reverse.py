"""Reverse lookups as a client sees them (issue 12 item 12): PTR for local
names' addresses, the RFC 6303 locally served reverse zones answered here,
--dns-forward-reverse.  Real sockets, LocalDns, a stub upstream."""

from __future__ import annotations

import ipaddress
import json

import pytest_twisted
from dnslib import QTYPE, RCODE

from tests.support.dnsstub import LocalDns, Snapshots, StubServer

DOMAINS = {
    "web.lain": json.dumps({"ips": ["10.1.2.3"]}),
    "db.lain": json.dumps({"ips": ["10.1.2.3", "fd00::5"]}),
    "pub.lain": json.dumps({"ips": ["8.8.4.4"]}),
    "*.wild.lain": json.dumps({"ips": ["10.9.9.9"]}),
}


def rev(address: str) -> str:
    return ipaddress.ip_address(address).reverse_pointer


def ptrs(reply) -> list:
    return [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.PTR]


async def local_dns(stub, **kwargs) -> LocalDns:
    return await LocalDns([stub], domains=Snapshots(DOMAINS), ttl=60, **kwargs).start()


@pytest_twisted.ensureDeferred
async def test_ptr_for_local_names_and_private_reverse_zones_answered_here():
    stub = StubServer()
    env = await local_dns(stub)
    try:
        for tcp in (False, False, True):  # the second from the hot table
            reply = await env.q(rev("10.1.2.3"), "PTR", tcp=tcp)
            assert reply.header.rcode == RCODE.NOERROR and reply.header.aa == 1, f"tcp={tcp}: {reply}"
            assert ptrs(reply) == ["db.lain.", "web.lain."], "every name with the address"
            assert reply.rr[0].ttl == 60
        assert ptrs(await env.q(rev("fd00::5"), "PTR")) == ["db.lain."]
        assert ptrs(await env.q(rev("8.8.4.4"), "PTR")) == ["pub.lain."], "any local name's address"
        nodata = await env.q(rev("10.1.2.3"), "A")
        assert nodata.header.rcode == RCODE.NOERROR and nodata.rr == [] and nodata.auth
        for address in ("10.7.7.7", "10.9.9.9", "172.20.1.1", "192.168.1.1", "127.0.0.9", "169.254.1.1",
                        "100.64.0.1", "fd12::1", "fe80::1", "::1"):
            for tcp in (False, False, True):
                reply = await env.q(rev(address), "PTR", tcp=tcp)
                # ::1/128 is a zone of its own (RFC 6303): its apex exists, with no PTR
                rcode = RCODE.NOERROR if address == "::1" else RCODE.NXDOMAIN
                assert reply.header.rcode == rcode, f"{address}: {RCODE[reply.header.rcode]}"
                assert reply.header.aa == 1 and [QTYPE[a.rtype] for a in reply.auth] == ["SOA"], address
                assert reply.rr == []
        above = await env.q("2.1.10.in-addr.arpa", "PTR")  # exists: 10.1.2.3 is under it
        assert above.header.rcode == RCODE.NOERROR and above.rr == []
        apex = await env.q("10.in-addr.arpa", "SOA")
        assert apex.header.rcode == RCODE.NOERROR and [QTYPE[a.rtype] for a in apex.rr] == ["SOA"]
        odd = await env.q("x.y.10.in-addr.arpa", "PTR")
        assert odd.header.rcode == RCODE.NXDOMAIN
        assert stub.queries == [], f"nothing went upstream: {stub.queries}"
        await env.q(rev("1.2.3.4"), "PTR")  # a public address no local name has: forwarded
        assert stub.names_asked() == [rev("1.2.3.4")]
    finally:
        await env.stop()
        stub.close()


@pytest_twisted.ensureDeferred
async def test_dns_forward_reverse_hands_a_private_range_back_to_the_upstreams():
    stub = StubServer()
    stub.records[rev("10.7.7.7")] = []
    env = await local_dns(stub, forward_reverse=[ipaddress.ip_network("10.7.0.0/16"),
                                                 ipaddress.ip_network("192.168.0.0/16")])
    try:
        for address in ("10.7.7.7", "192.168.1.1"):
            await env.q(rev(address), "PTR")
        assert stub.names_asked() == [rev("10.7.7.7"), rev("192.168.1.1")]
        reply = await env.q(rev("10.8.8.8"), "PTR")
        assert reply.header.rcode == RCODE.NXDOMAIN and reply.header.aa == 1, "the rest of 10/8 stays here"
        assert ptrs(await env.q(rev("10.1.2.3"), "PTR")) == ["db.lain.", "web.lain."]
        assert len(stub.queries) == 2
    finally:
        await env.stop()
        stub.close()
