"""Forwarding as a client sees it (issue 12): real sockets on 127.0.0.x, a
DnsService without etcd (``LocalDns``) and stub upstreams."""

from __future__ import annotations

import pytest_twisted
from dnslib import QTYPE

from tests.support.dnsstub import LocalDns, StubServer


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
