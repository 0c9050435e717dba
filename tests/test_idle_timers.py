"""A daemon at rest wakes only where something can change (issue 13): start-up polls stop
once start-up is over.  Timer wake-ups are counted on a fake clock, never timed.

Under systemd (``Type=notify``, networkd.socket passing the DNS listeners) two start-up
polls used to run for the daemon's whole life: the readiness check every 50 ms and the
DNS first-snapshot wait every 20 ms, 70 wake-ups a second that no benchmark saw (they
run only with $NOTIFY_SOCKET and passed sockets).
"""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest_twisted
from twisted.internet import reactor as real_reactor
from twisted.internet import task

from networkd.dns.service import DnsService
from networkd.etcd.reflector import PrefixStatus, Snapshot
from networkd.options import ListenAddress
from networkd.systemd.service import SystemdNotify
from tests.support.dnsstub import random_loopback_host
from tests.support.ports import free_port


class CountingClock(task.Clock):
    """A fake clock that counts the timed calls it fires: the daemon's wake-ups."""

    def __init__(self):
        super().__init__()
        self.fired = 0

    def callLater(self, delay, f, *args, **kw):
        def counted(*a, **k):
            self.fired += 1
            return f(*a, **k)
        return super().callLater(delay, counted, *args, **kw)

    def wakeups(self, seconds: float, step: float = 0.01) -> int:
        before = self.fired
        for _ in range(round(seconds / step)):
            self.advance(step)
        return self.fired - before


class RecordingNotifier:
    watchdog = None

    def __init__(self):
        self.sent: list[dict] = []

    def send(self, **fields):
        self.sent.append(fields)
        return True


class UpDns:
    listen = ListenAddress("127.0.0.1", 5353)
    up = True

    def listening(self):
        return self.up


def test_systemd_notify_polls_only_until_ready_and_still_reports_status_changes():
    clock, notifier, dns = CountingClock(), RecordingNotifier(), UpDns()
    status = PrefixStatus("/lain/config/domains/")
    status.connected = True
    svc = SystemdNotify(notifier, clock, watchers={status.prefix: SimpleNamespace(snapshot=object(), status=status)},
                        dns=dns, poll=0.05, status_every=5.0)
    svc.startService()
    try:
        clock.wakeups(1)
        assert [m for m in notifier.sent if "READY" in m], "ready at the first poll"
        # At rest: one wake-up per status_every, not 20 a second (1,200 a minute before).
        assert clock.wakeups(60) <= 60 / 5.0 + 1
        # A change still reaches systemd within status_every.
        dns.up = False
        clock.wakeups(5.0)
        assert notifier.sent[-1] == {"STATUS": "DNS not listening; etcd connected"}
    finally:
        svc.stopService()
    assert clock.getDelayedCalls() == []


class FakeClockReactor:
    """The real reactor for sockets, a counting fake clock for every timer."""

    def __init__(self, clock: CountingClock):
        self._clock = clock

    def callLater(self, *args, **kw):
        return self._clock.callLater(*args, **kw)

    def seconds(self):
        return self._clock.seconds()

    def __getattr__(self, name):
        return getattr(real_reactor, name)


class PendingDomains:
    """A domains watcher with no snapshot yet; ``publish`` hands one to its subscribers."""

    def __init__(self):
        self.snapshot = None
        self.status = PrefixStatus("/lain/config/domains/")
        self._subscribers = []

    def subscribe(self, subscriber):
        self._subscribers.append(subscriber)

    def publish(self, snapshot):
        self.snapshot = snapshot
        for subscriber in self._subscribers:
            subscriber(snapshot)


def dns_on_fake_clock(tmp_path, clock, host, port, domains, **kw) -> DnsService:
    """A DNS service whose timers run on ``clock`` (sockets on the real reactor), an empty hosts file."""
    hosts = tmp_path / "hosts"
    hosts.write_text("")
    return DnsService(FakeClockReactor(clock), listen=ListenAddress(host, port), hosts_file=str(hosts),
                      domains=domains, poll_interval=1.0, **kw)


