"""DNS over TCP as a client sees it (issue 12): real sockets on 127.0.0.1,
a DnsService without etcd (``LocalDns``) and a stub upstream."""

from __future__ import annotations

import socket
import struct

import pytest_twisted
from dnslib import DNSRecord
from twisted.internet import threads

from networkd.dns.tcp import TCP_MAX_CONNECTIONS
from tests.support.dnsstub import LocalDns, StubServer


def ask(conn: socket.socket, name: str) -> list:
    """One query on an open connection: the answer's addresses."""
    data = DNSRecord.question(name).pack()
    conn.sendall(struct.pack(">H", len(data)) + data)
    length = struct.unpack(">H", conn.recv(2, socket.MSG_WAITALL))[0]
    return [str(rr.rdata) for rr in DNSRecord.parse(conn.recv(length, socket.MSG_WAITALL)).rr]


def closed_by_server(conn: socket.socket) -> bool:
    """The server ended the connection (FIN, or RST when aborted)."""
    conn.settimeout(3)
    try:
        return conn.recv(10) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


@pytest_twisted.ensureDeferred
async def test_at_the_connection_cap_the_idlest_connection_makes_room_for_a_new_client():
    """256 connections held open, all but the first having just asked
    something: a new client (one retrying over TCP after TC, say) is served
    at once, and the connection idle longest is the one closed."""
    stub = StubServer()
    stub.records["tc.example.com"] = ["10.0.0.5"]
    env = await LocalDns([stub]).start()
    try:
        def fill_then_connect():
            held = [socket.create_connection(("127.0.0.1", env.port), timeout=3)
                    for _ in range(TCP_MAX_CONNECTIONS)]
            try:
                for conn in held[1:]:
                    assert ask(conn, "tc.example.com") == ["10.0.0.5"]
                with socket.create_connection(("127.0.0.1", env.port), timeout=3) as new:
                    try:
                        answered = ask(new, "tc.example.com")
                    except (OSError, struct.error) as e:
                        answered = f"no answer: {e!r}"
                return answered, closed_by_server(held[0]), ask(held[1], "tc.example.com")
            finally:
                for conn in held:
                    conn.close()

        answered, idlest_closed, other = await threads.deferToThread(fill_then_connect)
        assert answered == ["10.0.0.5"], f"the new client at the cap: {answered}"
        assert idlest_closed, "the idlest connection was closed to make room"
        assert other == ["10.0.0.5"], "the busier connections stay open"
    finally:
        await env.stop()
        stub.close()
