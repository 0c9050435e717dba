"""Forwarding as a client sees it (issue 12): real sockets on 127.0.0.x, a
DnsService without etcd (``LocalDns``) and stub upstreams."""

from __future__ import annotations

import socket
import struct
import time

import pytest_twisted
from dnslib import QTYPE, RCODE, DNSRecord
from twisted.internet import defer, threads

from tests.support.dnsstub import LocalDns, StubServer
from tests.support.waiting import sleep


@pytest_twisted.ensureDeferred
async def test_types_whose_bytes_look_like_capitals_go_upstream_unchanged():
    """HTTPS (65 = 'A'), 66 ('B') and 90 ('Z'): only the name is case-folded,
    never the type, so the upstream is asked the client's question and the
    answer (fresh or cached) echoes it."""
    stub = StubServer()
    types = (65, 66, 90)
    for qtype in types:
        stub.typed[("svc.example.com", qtype)] = b"\x00\x01\x00"  # HTTPS: priority 1, target "."
    env = await LocalDns([stub]).start()
    try:
        for attempt in ("forwarded", "cached"):
            for qtype in types:
                reply = await env.q("Svc.Example.com", qtype)
                assert reply.q.qtype == qtype, f"{attempt}: question type {reply.q.qtype}, asked {qtype}"
                assert [rr.rtype for rr in reply.rr] == [qtype], f"{attempt}: the answer to {qtype}"
        assert [t for _, _, t in stub.queries] == [QTYPE[t] for t in types], "asked once each, as asked"
    finally:
        await env.stop()
        stub.close()


@pytest_twisted.ensureDeferred
async def test_a_dead_first_upstream_is_demoted_and_names_resolve_fast_via_the_next():
    """A black-holed first nameserver (reads, never answers): after a few
    queries it is asked last, so uncached names no longer wait out its head
    start (0.2 s) before the live second one is asked."""
    dead, live = StubServer(mode="silent"), StubServer()
    names = [f"n{i}.example.com" for i in range(12)]
    for name in names:
        live.records[name] = ["10.0.0.7"]
    env = await LocalDns([dead, live]).start()
    try:
        took = []
        for name in names:
            start = time.monotonic()
            reply = await env.q(name, timeout=3)
            took.append(time.monotonic() - start)
            assert [str(rr.rdata) for rr in reply.rr] == ["10.0.0.7"], name
        fast = [t for t in took[4:] if t < 0.15]
        assert len(fast) >= 6, f"after 4 queries, answers took {[round(t, 3) for t in took]} s"
    finally:
        await env.stop()
        dead.close()
        live.close()


@pytest_twisted.ensureDeferred
async def test_an_answer_slower_than_the_budget_is_cached_for_the_retry():
    """An upstream that answers after 2 s (the client gets SERVFAIL at 1.6 s):
    its answer is still taken and cached, so the client's retry gets it."""
    slow = StubServer()
    slow.delay = 2.0
    slow.records["slow.example.com"] = ["10.0.0.8"]
    env = await LocalDns([slow]).start()
    try:
        start = time.monotonic()
        first = await env.q("slow.example.com", timeout=3)
        assert first.header.rcode == RCODE.SERVFAIL and time.monotonic() - start < 1.9
        asked = len(slow.queries)
        await sleep(2.6 - (time.monotonic() - start))  # the first answer went out at 2.0 s
        retry = await env.q("slow.example.com", timeout=3)
        assert retry.header.rcode == RCODE.NOERROR, f"the retry got {RCODE[retry.header.rcode]}"
        assert [str(rr.rdata) for rr in retry.rr] == ["10.0.0.8"]
        assert len(slow.queries) == asked, "the retry was answered from the cache"
    finally:
        await env.stop()
        slow.close()


def pipeline(port: int, names: list, timeout: float = 10.0) -> dict:
    """Send every query on one TCP connection at once, then read answers
    (in any order) until all came or the server closed: {id: DNSRecord}."""
    packets = b""
    for qid, name in enumerate(names):
        q = DNSRecord.question(name, "A")
        q.header.id = qid
        data = q.pack()
        packets += struct.pack(">H", len(data)) + data
    replies: dict = {}
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(packets)
        buffer = b""
        deadline = time.monotonic() + timeout
        while len(replies) < len(names) and time.monotonic() < deadline:
            chunk = conn.recv(65535)
            if not chunk:
                break  # closed by the server
            buffer += chunk
            while len(buffer) >= 2 and len(buffer) >= 2 + struct.unpack_from(">H", buffer)[0]:
                length = struct.unpack_from(">H", buffer)[0]
                reply = DNSRecord.parse(buffer[2:2 + length])
                replies[reply.header.id] = reply
                buffer = buffer[2 + length:]
    return replies


