"""What the etcd session and connection log when calls are cut short (issue 10, item 4), against a real etcd."""

from __future__ import annotations

import signal

import pytest_twisted
from twisted.internet import reactor

from networkd.etcd.client import EtcdClient, EtcdUnavailable
from networkd.etcd.session import Session
from networkd.options import parse_endpoints
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
            private_etcd.process.send_signal(signal.SIGSTOP)
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
        assert len(logs.matching("keep-alive")) == 1, logs.lines
    finally:
        if stopped:
            private_etcd.process.send_signal(signal.SIGCONT)
        await session.stopService()
        await client.close()
