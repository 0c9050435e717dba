"""The sd_notify pieces in-process: the protocol, readiness order, the watchdog's DNS probe."""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from networkd.etcd.reflector import PrefixStatus
from networkd.options import ListenAddress
from networkd.systemd.notify import Notifier, watchdog_seconds
from networkd.systemd.probe import DnsProbe
from networkd.systemd.service import SystemdNotify
from tests.support.notifysocket import FakeNotifySocket
from tests.support.waiting import eventually, sleep


@pytest.mark.parametrize("abstract", [False, True])
def test_notifier_sends_one_datagram_of_lines(abstract):
    sock = FakeNotifySocket(abstract=abstract)
    try:
        env = {"NOTIFY_SOCKET": sock.path, "WATCHDOG_USEC": "2000000", "OTHER": "x"}
        notifier = Notifier.from_environ(env, pid=42)
        assert env == {"OTHER": "x"}, "the variables are not passed on to the tools networkd runs"
        assert notifier.watchdog == 2.0
        assert notifier.send(READY=1, STATUS="DNS on 127.0.0.1:53\nsecond line")
        deadline = time.monotonic() + 5
        while not sock.all() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [fields for _, fields in sock.all()] == [{"READY": "1", "STATUS": "DNS on 127.0.0.1:53 second line"}]
    finally:
        sock.close()


def test_notifier_without_a_socket_or_with_a_dead_one_is_harmless(tmp_path):
    assert not Notifier.from_environ({}).send(READY=1)
    gone = Notifier(str(tmp_path / "nobody"))
    assert gone.send(READY=1) is False and gone.failures == 1


@pytest.mark.parametrize("env,expected", [
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval_is_for_our_pid_only(env, expected):
    assert watchdog_seconds(env, 7) == expected


class RecordingNotifier:
    def __init__(self, watchdog=None):
        self.watchdog = watchdog
        self.sent: list[dict] = []

    def send(self, **fields):
        self.sent.append(fields)
        return True


class FakeDns:
    def __init__(self):
        self.listen = ListenAddress("127.0.0.1", 5353)
        self.up = False

    def listening(self):
        return self.up


def watcher(prefix):
    return SimpleNamespace(snapshot=None, status=PrefixStatus(prefix))


def test_ready_waits_for_dns_and_every_first_snapshot():
    clock = task.Clock()
    dns, notifier = FakeDns(), RecordingNotifier()
    watchers = {"/lain/config/domains/": watcher("/lain/config/domains/"), "/lain/config/vips/": watcher("/lain/config/vips/")}
    svc = SystemdNotify(notifier, clock, watchers=watchers, dns=dns, poll=0.05)
    svc.startService()
    for w in watchers.values():
        w.snapshot = object()
        w.status.connected = True
    clock.advance(1)
    assert not any("READY" in m for m in notifier.sent), "DNS does not listen yet"
    dns.up = True
    watchers["/lain/config/vips/"].snapshot = None
    clock.advance(1)
    assert not any("READY" in m for m in notifier.sent), "one prefix has no snapshot yet"
    watchers["/lain/config/vips/"].snapshot = object()
    clock.advance(0.05)
    ready = [m for m in notifier.sent if "READY" in m]
    assert ready == [{"READY": 1, "STATUS": "DNS on 127.0.0.1:5353; etcd connected"}]
    svc.stopService()
    assert notifier.sent[-1]["STOPPING"] == 1


def test_ready_when_etcd_failed_and_at_the_latest_after_the_timeout():
    clock = task.Clock()
    dns, notifier = FakeDns(), RecordingNotifier()
    dns.up = True
    w = watcher("/lain/config/domains/")
    svc = SystemdNotify(notifier, clock, watchers={w.status.prefix: w}, dns=dns, ready_timeout=20)
    svc.startService()
    clock.advance(1)
    assert not svc.ready
    w.status.lost_at, w.status.last_error = clock.seconds(), "connection refused"
    clock.advance(3)
    ready = [m for m in notifier.sent if "READY" in m]
    assert len(ready) == 1 and "etcd unreachable for 3s (connection refused): no snapshot yet" in ready[0]["STATUS"]
    svc.stopService()

    clock, notifier = task.Clock(), RecordingNotifier()
    hanging = watcher("/lain/config/domains/")
    svc = SystemdNotify(notifier, clock, watchers={"p": hanging}, dns=dns, ready_timeout=20)
    svc.startService()
    clock.advance(19.9)
    assert not svc.ready
    clock.advance(0.2)
    assert svc.ready
    svc.stopService()


@pytest_twisted.ensureDeferred
async def test_watchdog_pings_only_while_dns_answers_its_probe():
    """A DNS server that reads nothing (a wedged reader) gets no pings; one that answers does."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    silent.setblocking(False)
    listen = ListenAddress("127.0.0.1", silent.getsockname()[1])
    notifier = RecordingNotifier(watchdog=0.2)
    probe = DnsProbe(reactor, listen)
    svc = SystemdNotify(notifier, reactor, watchers={}, dns=FakeDns(), probe=probe)
    svc.startService()
    try:
        await sleep(0.5)
        assert probe.sent >= 3
        assert [m for m in notifier.sent if "WATCHDOG" in m] == []
        # Now answer like the DNS server does: same ID, QR set.
        async def answer_all():
            try:
                while True:
                    data, addr = silent.recvfrom(512)
                    silent.sendto(data[:2] + bytes([data[2] | 0x80]) + data[3:], addr)
            except BlockingIOError:
                pass
            return [m for m in notifier.sent if "WATCHDOG" in m]
        assert await eventually(answer_all, timeout=3, interval=0.01)
    finally:
        svc.stopService()
        silent.close()
