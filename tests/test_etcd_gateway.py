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
from tests.support.waiting import eventually, sleep


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
    """Nobody listening for late answers, etcd stopped: the keep-alive times out and its connection is
    closed, so the answer etcd sends when it resumes reaches nobody; the next keep-alive goes on a new
    connection and is answered."""
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


@pytest_twisted.ensureDeferred
async def test_keep_alives_timing_out_leave_the_watches_on_the_only_endpoint(private_etcd):
    """An etcd slow to apply a burst of writes answers keep-alives late, but its grpc connection is
    fine: with one endpoint, keep-alives through the gateway that time out in a row neither drop the
    grpc connection nor end its watches (they did: every daemon of a cluster then read its prefixes
    again at etcd's busiest moment)."""
    client = gateway_client(private_etcd.endpoint, call_timeout=0.2)
    events = []
    try:
        lease = await client.grant_lease(30)
        handle = await client.watch_prefix(b"/watched/", 1, events.append)
        grpc_client = client._client
        freeze(private_etcd.process.pid)
        try:
            for _ in range(3):
                with pytest.raises((EtcdUnavailable, defer.TimeoutError)):
                    await client.keep_alive(lease, timeout=0.2)
        finally:
            os.kill(private_etcd.process.pid, signal.SIGCONT)
        assert client._client is grpc_client, "the grpc connection stays"
        assert not handle.done.called, "the watch goes on"
        assert await client.keep_alive(lease, timeout=3.0) == 30
        private_etcd.ctl("put", "/watched/a", "1")
        await eventually(lambda: [e.key for e in events] == [b"/watched/a"], timeout=5,
                         message="the same watch sees the put")
        handle.cancel()
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


def serving(protocol, **state):
    """A fake gateway on 127.0.0.1 speaking ``protocol``: (its factory with ``endpoint`` and ``state``,
    the listening port to stop)."""
    factory = Factory.forProtocol(protocol)
    factory.__dict__.update(state)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    factory.endpoint = f"http://127.0.0.1:{port.getHost().port}"
    return factory, port


@pytest.fixture
def canned():
    factory, port = serving(Canned, bytewise=False)
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


class Held(Protocol):
    """A fake gateway that answers each request ``factory.delays[k]`` seconds after it came (k: the
    requests so far, all connections together), with ``factory.answers[k]`` (default: ours, TTL 3)."""

    def connectionMade(self):
        self.factory.opened.append(self)

    def dataReceived(self, data):
        if b"\r\n\r\n" not in data:
            return
        k = len(self.factory.asked)
        self.factory.asked.append(self)
        answer = self.factory.answers.get(k, chunked("200 OK", b'{"result":{"header":{},"ID":"4660","TTL":"3"}}'))
        delay = self.factory.delays.get(k, 0.0)
        reactor.callLater(delay, lambda: self.transport.connected and self.transport.write(answer))

    def connectionLost(self, reason):
        self.factory.closed.append((self, reactor.seconds()))


def holding():
    return serving(Held, delays={}, answers={}, opened=[], asked=[], closed=[])


@pytest.fixture
def held():
    factory, port = holding()
    yield factory
    port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_keep_alive_timed_out_moves_to_the_next_endpoint_and_one_endpoint_is_spared_once(held):
    """As for every other call: with several endpoints a keep-alive that timed out moves the client to
    the next one (a dead leader gives no other sign); with one, timeouts in a row keep it."""
    other, port = holding()
    try:
        client = gateway_client(held.endpoint, other.endpoint)
        held.delays[0] = 1.0
        with pytest.raises(EtcdUnavailable, match="no answer within 0.2s"):
            await client.keep_alive(0x1234, timeout=0.2)
        assert str(client.endpoint) == other.endpoint and client.failovers == 1
        assert await client.keep_alive(0x1234, timeout=1.0) == 3 and len(other.asked) == 1
        await client.close()

        client = gateway_client(other.endpoint)
        other.delays[1] = other.delays[2] = 1.0
        with pytest.raises(EtcdUnavailable):
            await client.keep_alive(0x1234, timeout=0.2)
        with pytest.raises(EtcdUnavailable):
            await client.keep_alive(0x1234, timeout=0.2)
        assert client._failed_at[0] == float("-inf"), "timeouts spare the only endpoint"
        await client.close()
    finally:
        port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_keep_alive_given_up_is_still_heard_when_its_answer_comes(held):
    """An etcd follower holds a keep-alive through a leader election and answers it once a new leader
    is known: given up at its bound, the request stays on its connection, and its answer goes to the
    late listener with its age; the next keep-alive goes on a new connection meanwhile."""
    client = gateway_client(held.endpoint)
    heard = []
    assert client.hear_late_keep_alives(lambda *a: heard.append((*a, reactor.seconds())), window=2.0)
    try:
        held.delays[0] = 0.6
        asked_at = reactor.seconds()
        with pytest.raises(EtcdUnavailable):
            await client.keep_alive(0x1234, timeout=0.2)
        assert held.closed == [], "given up, its connection stays to hear the answer"
        assert await client.keep_alive(0x1234, timeout=1.0) == 3, "the next one, on a new connection"
        assert client.gateway.opened == 2
        await eventually(lambda: heard, timeout=3, message="the late answer is heard")
        lease, ttl, age, at = heard[0]
        assert (lease, ttl) == (0x1234, 3)
        assert 0.55 <= age <= at - asked_at + 0.01, f"its age ({age:.3f}s) counts from its sending"
        await eventually(lambda: held.opened[0] in [c for c, _ in held.closed], timeout=1,
                         message="the connection closes once it was heard")
        assert held.opened[1] not in [c for c, _ in held.closed], "the connection in use stays"
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_late_answers_heard_are_ours_in_time_and_one_per_endpoint(held):
    client = gateway_client(held.endpoint)
    heard = []
    client.hear_late_keep_alives(lambda *a: heard.append(a), window=0.5)
    try:
        # Another lease's answer is no answer to ours.
        held.delays[0], held.answers[0] = 0.3, chunked("200 OK", b'{"result":{"header":{},"ID":"4661","TTL":"3"}}')
        with pytest.raises(EtcdUnavailable):
            await client.keep_alive(0x1234, timeout=0.1)
        # An answer after the window: its connection was closed at the window, nothing is heard.
        held.delays[1] = 1.0
        given_up = reactor.seconds()
        with pytest.raises(EtcdUnavailable):
            await client.keep_alive(0x1234, timeout=0.1)
        await sleep(1.2)
        assert heard == []
        closed_at = dict(held.closed)[held.asked[1]]
        assert 0.35 <= closed_at - given_up <= 0.8, "closed at the window, 0.5 s after its sending"
        # Two given up in a row on one endpoint: the newer one is listened to, the older closed.
        held.delays[2] = held.delays[3] = 0.4
        with pytest.raises(EtcdUnavailable):
            await client.keep_alive(0x1234, timeout=0.1)
        with pytest.raises(EtcdUnavailable):
            await client.keep_alive(0x1234, timeout=0.1)
        await eventually(lambda: heard, timeout=2, message="the newer one's answer")
        await sleep(0.1)
        assert len(heard) == 1 and heard[0][2] < 0.45
        assert held.asked[2] in dict(held.closed)
    finally:
        await client.close()
    assert len(held.closed) == len(held.opened), "closing the client closes every connection"


