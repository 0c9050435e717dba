"""The etcd client networkd uses: reads, writes, transactions, leases, watches.

Every method returns a Deferred.  The connection under it (endpoints, TLS,
fail-over, turning asyncio calls into Deferreds, the two named errors
``EtcdUnavailable`` and ``Compacted``) is networkd/etcd/connection.py; its
public names are importable from here too.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable

from aetcd import exceptions as aetcd_exceptions, rpc, transactions, utils as aetcd_utils
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from networkd.etcd.connection import (  # noqa: F401  (re-exported: imported from here)
    AETCD_VERSION,
    CHANNEL_OPTIONS,
    CONNECTION_ERRORS,
    Compacted,
    EtcdConnection,
    EtcdUnavailable,
    TLSFiles,
    _Client,
    _quietly,
    _translate,
    _twisted_cancel,
)
from networkd.etcd.gateway import GatewayKeepAlive, GatewayMissing
from networkd.etcd.keepalive import KeepAliveStream
from networkd.options import Endpoint

log = Logger()

__all__ = [
    "AETCD_VERSION", "CHANNEL_OPTIONS", "CONNECTION_ERRORS", "Compacted", "EtcdClient", "EtcdUnavailable",
    "KeyValue", "TLSFiles", "WatchEvent", "WatchHandle",
]


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    lease: int
    create_revision: int = 0  # which incarnation of the key this is (0: not known)


@dataclass(frozen=True)
class WatchEvent:
    deleted: bool
    key: bytes
    value: bytes
    mod_revision: int


class _LeaseCompare(transactions.BaseCompare):
    """aetcd has no compare on a key's lease; etcd has (``Compare.LEASE``)."""

    def build_compare(self, compare):
        compare.target = rpc.Compare.LEASE
        compare.lease = int(self.value)


class WatchHandle:
    """A running prefix watch: ``done`` fires when it ends, ``cancel()`` ends it."""

    def __init__(self, task: asyncio.Task):
        self._task = task
        self.done: Deferred = Deferred.fromFuture(task).addErrback(_twisted_cancel)

    def cancel(self) -> None:
        self._task.cancel()


