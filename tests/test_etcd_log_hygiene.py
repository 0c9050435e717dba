"""What the etcd session and connection log when calls are cut short (issue 10, item 4), against a real etcd."""

from __future__ import annotations

import signal

import pytest_twisted
from twisted.internet import reactor

from networkd.etcd.client import EtcdClient, EtcdUnavailable
from networkd.etcd.session import Session
from networkd.options import parse_endpoints
from tests.support.freezing import freeze
from tests.support.logcapture import LogCapture
from tests.support.waiting import eventually, sleep


@pytest_twisted.ensureDeferred
async def test_a_keep_alive_cancelled_by_its_closed_connection_is_one_quiet_line(private_etcd):
    """etcd stalls (SIGSTOP) while a keep-alive waits; another call times out, which drops the
    connection, and grpc cancels the keep-alive in flight on it.  That is an etcd outage like any
    other: no critical line, no traceback; the session keeps going and is acknowledged again."""
    client = EtcdClient(parse_endpoints(private_etcd.endpoint), call_timeout=0.3)
    session = Session(client, ttl=12, reactor=reactor)  # keep-alives every 2 s, each bounded by 2 s
    in_flight = []
    keep_alive = client.keep_alive

    def watched(lease, timeout=None):
        d = keep_alive(lease, timeout)
        in_flight.append(d)
        return d

    client.keep_alive = watched
    session.startService()
    stopped = False
    try:
        await eventually(lambda: in_flight and in_flight[-1].called, message="first keep-alive answered")
        with LogCapture() as logs:
            freeze(private_etcd.process.pid)
            stopped = True
            count = len(in_flight)
            await eventually(lambda: len(in_flight) > count, timeout=3, message="a keep-alive is sent")
            waiting = in_flight[-1]
            await sleep(0.05)
            assert not waiting.called, "etcd is stopped: the keep-alive waits"
            try:
                await client.get(b"/anything")  # times out: the connection is dropped
            except EtcdUnavailable:
                pass
            await eventually(lambda: waiting.called, timeout=1, message="the keep-alive ends with its connection")
            private_etcd.process.send_signal(signal.SIGCONT)
            stopped = False
            acked = session.last_ack
            await eventually(lambda: session.last_ack != acked, timeout=5, message="acknowledged again")
        assert not logs.at_level("critical", "error"), logs.at_level("critical", "error")
        assert not [e for e in logs.events if "log_failure" in e], "no traceback"
        # one line as the outage starts, one as it ends
        assert len(logs.matching("not answered")) == 1, logs.lines
        assert len(logs.matching("acknowledges keep-alives again")) == 1, logs.lines
        assert len(logs.matching("keep-alive")) == 2, logs.lines
    finally:
        if stopped:
            private_etcd.process.send_signal(signal.SIGCONT)
        await session.stopService()
        await client.close()


@pytest_twisted.ensureDeferred
async def test_quorum_lost_for_a_while_is_one_outage_in_the_logs(privileged):
    """Two of three members down: the third still serves watches but no keep-alive, so calls succeed
    and fail by turns.  That is one outage: one "failing over" line, one "watch lost", and one line
    each when etcd is back (it flapped ~5 times in 6 s before)."""
    from networkd.etcd.reflector import PrefixWatcher
    from tests.support.etcdcluster import EtcdCluster

    cluster = EtcdCluster(3).start()
    client = EtcdClient(parse_endpoints(",".join(cluster.endpoints)), call_timeout=1.0)
    session = Session(client, ttl=3, reactor=reactor)
    watcher = PrefixWatcher(client, "/quorum/", reactor)
    session.startService()
    watcher.startService()
    try:
        await eventually(lambda: session.last_ack is not None and watcher.status.connected, message="up")
        with LogCapture() as logs:
            for member in cluster.members[1:]:
                cluster.kill(member)
            await sleep(6)
            for member in cluster.members[1:]:
                cluster.revive(member)
            acked = session.last_ack
            await eventually(lambda: session.last_ack != acked, timeout=15, message="acknowledged again")
            await eventually(lambda: logs.matching("answers;") and logs.matching("is back for"), timeout=8,
                             message="the end of the outage is said")
        assert client.failovers > 2, "it did fail over, more than once"
        assert len(logs.matching("failing over")) == 1, logs.lines
        assert len(logs.matching("answers;")) == 1, logs.lines
        assert len(logs.matching("watch of /quorum/ lost")) == 1, logs.lines
        assert len(logs.matching("is back for /quorum/")) == 1, logs.lines
        assert watcher.status.reconnects > 1, "the watch status still counts every loss"
    finally:
        await watcher.stopService()
        await session.stopService()
        await client.close()
        cluster.destroy()


@pytest_twisted.ensureDeferred
async def test_a_failed_call_always_says_what_happened_and_where(etcd_server):
    """An error etcd answers with no detail (aetcd passes grpc's empty details on as its text), and a call
    its caller cancelled: both name what happened and the endpoint, never an empty text."""
    import asyncio

    import grpc
    from aetcd import exceptions as aetcd_errors
    from twisted.internet.defer import CancelledError

    client = EtcdClient(parse_endpoints(etcd_server.endpoint), call_timeout=2)

    async def refused(_):
        aetcd_errors._handle_exception(grpc.aio.AioRpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(), details=""))

    async def slow(_):
        await asyncio.sleep(5)

    try:
        first = client._current()
        try:
            await client._call(refused)
            raise AssertionError("no error")
        except EtcdUnavailable as e:
            assert str(e) == f"etcd {etcd_server.endpoint}: RESOURCE_EXHAUSTED (no detail)"
        assert client._current() is first, "an answer from etcd is no reason to drop the connection"
        call = client._call(slow)
        call.cancel()
        try:
            await call
            raise AssertionError("not cancelled")
        except CancelledError as e:
            assert str(e) == f"etcd {etcd_server.endpoint}: call cancelled"
    finally:
        await client.close()
