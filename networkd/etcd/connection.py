"""The connection under the etcd client: endpoints, TLS, fail-over, errors.

aetcd is asyncio (grpc.aio); Twisted's coroutine driver cannot await its
futures.  ``EtcdConnection._call`` runs every call as an asyncio task and
hands it back as a Deferred, so the rest of networkd sees Deferreds only.
Errors come out as two named types: ``EtcdUnavailable`` (retry later) and
``Compacted`` (re-read the prefix).  This module and networkd/etcd/client.py
(the operations: reads, writes, transactions, leases, watches) are the only
code that touches aetcd.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable

import aetcd
import grpc
from aetcd import exceptions as aetcd_errors
from aetcd import rpc
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger

from networkd.options import Endpoint

log = Logger()

# The aetcd release this module and networkd/etcd/client.py are written
# against, and the one setup.cfg pins: ``_Client.connect`` re-implements that
# release's ``Client.connect`` and sets its private fields.  tests/test_etcd_client_shape.py fails when
# the installed aetcd is another release or its client changed shape; to
# upgrade, re-check ``_Client.connect`` against the new ``Client.connect``,
# then move this, the pin and the test's fingerprints together.
AETCD_VERSION = "1.0.0"

# gRPC retries a broken channel with its own backoff, by default up to two
# minutes apart.  Keep it short: etcd coming back must be noticed at once.
CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.min_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 10000,
    "grpc.keepalive_timeout_ms": 3000,
    "grpc.keepalive_permit_without_calls": 1,
}

# An outage is over once calls have been answered this long with none failing: a member without quorum
# answers watches but not keep-alives, and one line per flap would be a line a second per node.
OUTAGE_SETTLE = 3.0

CONNECTION_ERRORS = (
    aetcd_errors.ConnectionFailedError,
    aetcd_errors.ConnectionTimeoutError,
    aetcd_errors.InternalError,
    aetcd_errors.WatchTimeoutError,
    rpc.AioRpcError,
    asyncio.TimeoutError,
    OSError,
)

DROPS_CONNECTION = (*CONNECTION_ERRORS, asyncio.CancelledError)  # errors after which a fresh client is opened


class EtcdUnavailable(Exception):
    """etcd did not answer; the call may be retried later."""


class Compacted(Exception):
    """The revision asked for was compacted away; re-read the prefix."""


@dataclass(frozen=True)
class TLSFiles:
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def credentials(self):
        def read(path):
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


class _Client(aetcd.Client):
    """aetcd's client, plus TLS channels (aetcd itself only opens insecure ones).

    Without credentials ``connect`` is aetcd's own.  With them it is aetcd
    1.0.0's ``Client.connect`` step for step, with ``secure_channel`` in
    place of ``insecure_channel``: aetcd has no hook for the channel, so
    this reads the fields its ``__init__`` sets and sets every field its
    ``connect`` sets (``AETCD_VERSION`` above says why that is safe).
    """

    def __init__(self, *args, credentials=None, **kwargs):
        self._credentials = credentials
        super().__init__(*args, **kwargs)

    async def connect(self) -> None:
        if self._credentials is None or self._connected.is_set():
            return await super().connect()
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            target = f"{self._host}:{self._port}"
            self.channel = rpc.secure_channel(target, self._credentials, options=self._options.items())
            if self._username is not None and self._password is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                resp = await self.auth_stub.Authenticate(
                    rpc.AuthenticateRequest(name=self._username, password=self._password),
                    timeout=self._timeout,
                )
                self.metadata = (("token", resp.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd.watcher.Watcher(
                rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False


def _translate(error: BaseException, endpoint: Endpoint) -> BaseException:
    if isinstance(error, aetcd_errors.RevisionCompactedError):
        return Compacted(f"revision compacted below {error.compacted_revision}")
    if isinstance(error, CONNECTION_ERRORS):
        detail = str(error) or type(error).__name__
        return EtcdUnavailable(f"etcd {endpoint}: {detail.splitlines()[0][:200]}")
    if isinstance(error, aetcd_errors.ClientError) and not str(error).strip():
        # aetcd passes grpc's details on as the text, and they may be empty (a status it does not map:
        # CANCELLED, RESOURCE_EXHAUSTED, UNKNOWN...): name the status and the endpoint instead.
        return EtcdUnavailable(f"etcd {endpoint}: {_status_of(error)} (no detail)")
    return error


def _status_of(error: BaseException) -> str:
    """The grpc status under an aetcd error (e.g. ``RESOURCE_EXHAUSTED``), else the error's type."""
    cause = error.__cause__
    if isinstance(cause, rpc.AioRpcError):
        return getattr(cause.code(), "name", str(cause.code()))
    return type(error).__name__


