"""Lease keep-alives through etcd's JSON gateway, on one persistent HTTP/1.1 connection.

At rest a daemon's keep-alives are most of what it spends: on grpc each one
wakes grpc's own threads some twenty times and then the event loop twice
(~2 ms of CPU a keep-alive, bench/keepalive_cost.py).  The same keep-alive
as an HTTP/1.1 request to the gateway etcd serves on its client port
(``POST /v3/lease/keepalive``) is one ``send`` in the turn the session's timer
woke, and one read in the turn the answer wakes: no task, no other turn (an
asyncio protocol writes at once, where a Twisted transport waits a turn for
the socket to be writable).  Watches, reads and writes stay on grpc (aetcd).

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


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection, one request at a time: ``ask`` returns a Deferred of (status, body)."""

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self._buffer = b""
        self._waiting: defer.Deferred | None = None
        self.lost = False

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.lost = True
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.errback(GatewayError(f"connection closed before the answer ({exc or 'closed by etcd'})"))

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.abort()  # connection_lost follows, a turn later

    def ask(self, request: bytes) -> defer.Deferred:
        self._buffer = b""
        self._waiting = defer.Deferred(self._given_up)
        self.transport.write(request)  # sent now, in this turn, while the socket takes it
        return self._waiting

    def _given_up(self, waiting: defer.Deferred) -> None:
        """Cancelled (a timeout, our stop): the connection goes, and its late answer with it."""
        if self._waiting is waiting:
            self._waiting = None
        self.close()

    def data_received(self, data: bytes) -> None:
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


class GatewayKeepAlive:
    """``refresh(endpoint, lease, timeout)``: a Deferred of the TTL granted, over one HTTP/1.1 connection
    reused across calls.  It fails with GatewayError (the connection, or etcd's answer, failed),
    GatewayMissing, or TimeoutError (no answer within ``timeout``).

    ``late(lease, ttl, age, endpoint)``, when set, hears the answers to requests given up by a timeout that
    came within ``late_window`` seconds of their sending (module docstring)."""

    def __init__(self, reactor, connect_timeout: float = 3.0, clock: Callable[[], float] = time.monotonic):
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._clock = clock
        self._connection: _Connection | None = None
        self._endpoint: Endpoint | None = None
        self._busy = False  # a request is outstanding on ``_connection``
        self._waiting_late: dict[Endpoint, _Connection] = {}  # given-up requests still listened to
        self.late: Callable[[int, int, float, Endpoint], None] | None = None
        self.late_window = 0.0
        self.opened = 0  # connections opened so far (tests, diagnostics)

    def refresh(self, endpoint: Endpoint, lease: int, timeout: float) -> defer.Deferred:
        call = _Call(self, endpoint, lease, timeout)
        connection = self._connection
        if connection is None or connection.lost or self._endpoint != endpoint or self._busy:
            self._drop(self._connection)  # (another endpoint now, the previous request given up, or etcd closed it)
            call.connect()
        else:
            call.ask(connection)
        return call.done

    def _connect(self, endpoint: Endpoint) -> defer.Deferred:
        """A Deferred of a new connection to ``endpoint``, which becomes the one in use."""
        loop = asyncio.get_running_loop()
        connecting = asyncio.ensure_future(asyncio.wait_for(
            loop.create_connection(_Connection, endpoint.host, endpoint.port), self._connect_timeout))

        def made(pair):
            self._connection, self._endpoint, self._busy = pair[1], endpoint, False
            self.opened += 1
            return pair[1]

        def failed(failure):
            failure.trap(OSError, TimeoutError)
            raise GatewayError(f"cannot connect: {failure.getErrorMessage() or failure.type.__name__}")

        return defer.Deferred.fromFuture(connecting).addCallbacks(made, failed)

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
                try:
                    listener(lease, ttl, self._clock() - asked_at, endpoint)
                except Exception:
                    log.failure("late keep-alive listener failed")
            return None

        asked.addBoth(heard)

    def _drop(self, connection: _Connection | None) -> None:
        if connection is None:
            return
        connection.close()
        if connection is self._connection:
            self._connection, self._endpoint, self._busy = None, None, False

    def close(self) -> None:
        """Every connection, those listening for late answers too (the client is closing)."""
        self._drop(self._connection)
        waiting, self._waiting_late = list(self._waiting_late.values()), {}
        for connection in waiting:
            connection.close()


class _Call:
    """One keep-alive: connect if need be, ask, and settle ``done`` once, with the TTL, a failure,
    or TimeoutError at ``timeout``; whatever comes after that is the late listener's or nobody's."""

    def __init__(self, owner: GatewayKeepAlive, endpoint: Endpoint, lease: int, timeout: float):
        self.owner, self.endpoint, self.lease = owner, endpoint, lease
        self.done = defer.Deferred(lambda _: self._abandon())  # cancelled (our stop)
        self.timer = owner._reactor.callLater(timeout, self._timed_out, timeout)
        self.connecting: defer.Deferred | None = None
        self.connection: _Connection | None = None
        self.asked: defer.Deferred | None = None
        self.asked_at = 0.0
        self.given_up = False  # timed out: what comes now is the late listener's or nobody's

    def connect(self) -> None:
        try:
            self.connecting = self.owner._connect(self.endpoint)
        except Exception:  # (no event loop running: not the daemon's case) a failed call, not a raise
            self._settle(Failure())
            return
        self.connecting.addCallbacks(self._connected, self._settle)

    def _connected(self, connection: _Connection) -> None:
        self.connecting = None
        if not (self.given_up or self.done.called):  # (a connect given up was cancelled)
            self.ask(connection)

    def ask(self, connection: _Connection) -> None:
        self.connection = connection
        self.owner._busy = True
        self.asked_at = self.owner._clock()
        self.asked = connection.ask(_request(self.endpoint, self.lease))
        self.asked.addBoth(self._settle)

    def _settle(self, result):
        """The answer (or the failure) while ``done`` waits; passed on untouched once it does not."""
        if self.given_up or self.done.called:
            return result
        self.timer.cancel()
        self.connecting = None
        if not isinstance(result, Failure):
            try:
                ttl = granted_ttl(self.lease, *result)
            except (GatewayError, GatewayMissing):
                result = Failure()
            else:
                if self.connection is self.owner._connection:
                    self.owner._busy = False
                self.done.callback(ttl)
                return None
        self.owner._drop(self.connection)
        self.done.errback(result)
        return None

    def _timed_out(self, timeout: float) -> None:
        # Everything is put away before ``done`` fails: its callbacks may send the next keep-alive at once.
        self.given_up = True
        owner = self.owner
        if self.connecting is not None:
            connecting, self.connecting = self.connecting, None
            connecting.addErrback(lambda _: None)
            connecting.cancel()
        elif self.asked is not None:
            if owner.late is not None and not self.connection.lost:
                owner._listen_late(self.endpoint, self.connection, self.asked, self.lease, self.asked_at)
            else:
                self.asked.addErrback(lambda _: None)
                self.asked.cancel()
                owner._drop(self.connection)
        self.done.errback(TimeoutError(f"no answer within {timeout:g}s"))

    def _abandon(self) -> None:
        """Cancelled by the caller: nothing is listened to."""
        if self.timer.active():
            self.timer.cancel()
        for pending in (self.connecting, self.asked):
            if pending is not None and not pending.called:
                pending.addErrback(lambda _: None)
                pending.cancel()
        self.owner._drop(self.connection)


def _request(endpoint: Endpoint, lease: int) -> bytes:
    body = b'{"ID":"%d"}' % lease
    host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
    return (b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (PATH, host.encode("idna"), endpoint.port, len(body), body))