@pytest_twisted.ensureDeferred
async def test_two_hundred_pipelined_tcp_queries_all_get_answers():
    """RFC 7766 pipelining: far more forwarded queries in flight on one
    connection than it serves at once; every one is answered, none dropped."""
    stub = StubServer()
    names = [f"p{i}.example.com" for i in range(200)]
    for i, name in enumerate(names):
        stub.records[name] = [f"10.1.{i // 250}.{i % 250}"]
    env = await LocalDns([stub]).start()
    try:
        replies = await threads.deferToThread(pipeline, env.port, names)
        assert len(replies) == 200, f"{len(replies)} of 200 answered"
        assert all([str(rr.rdata) for rr in replies[i].rr] == stub.records[name] for i, name in enumerate(names))
        env.dns.set_upstreams([])  # no upstream: each SERVFAIL comes at once, inside the read loop
        replies = await threads.deferToThread(pipeline, env.port, [f"x{i}.example.com" for i in range(200)])
        assert len(replies) == 200 and {r.header.rcode for r in replies.values()} == {RCODE.SERVFAIL}
    finally:
        await env.stop()
        stub.close()


@pytest_twisted.ensureDeferred
async def test_the_cd_bit_goes_upstream_and_cd_answers_are_kept_apart():
    """A validating upstream gives SERVFAIL for bogus data unless the client
    set CD (checking disabled).  CD reaches the upstream, and an answer had
    with CD=1 is never served from the cache to a CD=0 client."""
    stub = StubServer()
    stub.records["bogus.example.com"] = ["10.0.0.9"]
    stub.bogus.add("bogus.example.com")
    env = await LocalDns([stub]).start()
    try:
        unchecked = await env.q("bogus.example.com", cd=True)
        assert stub.cd_asked == ["bogus.example.com"], "CD went upstream"
        assert unchecked.header.rcode == RCODE.NOERROR and unchecked.header.cd == 1
        assert [str(rr.rdata) for rr in unchecked.rr] == ["10.0.0.9"]
        checked = await env.q("bogus.example.com")
        assert checked.header.rcode == RCODE.SERVFAIL and checked.header.cd == 0, "not the CD=1 answer"
        asked = len(stub.queries)
        for _ in range(2):  # from the cache, then from the hot answers
            again = await env.q("bogus.example.com", cd=True)
            assert [str(rr.rdata) for rr in again.rr] == ["10.0.0.9"] and again.header.cd == 1
        assert len(stub.queries) == asked
    finally:
        await env.stop()
        stub.close()


@pytest_twisted.ensureDeferred
async def test_chaos_class_questions_about_the_server_are_refused_here():
    """version.bind, hostname.bind, id.server (TXT, class CH) are about this
    server: REFUSED at once over UDP and TCP, never forwarded (an upstream
    would describe itself, or fail and leave the client with SERVFAIL)."""
    stub = StubServer()
    env = await LocalDns([stub]).start()
    try:
        for name in ("version.bind", "hostname.bind", "id.server", "VERSION.BIND"):
            for tcp in (False, True):
                start = time.monotonic()
                reply = await env.q(name, "TXT", qclass="CH", tcp=tcp)
                assert reply.header.rcode == RCODE.REFUSED, f"{name} tcp={tcp}: {RCODE[reply.header.rcode]}"
                assert reply.q.qclass == 3 and reply.rr == [] and time.monotonic() - start < 1.0
        assert stub.queries == [], "nothing went upstream"
    finally:
        await env.stop()
        stub.close()


@pytest_twisted.ensureDeferred
async def test_a_cached_nxdomain_soa_carries_the_remaining_negative_ttl():
    """RFC 2308 s5: the SOA of a negative answer says how long the "no" may
    be kept: min(SOA TTL, SOA minimum) = 30 s here, less its age, never
    the SOA's own 300 s."""
    stub = StubServer(ttl=300)  # its SOA: TTL 300, minimum 30
    stub.nxdomain.add("gone.example.com")
    env = await LocalDns([stub]).start()
    try:
        ttls = []
        for step in ("forwarded", "cached", "hot"):
            reply = await env.q("gone.example.com")
            assert reply.header.rcode == RCODE.NXDOMAIN and [QTYPE[a.rtype] for a in reply.auth] == ["SOA"]
            ttls.append(reply.auth[0].ttl)
            await sleep(1.1)
        assert ttls[0] <= 30 and ttls[0] > ttls[1] > ttls[2], f"SOA TTLs {ttls}"
        assert len(stub.queries) == 1
    finally:
        await env.stop()
        stub.close()


@pytest_twisted.ensureDeferred
async def test_a_tcp_connection_keeps_being_read_after_answers_that_failed():
    """Answers that fail inside the server (here: every forwarded one) free
    their place among a connection's waiting queries: the questions after
    them are still read and answered."""
    env = await LocalDns([]).start()
    try:
        env.dns.resolver.forwarding.answer = lambda ask: defer.fail(RuntimeError("no answer for this test"))

        def forty_lost_then_one():
            lost = [f"lost{i}.example.com" for i in range(40)]
            with socket.create_connection(("127.0.0.1", env.port), timeout=5) as conn:
                for name in lost:
                    data = DNSRecord.question(name).pack()
                    conn.sendall(struct.pack(">H", len(data)) + data)
                data = DNSRecord.question("version.bind", "TXT", "CH").pack()
                conn.sendall(struct.pack(">H", len(data)) + data)
                length = struct.unpack(">H", conn.recv(2, socket.MSG_WAITALL))[0]
                return DNSRecord.parse(conn.recv(length, socket.MSG_WAITALL))

        reply = await threads.deferToThread(forty_lost_then_one)
        assert reply.header.rcode == RCODE.REFUSED and str(reply.q.qname) == "version.bind."
    finally:
        await env.stop()
