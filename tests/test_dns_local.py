"""Local names as a client sees them (issue 12): real sockets on 127.0.0.x,
a DnsService without etcd (``LocalDns``, its domains published by the test)
and stub upstreams."""

from __future__ import annotations

import json
import socket
import struct

import pytest_twisted
from dnslib import RCODE
from twisted.internet import defer, threads

from tests.support.dnsstub import LocalDns, Snapshots, StubServer
from tests.support.waiting import sleep


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


@pytest_twisted.ensureDeferred
async def test_a_query_sent_before_the_first_snapshot_waits_for_it_and_is_not_forwarded():
    """A daemon just started knows its upstreams (resolv.conf is read at once)
    but not yet its names: a node name asked then must not go upstream (whose
    NXDOMAIN the client would cache); it waits in the socket and gets the
    local answer once the first snapshot is in."""
    stub = StubServer()
    domains = Snapshots()  # the etcd watch has not answered yet
    env = await LocalDns([stub], domains=domains).start()
    try:
        asking = defer.ensureDeferred(env.q("x.lain", timeout=5))
        await sleep(0.3)
        assert stub.names_asked() == [], "a node name went upstream before the zone was in"
        domains.publish({"x.lain": domain("10.0.0.9")})
        reply = await asking
        assert ips(reply) == ["10.0.0.9"] and reply.header.aa
        assert stub.names_asked() == []
    finally:
        await env.stop()
        stub.close()


def raw_query(labels: list, qid: int, qtype: int = 1, edns: bool = False) -> bytes:
    """A query for a name of raw labels (any bytes), built by hand."""
    name = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    opt = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00" if edns else b""
    header = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 1 if edns else 0)
    return header + name + struct.pack(">HH", qtype, 1) + opt


def exchange(port: int, data: bytes, tcp: bool) -> bytes:
    if tcp:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as conn:
            conn.sendall(struct.pack(">H", len(data)) + data)
            length = struct.unpack(">H", conn.recv(2, socket.MSG_WAITALL))[0]
            return conn.recv(length, socket.MSG_WAITALL)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        sock.sendto(data, ("127.0.0.1", port))
        return sock.recv(65535)


def addresses(reply: bytes, offset: int, count: int) -> list:
    """The A records' addresses after the question (dnslib cannot parse
    labels that are not UTF-8)."""
    found = []
    for _ in range(count):
        offset += 2 if reply[offset] & 0xC0 else reply.index(b"\x00", offset) + 1 - offset
        rtype, _, _, length = struct.unpack_from(">HHIH", reply, offset)
        offset += 10
        if rtype == 1:
            found.append(socket.inet_ntoa(reply[offset:offset + length]))
        offset += length
    return found


@pytest_twisted.ensureDeferred
async def test_labels_with_any_byte_under_a_local_wildcard_are_answered_locally():
    """RFC 2181 s11: a label may hold any byte.  A dot inside a label, UTF-8,
    0xff, a zero byte, capitals next to them: under *.wild.lain each name is
    answered locally (AA, the wildcard's address, the question echoed byte for
    byte), over UDP (twice: the second from the hot table) and TCP; nothing
    goes upstream, nothing waits for it."""
    stub = StubServer()
    env = await LocalDns([stub], domains=Snapshots({"*.wild.lain": domain("10.9.9.8")})).start()
    try:
        odd = [b"a.b", "é".encode(), b"\xff", b"x\x00y", b"\xffA.", b"\\", b" "]
        for n, label in enumerate(odd):
            for labels in ([label, b"wild", b"lain"], [b"Deep", label, b"WILD", b"lain"]):
                for tcp, edns in ((False, False), (False, True), (False, False), (True, False)):
                    data = raw_query(labels, 100 + n, edns=edns)
                    reply = await threads.deferToThread(exchange, env.port, data, tcp)
                    question_end = data.index(b"\x00\x01\x00\x01", 12) + 4
                    flags, ancount = struct.unpack_from(">H2xH", reply, 2)
                    where = f"{labels!r} tcp={tcp} edns={edns}"
                    assert flags & 0xF == RCODE.NOERROR, f"{where}: {RCODE[flags & 0xF]}"
                    assert flags & 0x0400 and addresses(reply, question_end, ancount) == ["10.9.9.8"], where
                    assert reply[:2] == data[:2] and reply[12:question_end] == data[12:question_end], where
        assert stub.queries == [], "nothing was forwarded"
    finally:
        await env.stop()
        stub.close()
