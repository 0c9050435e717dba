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
a request given up (a timeout, a cancellation, an error) leaves its
connection, so that its late answer can never be read as the answer to
another request; and an answer counts only if it names our lease.

A request given up at its bound is not always lost, though: during an etcd
leader election a follower holds every keep-alive until a new leader is
known and then answers it, before any request sent later elsewhere.  With a
listener for late answers (``late``), a request given up by a timeout stays
on its connection, now its own, for ``late_window`` seconds; its answer goes
to the listener with the request's age, so the session can date the lease
from when that request was sent (never later).  One such connection per
endpoint: a newer one replaces it.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Callable

from twisted.internet import defer
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from networkd.options import Endpoint

log = Logger()

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
    """``refresh(endpoint, lease)``: the TTL granted, over one HTTP/1.1 connection reused across calls.

    ``late(lease, ttl, age)``, when set, hears the answers to requests given up by a timeout that
    came within ``late_window`` seconds of their sending (module docstring)."""

    def __init__(self, reactor, connect_timeout: float = 3.0, clock: Callable[[], float] = time.monotonic):
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._clock = clock
        self._connection: _Connection | None = None
        self._endpoint: Endpoint | None = None
        self._busy = False  # a request is outstanding on ``_connection``
        self._waiting_late: dict[Endpoint, _Connection] = {}  # given-up requests still listened to
        self.late: Callable[[int, int, float], None] | None = None
        self.late_window = 0.0
        self.opened = 0  # connections opened so far (tests, diagnostics)
        self.late_answers = 0  # answers heard after their request was given up (tests, diagnostics)

    async def refresh(self, endpoint: Endpoint, lease: int) -> int:
        loop = asyncio.get_running_loop()
        connection = self._connection
        if connection is None or connection.lost or self._endpoint != endpoint or self._busy:
            self._close_current()  # (another endpoint now, the previous request given up, or etcd closed it)
            connection = await self._connect(endpoint, loop)
        self._busy = True
        asked_at = self._clock()
        asked = connection.ask(_request(endpoint, lease))
        answer = loop.create_future()
        asked.addBoth(_hand_to, answer)
        try:
            result = await answer
            if isinstance(result, Failure):
                result.raiseException()
            status, body = result
            ttl = granted_ttl(lease, status, body)
        except asyncio.CancelledError:
            if self.late is not None and not connection.lost:
                self._listen_late(endpoint, connection, asked, lease, asked_at)
            else:
                asked.addErrback(lambda _: None)  # (its CancelledError is ours, already raised)
                asked.cancel()
                self._drop(connection)
            raise
        except BaseException:
            self._drop(connection)
            raise
        if connection is self._connection:
            self._busy = False
        return ttl

    def _listen_late(self, endpoint: Endpoint, connection: _Connection, asked: defer.Deferred,
                     lease: int, asked_at: float) -> None:
        """The request given up stays on ``connection``, which leaves the pool: its answer, if it
        comes within ``late_window``, goes to ``late``; then the connection is closed."""
        if connection is self._connection:
            self._connection, self._endpoint, self._busy = None, None, False
        older = self._waiting_late.pop(endpoint, None)
        if older is not None:
            older.close()  # the newer request's answer dates the lease later
        self._waiting_late[endpoint] = connection
        expiry = self._reactor.callLater(self.late_window, connection.close)

        def heard(result):
            if expiry.active():
                expiry.cancel()
            if self._waiting_late.get(endpoint) is connection:
                del self._waiting_late[endpoint]
            connection.close()  # it served its one request
            if isinstance(result, Failure):
                return None  # closed, replaced, expired or etcd failed: nothing heard
            try:
                ttl = granted_ttl(lease, *result)
            except (GatewayError, GatewayMissing) as e:
                log.info("etcd {endpoint}: a late keep-alive answer is no answer: {e}", endpoint=endpoint, e=e)
                return None
            listener = self.late
            if listener is not None:
                self.late_answers += 1
                try:
                    listener(lease, ttl, self._clock() - asked_at)
                except Exception:
                    log.failure("late keep-alive listener failed")
            return None

        asked.addBoth(heard)

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

    def _close_current(self) -> None:
        connection, self._connection, self._endpoint, self._busy = self._connection, None, None, False
        if connection is not None:
            connection.close()

    def close(self) -> None:
        """Every connection, those listening for late answers too (the client is closing)."""
        self._close_current()
        waiting, self._waiting_late = list(self._waiting_late.values()), {}
        for connection in waiting:
            connection.close()


def _hand_to(result, answer: asyncio.Future):
    """The connection's answer (or Failure) to ``refresh``; passed on untouched once it gave up."""
    if answer.done():
        return result
    answer.set_result(result)
    return None


def _request(endpoint: Endpoint, lease: int) -> bytes:
    body = b'{"ID":"%d"}' % lease
    host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
    return (b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (PATH, host.encode("idna"), endpoint.port, len(body), body))
