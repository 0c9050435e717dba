"""Lease keep-alives through etcd's JSON gateway, on one persistent HTTP/1.1 connection.

At rest a daemon's keep-alives are most of what it spends: grpc.aio
completes the write and the read of each on its poller thread and wakes the
event loop for each, and every wake-up costs ~0.2 ms of CPU on a VM.  The
same keep-alive as an HTTP/1.1 request to the gateway etcd serves on its
client port (``POST /v3/lease/keepalive``) is one write and, nearly always,
one read in one wake-up.  Watches, reads and writes stay on grpc (aetcd).

Used for plain ``http`` endpoints without a user: with TLS or an auth token
the keep-alives stay on grpc (``KeepAliveStream``).  An endpoint that answers
404 serves no gateway (``--enable-grpc-gateway=false``): ``GatewayMissing``,
and the client keeps grpc from then on.

Safety, as for the stream: the session dates the lease from the send time of
the request it believes answered.  So one request at a time on a connection;
a request given up (a timeout, a cancellation, an error) closes the
connection, so that its late answer reaches nobody; and an answer counts
only if it names our lease.
"""

from __future__ import annotations

import asyncio
import json

from twisted.internet import defer
from twisted.internet.protocol import ClientFactory, Protocol

from networkd.options import Endpoint

PATH = b"/v3/lease/keepalive"
MAX_ANSWER = 64 * 1024  # a keep-alive answer is ~200 bytes: more is not etcd's gateway


class GatewayMissing(Exception):
    """The endpoint serves no JSON gateway (404): keep-alives go over grpc."""


class GatewayError(ConnectionError):
    """No usable answer: the connection is closed and the call counts as an etcd outage."""


class _Connection(Protocol):
    """One HTTP/1.1 connection, one request at a time: ``ask`` fires with (status, body)."""

    def __init__(self):
        self._buffer = b""
        self._waiting: defer.Deferred | None = None
        self.lost = False

    def connectionMade(self):
        if not self.factory.connected.called:  # (not given up meanwhile)
            self.factory.connected.callback(self)

    def connectionLost(self, reason):
        self.lost = True
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.errback(GatewayError(f"connection closed before the answer ({reason.getErrorMessage()})"))

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.abortConnection()

    def ask(self, request: bytes) -> defer.Deferred:
        self._buffer = b""
        self._waiting = defer.Deferred(self._given_up)
        self.transport.write(request)
        return self._waiting

    def _given_up(self, waiting: defer.Deferred) -> None:
        """Cancelled (a timeout, our stop): the connection goes, and its late answer with it."""
        if self._waiting is waiting:
            self._waiting = None
        self.close()

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if self._waiting is None:  # nothing was asked: not an answer to anything of ours
            self.close()
            return
        try:
            answer = _parse(self._buffer)
        except GatewayError as e:
            waiting, self._waiting = self._waiting, None
            self.close()
            waiting.errback(e)
            return
        if answer is not None:
            waiting, self._waiting = self._waiting, None
            self._buffer = b""
            waiting.callback(answer)


