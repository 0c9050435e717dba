"""Lease keep-alives through etcd's JSON gateway (networkd.etcd.gateway): one HTTP/1.1 connection,
an answer counted only for our request and our lease, grpc where there is no gateway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import signal

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol

from networkd.etcd.client import EtcdClient, EtcdUnavailable
from networkd.etcd.gateway import GatewayError, _parse, granted_ttl
from networkd.etcd.session import Session
from networkd.options import parse_endpoints
from tests.support.etcd_server import EtcdServer
from tests.support.freezing import freeze
from tests.support.waiting import eventually


def gateway_client(*endpoints: str, call_timeout: float = 1.0) -> EtcdClient:
    return EtcdClient(parse_endpoints(",".join(endpoints)), call_timeout=call_timeout, reactor=reactor)


def remaining_ttl(server: EtcdServer, lease: int) -> int:
    out = server.ctl("lease", "timetolive", f"{lease:x}", "-w", "json").stdout
    return json.loads(out)["ttl"]


@pytest_twisted.ensureDeferred
async def test_a_session_keeps_its_lease_alive_through_the_gateway_on_one_connection(private_etcd):
    client = gateway_client(private_etcd.endpoint)
    session = Session(client, ttl=3, reactor=reactor)  # a keep-alive every 2/3 s
    acks = []
    session.on_ack(acks.append)
    session.startService()
    try:
        await eventually(lambda: len(acks) >= 7, timeout=10, message="seven acknowledgements (grant + 6)")
        assert client.gateway.opened == 1, "one connection for every keep-alive"
        assert client.keepalives.opened == 0, "no grpc keep-alive stream"
        assert remaining_ttl(private_etcd, session.lease) >= 2, "the lease is refreshed (TTL 3)"
        assert session.last_error is None
    finally:
        await session.stopService()
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_revoked_lease_is_answered_0_through_the_gateway(private_etcd):
    client = gateway_client(private_etcd.endpoint)
    try:
        lease = await client.grant_lease(30)
        assert await client.keep_alive(lease) == 30
        private_etcd.ctl("lease", "revoke", f"{lease:x}")
        assert await client.keep_alive(lease) == 0
    finally:
        await client.close()


@pytest.fixture
def etcd_without_gateway():
    server = EtcdServer(extra_args=("--enable-grpc-gateway=false",)).start()
    yield server
    server.destroy()


@pytest_twisted.ensureDeferred
async def test_an_etcd_without_the_gateway_gets_its_keep_alives_over_grpc(etcd_without_gateway):
    client = gateway_client(etcd_without_gateway.endpoint)
    try:
        lease = await client.grant_lease(30)
        assert await client.keep_alive(lease) == 30, "the first one too"
        assert client.gateway is None and client.keepalives.opened == 1
        assert await client.keep_alive(lease) == 30
        assert client.keepalives.opened == 1
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_keep_alive_given_up_takes_its_connection_with_it(private_etcd):
    """etcd stopped: the keep-alive times out and its connection is closed, so the answer etcd sends
    when it resumes reaches nobody; the next keep-alive goes on a new connection and is answered."""
    client = gateway_client(private_etcd.endpoint, call_timeout=0.3)
    try:
        lease = await client.grant_lease(30)
        assert await client.keep_alive(lease) == 30 and client.gateway.opened == 1
        freeze(private_etcd.process.pid)
        try:
            with pytest.raises((EtcdUnavailable, defer.TimeoutError, defer.CancelledError)):
                await client.keep_alive(lease, timeout=0.3)
        finally:
            os.kill(private_etcd.process.pid, signal.SIGCONT)
        assert await client.keep_alive(lease, timeout=3.0) == 30
        assert client.gateway.opened == 2
    finally:
        await client.close()


class Canned(Protocol):
    """A fake gateway: answers every request with ``factory.answer``, a byte at a time if asked."""

    def dataReceived(self, data):
        if b"\r\n\r\n" not in data:
            return
        answer = self.factory.answer
        if self.factory.bytewise:
            for k in range(len(answer)):
                reactor.callLater(0.001 * k, self.transport.write, answer[k:k + 1])
        else:
            self.transport.write(answer)


def chunked(status: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            f"{len(body):x}\r\n").encode() + body + b"\r\n0\r\n\r\n"


@pytest.fixture
def canned():
    factory = Factory.forProtocol(Canned)
    factory.bytewise = False
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    factory.endpoint = f"http://127.0.0.1:{port.getHost().port}"
    yield factory
    port.stopListening()


@pytest_twisted.ensureDeferred
async def test_answers_are_read_whole_and_only_ours_count(canned):
    client = gateway_client(canned.endpoint)
    try:
        canned.answer = chunked("200 OK", b'{"result":{"header":{},"ID":"4660","TTL":"3"}}')
        canned.bytewise = True  # every byte its own read
        assert await client.keep_alive(0x1234) == 3
        canned.bytewise = False
        assert await client.keep_alive(0x1234) == 3 and client.gateway.opened == 1
        canned.answer = chunked("200 OK", b'{"result":{"header":{},"ID":"4661","TTL":"3"}}')
        with pytest.raises(EtcdUnavailable, match="lease 1234 for lease 1235"):
            await client.keep_alive(0x1234)
        canned.answer = chunked("503 Service Unavailable",
                                b'{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader"}}')
        with pytest.raises(EtcdUnavailable, match="no leader"):
            await client.keep_alive(0x1234)
        canned.answer = b"SSH-2.0-OpenSSH\r\n\r\n"
        with pytest.raises(EtcdUnavailable, match="not an HTTP answer"):
            await client.keep_alive(0x1234)
        canned.answer = chunked("200 OK", b'{"result":{"header":{},"ID":"4660","TTL":"3"}}')
        assert await client.keep_alive(0x1234) == 3
        assert client.gateway.opened == 4, "a new connection after each failure"
    finally:
        await client.close()


def test_parse_and_granted_ttl():
    body = b'{"result":{"ID":"10","TTL":"5"}}'
    whole = chunked("200 OK", body)
    assert all(_parse(whole[:k]) is None for k in range(len(whole)))
    assert _parse(whole) == (200, body)
    assert _parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}") == (200, b"{}")
    assert granted_ttl(10, 200, body) == 5
    assert granted_ttl(10, 200, b'{"result":{"ID":"10"}}') == 0, "TTL 0 is left out of the JSON: gone"
    with pytest.raises(GatewayError):
        granted_ttl(10, 200, b'{"result":{"ID":"10","TTL":"x"}}')
    with pytest.raises(GatewayError):
        _parse(b"HTTP/1.1 200 OK\r\n\r\n")
    with pytest.raises(GatewayError):
        _parse(b"HTTP/1.1 200 OK\r\nContent-Length: lots\r\n\r\n")


def test_importing_the_client_leaves_systemds_passed_sockets_to_the_daemon():
    """twisted.internet.endpoints takes LISTEN_PID and LISTEN_FDS out of the environment when imported:
    the gateway used it, and the DNS listeners systemd passed were never found."""
    code = ("import os; os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='2', LISTEN_FDNAMES='dns:dns'); "
            "import networkd.app, networkd.etcd.client, networkd.etcd.gateway; "
            "print(sorted(k for k in os.environ if k.startswith('LISTEN_')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
    assert out.strip() == "['LISTEN_FDNAMES', 'LISTEN_FDS', 'LISTEN_PID']"


@pytest_twisted.ensureDeferred
async def test_an_endpoint_that_refuses_is_an_etcd_outage():
    from tests.support.ports import free_port

    client = gateway_client(f"http://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(EtcdUnavailable, match="cannot connect"):
            await client.keep_alive(0x1234)
    finally:
        await client.close()