def test_dns_first_snapshot_wait_ends_once_the_passed_sockets_are_read(tmp_path):
    host = random_loopback_host()
    port = free_port(host)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((host, port))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((host, port))
    tcp.listen(8)
    clock, pending = CountingClock(), PendingDomains()
    dns = dns_on_fake_clock(tmp_path, clock, host, port, pending, inherited=[udp, tcp])
    readers = set(real_reactor.getReaders())
    dns.startService()
    try:
        assert dns.socket_activated
        clock.wakeups(1)
        assert dns._holding, "the passed sockets wait for the first snapshot"
        pending.publish(Snapshot("/lain/config/domains/", 1, generation=1))
        clock.wakeups(0.1)
        assert not dns._holding
        # At rest only the hosts-file recheck (inotify sees changes) wakes DNS: 2 a minute, not 60 + 3,000.
        assert clock.wakeups(60) <= 3
    finally:
        dns.stopService()
        clock.advance(1)  # the listeners' connectionLost runs from a timer: on this clock
        udp.close()
        tcp.close()
    assert set(real_reactor.getReaders()) == readers, "the listeners left the real reactor"


def test_a_first_snapshot_after_the_wait_gave_up_goes_into_the_zone_at_once(tmp_path):
    """etcd slow at start-up: after HOLD_MAX the sockets are read before any domains snapshot; the
    first one then goes into the zone in one turn (not in slices: a query would see it half filled)."""
    import json

    from networkd.dns import service

    host = random_loopback_host()
    port = free_port(host)
    clock, pending = CountingClock(), PendingDomains()
    dns = dns_on_fake_clock(tmp_path, clock, host, port, pending)
    dns.startService()
    dns._feed._first_budget = 0.0  # slices of one key, were it sliced
    try:
        clock.wakeups(service.HOLD_MAX + 0.1, step=0.05)
        assert not dns._holding, "queries are read: etcd took too long"
        values = {f"n{i}.lain": json.dumps({"ips": [f"10.0.{i >> 8}.{i & 255}"]}) for i in range(300)}
        pending.publish(Snapshot("/lain/config/domains/", 1, values, generation=1))
        assert dns._feed.built and len(dns.resolver.zone.exact) == 300, "all of it, in the snapshot's turn"
    finally:
        dns.stopService()
        clock.advance(1)


@pytest_twisted.ensureDeferred
async def test_the_hosts_file_is_looked_at_when_inotify_sees_a_change_not_every_second(tmp_path):
    """A look every second woke the reactor 60 times a minute at rest; inotify on the real reactor
    says when to look (a replacement is served with no timer having fired), a recheck every 30 s
    catches what it misses, and a missing directory is looked for every second until it appears."""
    from tests.support.waiting import eventually

    host = random_loopback_host()
    port = free_port(host)
    etc = tmp_path / "etc"
    hosts = etc / "hosts"
    clock = CountingClock()
    dns = DnsService(FakeClockReactor(clock), listen=ListenAddress(host, port), hosts_file=str(hosts),
                     poll_interval=1.0)
    dns.startService()
    try:
        assert clock.wakeups(10, step=0.1) >= 9, "no directory yet: looked for every second"
        etc.mkdir()
        hosts.write_text("10.7.0.1 db\n")
        clock.wakeups(1.0, step=0.1)
        assert "db" in dns.resolver.zone.exact
        assert clock.wakeups(60, step=0.1) <= 3, "watched: a recheck every 30 s"
        fired = clock.fired
        replacement = etc / "hosts.new"
        replacement.write_text("10.7.0.2 db2\n")
        replacement.rename(hosts)
        await eventually(lambda: "db2" in dns.resolver.zone.exact, timeout=3, message="the new file served")
        assert clock.fired == fired, "seen through inotify, no timer"
    finally:
        dns.stopService()
        clock.advance(1)