@pytest.fixture
def etcd_cluster():
    from tests.support.etcdcluster import EtcdCluster

    cluster = EtcdCluster(3).start()
    yield cluster
    cluster.destroy()


@pytest_twisted.ensureDeferred
async def test_a_follower_answers_a_keep_alive_given_up_during_a_leader_election(etcd_cluster):
    """The real thing: the etcd leader is killed and a keep-alive goes to a follower at once.  No
    leader can be elected within its bound (0.3 s; the election timeout is 0.5 s), so it is given
    up; the follower answers it when the new leader is known, and the answer is heard."""
    leader = etcd_cluster.leader()
    follower = next(m for m in etcd_cluster.members if m is not leader)
    client = gateway_client(follower.endpoint)
    heard = []
    client.hear_late_keep_alives(lambda *a: heard.append(a), window=5.0)
    try:
        lease = await client.grant_lease(10)
        assert await client.keep_alive(lease) == 10
        etcd_cluster.kill(leader)
        with pytest.raises((EtcdUnavailable, defer.TimeoutError)):
            await client.keep_alive(lease, timeout=0.3)
        await eventually(lambda: heard, timeout=8, message="the follower's answer after the election")
        assert heard[0][0] == lease and heard[0][1] > 0
        assert 0.3 <= heard[0][2] < 5.0
    finally:
        await client.close()


@pytest.mark.parametrize("transport, through_gateway", [("gateway", True), ("grpc", False)])
def test_the_daemon_keeps_its_lease_alive_as_etcd_keepalives_says(monkeypatch, transport, through_gateway):
    """--etcd-keepalives gateway (the default) gives the daemon's client the reactor, which puts its
    keep-alives on the gateway; grpc does not."""
    import networkd.app as app
    from twisted.internet.task import Clock

    from networkd.options import Options

    assert dict((p[0], p[2]) for p in Options.optParameters)["etcd-keepalives"] == "gateway"
    class FakeReactor(Clock):
        def callWhenRunning(self, f, *args):
            pass

    given = []
    monkeypatch.setattr(app, "install_asyncio_reactor", lambda: FakeReactor())
    monkeypatch.setattr(app, "meter_turns", lambda reactor: None)
    monkeypatch.setattr(app, "build", lambda *a, **k: object())
    monkeypatch.setattr(app, "make_client", lambda options, reactor=None: given.append(reactor))
    app.makeService({"etcd-keepalives": transport})
    assert (given[0] is not None) is through_gateway


@pytest_twisted.ensureDeferred
async def test_the_keep_alive_after_a_late_answer_goes_to_the_member_that_gave_it(held):
    """A follower that answers a given-up keep-alive knows a leader now: the next keep-alive goes to it,
    though the client moved on to the next endpoint meanwhile; the one after, to the client's own."""
    other, port = holding()
    try:
        client = gateway_client(held.endpoint, other.endpoint)
        heard = []
        client.hear_late_keep_alives(lambda *a: heard.append(a), window=3.0)
        held.delays[0] = 0.5
        with pytest.raises(EtcdUnavailable):
            await client.keep_alive(0x1234, timeout=0.2)
        assert str(client.endpoint) == other.endpoint, "moved on"
        await eventually(lambda: heard, timeout=3, message="the late answer")
        assert await client.keep_alive(0x1234, timeout=1.0) == 3
        assert (len(held.asked), len(other.asked)) == (2, 0), "asked where the answer came from"
        assert await client.keep_alive(0x1234, timeout=1.0) == 3
        assert (len(held.asked), len(other.asked)) == (2, 1), "then at the client's own endpoint"
        await client.close()
    finally:
        port.stopListening()