class EtcdClient(EtcdConnection):
    """etcd v3 over aetcd, with endpoint fail-over; every method returns a Deferred."""

    def __init__(self, *args, reactor=None, **kwargs):
        """``reactor``: lease keep-alives go through etcd's JSON gateway with it (networkd.etcd.gateway)
        where they can (plain http, no user); without it, or where they cannot, on a grpc stream."""
        super().__init__(*args, **kwargs)
        self.keepalives = KeepAliveStream()
        plain = self._tls is None and self._user is None and not any(e.secure for e in self.endpoints)
        self.gateway = GatewayKeepAlive(reactor) if reactor is not None and plain else None
        self._keepalive_late = False  # the last keep-alive timed out
        self._answering: Endpoint | None = None  # where a given-up keep-alive was just answered

    def close(self) -> Deferred:
        self.keepalives.close()
        if self.gateway is not None:
            self.gateway.close()
        return super().close()

    # -- reads ---------------------------------------------------------------

    def get_prefix(self, prefix: bytes, page: int = 0, convert: Callable | None = None,
                   sink: Callable | None = None) -> Deferred:
        """(revision, [KeyValue]) for every key under ``prefix``, read at one revision.

        ``page``: at most that many keys a request, the later ones pinned to the
        first one's revision, so a big prefix is decoded a page at a time with
        the reactor free between pages (a 40,000-key answer took ~0.2 s in one
        go).  ``convert(key, value)``: what to keep of each key instead of a
        KeyValue, done page by page too.  ``sink(key, value)`` (with ``page``): each key
        is handed to it as its page comes, and the list returned is empty; ``sink(None, None)``
        starts each attempt (a retry after a failure reads again from the first key)."""

        async def op(client):
            if not page:
                result = await client.get_prefix(prefix)
                return result.header.revision, [
                    KeyValue(kv.key, kv.value, kv.mod_revision, kv.lease, kv.create_revision) if convert is None
                    else convert(kv.key, kv.value) for kv in result.kvs
                ]
            await client.connect()
            if sink is not None:
                sink(None, None)
            start, end, revision, out = prefix, aetcd_utils.prefix_range_end(prefix), 0, []
            while True:
                request = rpc.RangeRequest(key=start, range_end=end, limit=page, revision=revision)
                try:
                    response = await client.kvstub.Range(request, timeout=client._timeout, metadata=client.metadata)
                except rpc.AioRpcError as e:
                    aetcd_exceptions._handle_exception(e)  # the errors aetcd's own calls raise
                revision = revision or response.header.revision
                if sink is not None:
                    for kv in response.kvs:
                        sink(kv.key, kv.value)
                elif convert is None:
                    out.extend(KeyValue(kv.key, kv.value, kv.mod_revision, kv.lease, kv.create_revision)
                               for kv in response.kvs)
                else:
                    out.extend(convert(kv.key, kv.value) for kv in response.kvs)
                if not response.more or not response.kvs:
                    return revision, out
                start = response.kvs[-1].key + b"\0"
                await asyncio.sleep(0)  # the reactor's turn, even if the next answer is already in

        return self._call(op)

    def get(self, key: bytes) -> Deferred:
        """A KeyValue, or None if the key does not exist."""

        async def op(client):
            kv = await client.get(key)
            return None if kv is None else KeyValue(kv.key, kv.value, kv.mod_revision, kv.lease, kv.create_revision)

        return self._call(op)

    def watch_prefix(self, prefix: bytes, start_revision: int, on_event: Callable[[WatchEvent], None]) -> Deferred:
        """Start a watch; fires with a WatchHandle once etcd accepted it.

        ``on_event`` is called for every change, in order, on the reactor's
        loop.  The handle's ``done`` fails with EtcdUnavailable or Compacted.
        """

        async def op(client):
            return await client.watch_prefix(prefix, start_revision=start_revision)

        def start(watch) -> WatchHandle:
            endpoint = self.endpoint
            client = self._client

            async def pump():
                try:
                    async for event in watch:
                        kv = event.kv
                        if not kv.key.startswith(prefix):
                            # aetcd hands the "created" answer of a watch request given up (our call timed
                            # out) to the next watch request on that stream: this watch carries another
                            # prefix's events.  Passed on, they would put foreign keys in the snapshot and
                            # move its revision past events of ours it never saw (the next watch would
                            # start after them).  The stream is not to be trusted: a fresh client.
                            raise aetcd_exceptions.ConnectionFailedError(
                                f"the watch of {prefix!r} delivered {kv.key!r}: another watch's events")
                        on_event(WatchEvent(event.kind == "DELETE", kv.key, kv.value, kv.mod_revision))
                except asyncio.CancelledError:
                    await _quietly(watch.cancel())
                    raise
                except BaseException as e:
                    translated = _translate(e, endpoint)
                    if isinstance(translated, EtcdUnavailable) and client is not None:
                        self._failed(client)
                    if translated is e:
                        raise
                    raise translated from e
                raise EtcdUnavailable(f"etcd {endpoint}: watch stream ended")

            return WatchHandle(asyncio.ensure_future(pump()))

        return self._call(op).addCallback(start)

    # -- writes --------------------------------------------------------------

    def put(self, key: bytes, value: bytes, lease: int | None = None) -> Deferred:
        """Fires with the revision of the write."""

        async def op(client):
            return (await client.put(key, value, lease=lease)).header.revision

        return self._call(op)

    def delete(self, key: bytes) -> Deferred:
        """True if the key existed."""

        async def op(client):
            return (await client.delete(key)) is not None

        return self._call(op)

    def put_if_absent(self, key: bytes, value: bytes, lease: int | None = None) -> Deferred:
        """Create ``key`` only if it does not exist (create_revision == 0); True if created."""

        async def op(client):
            tx = client.transactions
            ok, _ = await client.transaction(
                compare=[tx.create(key) == 0],
                success=[tx.put(key, value, lease=lease)],
                failure=[],
            )
            return ok

        return self._call(op)

    def create_or_get(self, key: bytes, value: bytes, lease: int | None = None) -> Deferred:
        """Like ``put_if_absent``, in one transaction: (True, the KeyValue we created, with its create
        revision) if created, else (False, the KeyValue there, or None if it went meanwhile): a caller
        that lost learns at which revision it was taken."""

        async def op(client):
            tx = client.transactions
            ok, responses = await client.transaction(
                compare=[tx.create(key) == 0],
                success=[tx.put(key, value, lease=lease)],
                failure=[tx.get(key)],
            )
            if ok:
                revision = responses[0].response_put.header.revision  # the put's: the key's create revision
                return True, KeyValue(key, value, revision, lease or 0, revision)
            found = responses[0] if responses else []
            kv = found[0][1] if found else None
            return False, None if kv is None else KeyValue(kv.key, kv.value, kv.mod_revision, kv.lease,
                                                           kv.create_revision)

        return self._call(op)

    def delete_if_lease(self, key: bytes, lease: int, created: int = 0) -> Deferred:
        """Delete ``key`` only if it is attached to ``lease`` and, given ``created``, only if it is
        still the incarnation created at that revision; True if deleted."""

        async def op(client):
            compare = [_LeaseCompare(key) == lease]
            if created:
                compare.append(client.transactions.create(key) == created)
            ok, _ = await client.transaction(compare=compare, success=[client.transactions.delete(key)], failure=[])
            return ok

        return self._call(op)

    def put_if_lease(self, guard: bytes, lease: int, key: bytes, value: bytes) -> Deferred:
        """Put ``key`` only while ``guard`` is attached to ``lease``: the revision
        of the write, 0 if not written.

        A leader writes this way, so a leader that lost its key (lease
        expired, another node elected) cannot overwrite its successor.
        """

        async def op(client):
            ok, responses = await client.transaction(
                compare=[_LeaseCompare(guard) == lease],
                success=[client.transactions.put(key, value)],
                failure=[],
            )
            return responses[0].response_put.header.revision if ok else 0

        return self._call(op)

    def compact(self, revision: int) -> Deferred:
        return self._call(lambda client: client.compact(revision, physical=True))

    # -- leases --------------------------------------------------------------

    def grant_lease(self, ttl: int) -> Deferred:
        """A new lease id with ``ttl`` seconds."""

        async def op(client):
            return (await client.lease(ttl)).id

        return self._call(op)

    def keep_alive(self, lease: int, timeout: float | None = None) -> Deferred:
        """Refresh ``lease``; fires with the TTL etcd granted, 0 if the lease is gone.

        With one endpoint, a keep-alive that only timed out keeps the connection: it was dropped,
        and every watch on it with it, each to be read again, when a busy etcd or a starved daemon
        answered one keep-alive late (20 daemons on 2 cores: 64 watches lost in a burst, which made
        the load worse).  A second one in a row drops it, as any other error does at once; with
        several endpoints a timeout moves to the next at once (a dead etcd leader)."""
        if self.gateway is not None:
            return self._gateway_keep_alive(lease, timeout)

        async def op(client):
            reply = await self.keepalives.refresh(client, lease)
            return max(0, reply.TTL)

        spare = len(self.endpoints) == 1 and not self._keepalive_late

        def answered(result):
            self._keepalive_late = False
            return result

        def failed(failure):
            self._keepalive_late = isinstance(failure.value.__cause__, TimeoutError)
            return failure

        return self._call(op, timeout, spare_on_timeout=spare).addCallbacks(answered, failed)

    def _gateway_keep_alive(self, lease: int, timeout: float | None) -> Deferred:
        """The keep-alive through etcd's JSON gateway: no asyncio task.  With several endpoints any
        failure moves to the next one, as for every call (a dead leader gives no other sign).  With one,
        a timeout leaves the grpc connection alone: the keep-alive did not travel on it, and the next
        one goes on a fresh gateway connection anyway.  An etcd slow to apply a burst of writes answers
        keep-alives late (etcd renews a lease only once its writes are applied), and dropping the grpc
        connection then cost every watch and every call in flight, read and sent again by every daemon
        at the moment etcd was busiest (bench/cluster.py: 52 watches lost in one burst)."""
        endpoint, self._answering = self._answering or self.endpoint, None
        spare = len(self.endpoints) == 1

        def answered(ttl):
            self._keepalive_late = False
            self._answered(endpoint)
            return ttl

        def failed(failure):
            if failure.check(GatewayMissing):
                log.info("etcd {endpoint}: {e}; lease keep-alives go over grpc from now on",
                         endpoint=endpoint, e=failure.value)
                if self.gateway is not None:
                    self.gateway.close()
                    self.gateway = None
                return self.keep_alive(lease, timeout)
            if failure.check(CancelledError):
                return failure  # our own stop
            timed_out = failure.check(TimeoutError) is not None
            self._keepalive_late = timed_out
            if not (timed_out and spare):
                self._failed(self._client)  # the endpoint in use failed, whether a grpc client is open or not
            raise EtcdUnavailable(f"etcd {endpoint}: keep-alive: {failure.getErrorMessage()}") from failure.value

        return self.gateway.refresh(endpoint, lease, timeout or self.call_timeout).addCallbacks(answered, failed)

    def hear_late_keep_alives(self, listener: Callable[[int, int, float], None], window: float) -> bool:
        """``listener(lease, ttl, age)`` hears the answers to keep-alives given up by a timeout that come
        within ``window`` seconds of their sending (``age``: how long ago the request was sent).  Only the
        gateway keeps a given-up request listening (networkd.etcd.gateway); False where there is none."""
        if self.gateway is None:
            return False

        def late(lease: int, ttl: int, age: float, endpoint: Endpoint) -> None:
            self._answering = endpoint  # it knows a leader now: the next keep-alive goes there
            listener(lease, ttl, age)

        self.gateway.late, self.gateway.late_window = late, window
        return True

    def revoke_lease(self, lease: int, timeout: float | None = None) -> Deferred:
        return self._call(lambda client: client.revoke_lease(lease), timeout)