def _parse(buffer: bytes) -> tuple[int, bytes] | None:
    """(status, body) of a whole HTTP/1.1 answer in ``buffer``, None while it is incomplete."""
    if len(buffer) > MAX_ANSWER:
        raise GatewayError(f"answer longer than {MAX_ANSWER} bytes")
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    lines = buffer[:head_end].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise GatewayError(f"not an HTTP answer: {lines[0][:60]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip().lower()
    rest = buffer[head_end + 4:]
    if headers.get(b"transfer-encoding") == b"chunked":
        body = _dechunk(rest)
        return None if body is None else (int(parts[1]), body)
    if headers.get(b"content-length", b"").isdigit():
        length = int(headers[b"content-length"])
        return None if len(rest) < length else (int(parts[1]), rest[:length])
    raise GatewayError("answer with neither a length nor chunks")


def _dechunk(data: bytes) -> bytes | None:
    """The body of a whole chunked encoding, None while the last chunk has not come."""
    body, at = [], 0
    while True:
        line_end = data.find(b"\r\n", at)
        if line_end < 0:
            return None
        try:
            size = int(data[at:line_end].split(b";")[0], 16)
        except ValueError:
            raise GatewayError("malformed chunk size") from None
        if size == 0:
            return b"".join(body) if data.find(b"\r\n", line_end + 2) >= 0 else None
        if len(data) < line_end + 2 + size + 2:
            return None
        body.append(data[line_end + 2:line_end + 2 + size])
        at = line_end + 2 + size + 2


def granted_ttl(lease: int, status: int, body: bytes) -> int:
    """The TTL etcd granted ``lease`` (0: gone) from the gateway's answer; GatewayError if none."""
    if status == 404:
        raise GatewayMissing("no JSON gateway (HTTP 404)")
    try:
        message = json.loads(body.split(b"\n", 1)[0])  # a stream's answer: one JSON message a line
    except ValueError:
        raise GatewayError(f"HTTP {status}, not JSON: {body[:80]!r}") from None
    if not isinstance(message, dict):
        raise GatewayError(f"HTTP {status}, unexpected answer: {body[:80]!r}")
    if "error" in message or status != 200:
        error = message.get("error") or message
        text = error.get("message") if isinstance(error, dict) else None
        raise GatewayError(f"HTTP {status}: {text or str(error)[:120]}")
    result = message.get("result")
    if not isinstance(result, dict):
        raise GatewayError(f"answer without a result: {body[:80]!r}")
    try:
        answered, ttl = int(result.get("ID", 0)), int(result.get("TTL", 0))  # zero values are left out
    except (TypeError, ValueError):
        raise GatewayError(f"answer with a malformed ID or TTL: {body[:80]!r}") from None
    if answered != lease:
        # etcd answers each request with its lease's ID: another one is no answer to ours (the session
        # would date our lease from it).
        raise GatewayError(f"etcd answered a keep-alive of lease {lease:x} for lease {answered:x}")
    return max(0, ttl)


class _Connecting(ClientFactory):
    """Fires ``connected`` with the connection, or fails it with why it could not be made;
    cancelling ``connected`` stops the attempt."""

    def __init__(self):
        self._connector = None
        self.connected = defer.Deferred(lambda _: self._connector and self._connector.disconnect())

    def startedConnecting(self, connector):
        self._connector = connector

    def buildProtocol(self, addr):
        connection = _Connection()
        connection.factory = self
        return connection

    def clientConnectionFailed(self, connector, reason):
        if not self.connected.called:
            self.connected.errback(GatewayError(f"cannot connect: {reason.getErrorMessage()}"))


class GatewayKeepAlive:
    """``refresh(endpoint, lease)``: the TTL granted, over one HTTP/1.1 connection reused across calls."""

    def __init__(self, reactor, connect_timeout: float = 3.0):
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._connection: _Connection | None = None
        self._endpoint: Endpoint | None = None
        self._busy = False  # a request is outstanding on ``_connection``
        self.opened = 0  # connections opened so far (tests, diagnostics)

    async def refresh(self, endpoint: Endpoint, lease: int) -> int:
        loop = asyncio.get_running_loop()
        connection = self._connection
        if connection is None or connection.lost or self._endpoint != endpoint or self._busy:
            self.close()  # (another endpoint now, the previous request given up, or etcd closed it)
            connection = await self._connect(endpoint, loop)
        self._busy = True
        try:
            status, body = await connection.ask(_request(endpoint, lease)).asFuture(loop)
            ttl = granted_ttl(lease, status, body)
        except BaseException:
            self._drop(connection)
            raise
        if connection is self._connection:
            self._busy = False
        return ttl

    async def _connect(self, endpoint: Endpoint, loop) -> _Connection:
        # reactor.connectTCP, not twisted.internet.endpoints: importing that module takes LISTEN_PID and
        # LISTEN_FDS out of the environment (its systemd parser reads them at import), and the DNS
        # listeners systemd passed were then never found (tests/test_dns_activation.py).
        factory = _Connecting()
        self._reactor.connectTCP(endpoint.host, endpoint.port, factory, self._connect_timeout)
        connection = await factory.connected.asFuture(loop)
        self._connection, self._endpoint, self._busy = connection, endpoint, False
        self.opened += 1
        return connection

    def _drop(self, connection: _Connection) -> None:
        connection.close()
        if connection is self._connection:
            self._connection, self._endpoint, self._busy = None, None, False

    def close(self) -> None:
        connection, self._connection, self._endpoint, self._busy = self._connection, None, None, False
        if connection is not None:
            connection.close()


def _request(endpoint: Endpoint, lease: int) -> bytes:
    body = b'{"ID":"%d"}' % lease
    host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
    return (b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (PATH, host.encode("idna"), endpoint.port, len(body), body))
