"""Lease keep-alives as etcd sees them: one stream, kept, re-opened when it breaks."""

from __future__ import annotations

import asyncio
import re
import signal
import urllib.request
from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from networkd.etcd.keepalive import KeepAliveStream
from networkd.etcd.reflector import PrefixWatcher
from networkd.etcd.session import Session
from tests.test_etcd_snapshots import client_for
from tests.support.freezing import freeze
from tests.support.waiting import eventually, sleep


def keepalive_streams_started(endpoint: str) -> int:
    """How many LeaseKeepAlive streams etcd has seen opened (its own /metrics)."""
    with urllib.request.urlopen(f"{endpoint}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found = re.search(r'^grpc_server_started_total\{[^}]*grpc_method="LeaseKeepAlive"[^}]*\} (\S+)$', text, re.M)
    return int(float(found.group(1))) if found else 0


@pytest_twisted.ensureDeferred
async def test_keep_alives_ride_one_stream(private_etcd):
    """Eight keep-alives in a row open one stream on etcd, not eight (aetcd's
    refresh_lease opened one per request, the largest cost of an idle daemon)."""
    client = client_for(private_etcd.endpoint)
    session = Session(client, ttl=3, reactor=reactor)  # a keep-alive every 0.5 s
    acks = []
    session.on_ack(acks.append)
    before = keepalive_streams_started(private_etcd.endpoint)
    session.startService()
    try:
        await eventually(lambda: len(acks) >= 9, timeout=10, message="nine acknowledgements (grant + 8)")
        assert keepalive_streams_started(private_etcd.endpoint) - before == 1
    finally:
        await session.stopService()
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_revoked_lease_is_seen_on_the_stream_and_replaced(private_etcd):
    client = client_for(private_etcd.endpoint)
    session = Session(client, ttl=3, reactor=reactor)
    lost = []
    session.on_lost(lambda: lost.append(session.lease))
    session.startService()
    try:
        await eventually(lambda: session.last_ack is not None)
        first = session.lease
        private_etcd.ctl("lease", "revoke", f"{first:x}")
        await eventually(lambda: lost and session.lease not in (None, first), timeout=5,
                         message="lease lost, a new one granted")
        renewed = session.last_ack
        await eventually(lambda: session.last_ack > renewed, timeout=3, message="the new lease is kept alive")
    finally:
        await session.stopService()
        await client.close()


@pytest_twisted.ensureDeferred
async def test_the_stream_is_opened_again_after_etcd_restarts(private_etcd):
    """The stream etcd ended as it stopped is not written to: the first
    keep-alive after the restart goes out on a new stream and is answered,
    with no failure in between (writing on the ended one failed it)."""
    client = client_for(private_etcd.endpoint)
    session = Session(client, ttl=6, reactor=reactor)
    failures = []
    session.on_reconnect(failures.append)  # called after an acknowledgement that follows failures
    session.startService()
    try:
        await eventually(lambda: client.keepalives.opened == 1 and session.last_error is None
                         and session.last_ack > session.clock() - 0.5, message="a keep-alive on the stream")
        private_etcd.stop()  # (these block the reactor: nothing is sent meanwhile)
        private_etcd.start()
        restarted = session.clock()
        await eventually(lambda: session.last_ack > restarted, timeout=15,
                         message="a keep-alive sent after the restart is acknowledged")
        assert client.keepalives.opened == 2 and failures == [] and session.last_error is None
        later = session.last_ack
        await eventually(lambda: session.last_ack > later, timeout=3)
    finally:
        await session.stopService()
        await client.close()


class FakeCall:
    """A LeaseKeepAlive stream whose replies the test hands over."""

    def __init__(self):
        self.written, self.replies, self.cancelled = [], asyncio.Queue(), False

    async def write(self, request):
        self.written.append(request.ID)

    async def read(self):
        return await self.replies.get()

    def done(self):
        return self.cancelled

    def cancel(self):
        self.cancelled = True


class FakeClient:
    metadata = None

    def __init__(self):
        self.calls = []
        self.leasestub = self

    async def connect(self):
        pass

    def LeaseKeepAlive(self, metadata=None):  # noqa: N802 (grpc's name)
        self.calls.append(FakeCall())
        return self.calls[-1]


@pytest_twisted.ensureDeferred
async def test_a_request_never_takes_the_reply_meant_for_one_given_up():
    """The session dates its lease from the send time of the request it thinks
    was answered: a refresh started while an earlier one is still outstanding
    (given up by its caller, not yet unwound) must not read that one's reply."""
    stream, client = KeepAliveStream(), FakeClient()
    first = asyncio.ensure_future(stream.refresh(client, 7))
    await sleep(0.01)
    second = asyncio.ensure_future(stream.refresh(client, 7))  # the first still waits for its reply
    await sleep(0.01)
    assert len(client.calls) == 2 and client.calls[0].cancelled, "a new stream; the busy one cancelled"
    client.calls[0].replies.put_nowait(SimpleNamespace(TTL=3, tag="late reply to the first"))
    client.calls[1].replies.put_nowait(SimpleNamespace(TTL=3, tag="the second's own"))
    assert (await defer.Deferred.fromFuture(second)).tag == "the second's own"
    first.cancel()
    third = asyncio.ensure_future(stream.refresh(client, 7))
    await sleep(0.01)
    assert len(client.calls) == 2, "the second's stream, idle again, is reused"
    client.calls[1].replies.put_nowait(SimpleNamespace(TTL=3, tag="third"))
    assert (await defer.Deferred.fromFuture(third)).tag == "third"


@pytest_twisted.ensureDeferred
async def test_a_reply_for_another_lease_is_no_acknowledgement():
    """Each reply names the lease it renewed; one that names another is no reply to ours (the session
    would date our lease from it): the stream is dropped, and the next refresh takes a new one."""
    from networkd.etcd.keepalive import StreamEnded

    stream, client = KeepAliveStream(), FakeClient()
    first = asyncio.ensure_future(stream.refresh(client, 7))
    await sleep(0.01)
    client.calls[0].replies.put_nowait(SimpleNamespace(ID=8, TTL=3))
    with pytest.raises(StreamEnded, match="lease 7 for lease 8"):
        await defer.Deferred.fromFuture(first)
    assert client.calls[0].cancelled
    second = asyncio.ensure_future(stream.refresh(client, 7))
    await sleep(0.01)
    client.calls[1].replies.put_nowait(SimpleNamespace(ID=7, TTL=3))
    assert (await defer.Deferred.fromFuture(second)).TTL == 3 and len(client.calls) == 2


async def one_keep_alive_stalled(private_etcd, client, session, stall: float) -> tuple[list, int]:
    """SIGSTOP etcd for ``stall`` s right after a keep-alive was answered: (the watch's connected
    state sampled every 10 ms meanwhile and for a second after, how many keep-alives timed out)."""
    answered, late = [], []
    keep_alive = client.keep_alive

    def watched(lease, timeout=None):
        def failed(failure):
            if isinstance(failure.value.__cause__, TimeoutError):
                late.append(session.clock())
            return failure
        return keep_alive(lease, timeout).addCallbacks(lambda r: (answered.append(r), r)[1], failed)

    client.keep_alive = watched
    count = len(answered)
    await eventually(lambda: len(answered) > count, timeout=3, message="a keep-alive is answered")
    freeze(private_etcd.process.pid)
    try:
        connected = []
        for _ in range(int(stall / 0.01)):
            await sleep(0.01)
            connected.append(watcher_connected(client))
    finally:
        private_etcd.process.send_signal(signal.SIGCONT)
    for _ in range(100):
        await sleep(0.01)
        connected.append(watcher_connected(client))
    client.keep_alive = keep_alive
    return connected, len(late)


def watcher_connected(client) -> bool:
    return client.watcher.status.connected


@pytest_twisted.ensureDeferred
async def test_one_late_keep_alive_keeps_the_connection_and_its_watches(private_etcd, etcd_root):
    """One endpoint, etcd stalled: one keep-alive times out (its bound is 0.5 s) and is sent
    again on the same connection, which is kept with its watches (it used to be dropped: every
    watch lost and read again, under load the start of a cascade).  Stalled longer (two in a
    row time out), the connection is dropped, as a dead one must be, and comes back."""
    client = client_for(private_etcd.endpoint)
    session = Session(client, ttl=3, reactor=reactor)
    client.watcher = PrefixWatcher(client, f"{etcd_root}/", reactor)
    session.startService()
    client.watcher.startService()
    try:
        await eventually(lambda: session.last_ack is not None and client.watcher.status.connected)
        reconnects = client.watcher.status.reconnects
        # The next keep-alive goes 0.67 s after the answered one and times out 0.5 s later; the
        # one sent again after it finds etcd back.
        connected, late = await one_keep_alive_stalled(private_etcd, client, session, 1.3)
        assert late == 1, f"{late} keep-alives timed out"
        assert all(connected), "the watch stayed connected through one late keep-alive"
        assert client.watcher.status.reconnects == reconnects
        acked = session.last_ack
        await eventually(lambda: session.last_ack > acked, timeout=3, message="acknowledged again")

        connected, late = await one_keep_alive_stalled(private_etcd, client, session, 2.5)
        assert late >= 2 and not all(connected), "keep-alives late in a row: the connection (and its watch) dropped"
        await eventually(lambda: client.watcher.status.connected, timeout=10, message="the watch is back")
    finally:
        await client.watcher.stopService()
        await session.stopService()
        await client.close()