class EtcdConnection:
    """One aetcd client at a time, to one of the endpoints, with fail-over.

    ``_call`` runs an operation on it as an asyncio task and hands it back as
    a Deferred, bounded by ``call_timeout``; a connection error drops the
    client (the next call opens a fresh one, on the next endpoint if there
    are several).  The etcd operations are EtcdClient's (networkd/etcd/client.py).
    """

    def __init__(
        self,
        endpoints: Iterable[Endpoint],
        *,
        tls: TLSFiles | None = None,
        user: str | None = None,
        password: str | None = None,
        call_timeout: float = 3.0,
    ):
        self.endpoints = tuple(endpoints)
        self._tls = tls
        self._user = user
        self._password = password
        self.call_timeout = call_timeout
        self._index = 0
        self._client: _Client | None = None
        self._failed_at = [float("-inf")] * len(self.endpoints)  # monotonic time of each endpoint's last failure
        self.failovers = 0
        self._outage: tuple[float, int] | None = None  # (since, fail-overs) while calls keep failing
        self.outage_settle = OUTAGE_SETTLE
        self._settling: asyncio.TimerHandle | None = None  # ends the outage unless a call fails first

    @property
    def endpoint(self) -> Endpoint:
        return self.endpoints[self._index]

    def _current(self) -> _Client:
        if self._client is None:
            endpoint = self.endpoint
            secure = endpoint.secure or (self._tls is not None and any(vars(self._tls).values()))
            self._client = _Client(
                endpoint.host,
                endpoint.port,
                username=self._user,
                password=self._password,
                timeout=None,
                options=CHANNEL_OPTIONS,
                credentials=(self._tls or TLSFiles()).credentials() if secure else None,
            )
        return self._client

    def _failed(self, client: _Client | None) -> None:
        """Drop ``client`` after a connection error; with several endpoints, use the next.  ``None`` while
        no client is open: a call that is not the client's own (the gateway's keep-alive) failed."""
        if client is not self._client:
            return
        # A fresh aetcd client per connection loss: aetcd's watcher does not
        # always recover from a broken stream, a new one does.
        self._client = None
        self._failed_at[self._index] = time.monotonic()
        if len(self.endpoints) > 1:
            self._index = self._healthiest()
            self.failovers += 1
            if self._settling is not None:  # answered for a moment only: the same outage goes on
                self._settling.cancel()
                self._settling = None
            if self._outage is None:  # one line per outage, and one when it ends (not one per attempt)
                self._outage = (time.monotonic(), 0)
                log.warn("etcd: failing over to {endpoint}", endpoint=self.endpoint)
            self._outage = (self._outage[0], self._outage[1] + 1)
        if client is not None:
            asyncio.ensure_future(_close_quietly(client))

    def _healthiest(self) -> int:
        """The next endpoint in turn among those that failed longest ago (never, first): after a
        member dies, calls never go back to it while another has not failed as recently."""
        count = len(self.endpoints)
        order = [(self._index + step) % count for step in range(1, count + 1)]
        return min(order, key=lambda i: self._failed_at[i])

    def _call(self, operation: Callable[[_Client], Awaitable], timeout: float | None = None, *,
              spare_on_timeout: bool = False) -> Deferred:
        """``operation(client)`` as a Deferred, bounded by ``timeout``; a connection error drops the
        client, and so does a timeout unless ``spare_on_timeout`` (the caller retries on it first)."""

        async def run():
            client = self._current()
            endpoint = self.endpoint
            try:
                result = await _bounded(operation(client), timeout or self.call_timeout)
            except BaseException as e:
                translated = _translate(e, endpoint)
                if isinstance(e, asyncio.CancelledError) and not asyncio.current_task().cancelling():
                    # Not our caller's doing: grpc cancels the calls in flight on a channel that is
                    # closed (another call on it failed).  An etcd outage like any other.
                    translated = EtcdUnavailable(f"etcd {endpoint}: call cancelled, its connection was closed")
                spared = spare_on_timeout and isinstance(e, TimeoutError)
                if isinstance(translated, EtcdUnavailable) and isinstance(e, DROPS_CONNECTION) and not spared:
                    self._failed(client)  # (an error etcd answered with, such as RESOURCE_EXHAUSTED, is no reason)
                if translated is e:
                    raise
                raise translated from e
            self._answered(endpoint)
            return result

        return Deferred.fromFuture(asyncio.ensure_future(run())).addErrback(_twisted_cancel, self.endpoint)

    def _answered(self, endpoint: Endpoint) -> None:
        """A call was answered: in an outage, it ends once calls were answered for ``outage_settle`` s."""
        if self._outage is not None and self._settling is None:
            self._settling = asyncio.get_running_loop().call_later(
                self.outage_settle, self._settled, endpoint, time.monotonic())

    def _settled(self, endpoint: Endpoint, answered_at: float) -> None:
        """Calls were answered for ``outage_settle`` seconds, none failed: the outage is over."""
        self._settling = None
        if self._outage is not None:
            since, count = self._outage
            self._outage = None
            log.info("etcd: {endpoint} answers; {n} fail-over(s) in {s:.1f}s", endpoint=endpoint, n=count,
                     s=answered_at - since)

    def close(self) -> Deferred:
        if self._settling is not None:
            self._settling.cancel()
            self._settling = None
        client, self._client = self._client, None
        if client is None:
            return succeed(None)
        return Deferred.fromFuture(asyncio.ensure_future(_close_quietly(client)))


def _twisted_cancel(failure, endpoint: Endpoint | None = None):
    """An asyncio cancellation, seen from Twisted, is Twisted's CancelledError (with a text that
    says what was cancelled: a log line "could not ...: " with nothing after it helps nobody)."""
    failure.trap(asyncio.CancelledError)
    raise CancelledError(f"etcd {endpoint}: call cancelled" if endpoint else "etcd call cancelled")


async def _bounded(awaitable, timeout: float):
    """Like asyncio.wait_for, but never waits for a cancelled call to unwind.

    Some aetcd internals swallow cancellation (its watcher awaits its own
    stream task under ``except CancelledError: pass``); wait_for would then
    hang for ever.  Here the call is cancelled and left to finish alone.
    """
    call = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({call}, timeout=timeout)
    if not done:
        call.cancel()
        call.add_done_callback(_consume)
        raise asyncio.TimeoutError()
    return call.result()


def _consume(future) -> None:
    if not future.cancelled():
        future.exception()


async def _quietly(awaitable, timeout: float = 1.0) -> None:
    try:
        await _bounded(awaitable, timeout)
    except BaseException:
        pass


async def _close_quietly(client: _Client) -> None:
    await _quietly(client.close())
