"""Type=notify and the watchdog, with the real daemon against a fake notify socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

import dnslib
import pytest

from tests.support.daemon import Daemon
from tests.support.notifysocket import FakeNotifySocket
from tests.support.ports import free_port


class WedgeableDaemon(Daemon):
    """The daemon through tests/support/wedge.py: SIGUSR1 blocks its reactor."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "tests.support.wedge", *self.args]


def ask(port: int, name: str, qclass: str = "IN", qtype: str = "A", timeout: float = 1.0) -> dnslib.DNSRecord:
    q = dnslib.DNSRecord.question(name, qtype, qclass)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(q.pack(), ("127.0.0.1", port))
        return dnslib.DNSRecord.parse(s.recv(4096))


@pytest.fixture
def notify_socket():
    sock = FakeNotifySocket()
    yield sock
    sock.close()


@pytest.fixture
def files(tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    hosts = tmp_path / "hosts"
    hosts.write_text("10.7.7.7 fromhosts.example\n")
    return resolv, hosts


def daemon_args(etcd: str, root: str, dns_port: int, files, *more: str) -> list[str]:
    resolv, hosts = files
    return ["--etcd", etcd, "--etcd-root", root, "--no-vips", "--node-ip", "10.1.2.3",
            "--dns-listen", f"127.0.0.1:{dns_port}", "--api-listen", f"127.0.0.1:{free_port()}",
            "--resolv-conf", str(resolv), "--hosts-file", str(hosts), "--no-resolv-conf", *more]


def test_ready_only_once_dns_listens_with_etcd_data(etcd_server, etcd_root, notify_socket, files):
    etcd_server.put(f"{etcd_root}/config/domains/ready.example", json.dumps({"ips": ["10.9.9.9"]}))
    dns_port = free_port()
    daemon = Daemon(daemon_args(etcd_server.endpoint, etcd_root, dns_port, files),
                    env={"NOTIFY_SOCKET": notify_socket.path}).start()
    try:
        ready_at = notify_socket.wait_for("READY", "1")
        # At READY=1, DNS answers and the first etcd snapshot is served.
        answer = ask(dns_port, "ready.example")
        assert [str(r.rdata) for r in answer.rr] == ["10.9.9.9"]
        statuses = notify_socket.values_of("STATUS")
        assert statuses[0].startswith("starting"), statuses
        ready_status = [f["STATUS"] for at, f in notify_socket.all() if f.get("READY") == "1"][0]
        assert f"DNS on 127.0.0.1:{dns_port}" in ready_status and "etcd connected" in ready_status
        assert notify_socket.times_of("READY") == [ready_at], "READY=1 is sent once"
        assert not notify_socket.times_of("WATCHDOG"), "no WatchdogSec: no pings"

        assert daemon.stop() == 0, daemon.log()
        stopping = notify_socket.times_of("STOPPING", "1")
        assert len(stopping) == 1 and stopping[0] > ready_at
    finally:
        daemon.kill()
    assert "NOTIFY_SOCKET" not in daemon.log()


def test_no_ready_when_dns_cannot_listen(etcd_server, etcd_root, notify_socket, files):
    dns_port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", dns_port))
        daemon = Daemon(daemon_args(etcd_server.endpoint, etcd_root, dns_port, files),
                        env={"NOTIFY_SOCKET": notify_socket.path}).start()
        try:
            daemon.process.wait(30)
        finally:
            daemon.kill()
    assert daemon.process.returncode == 1, daemon.log()
    time.sleep(0.2)
    assert not notify_socket.times_of("READY"), notify_socket.all()


def test_ready_while_etcd_is_unreachable_serving_what_it_has(notify_socket, files):
    dns_port = free_port()
    dead = f"http://127.0.0.1:{free_port()}"
    daemon = Daemon(daemon_args(dead, "/lain", dns_port, files), env={"NOTIFY_SOCKET": notify_socket.path}).start()
    try:
        notify_socket.wait_for("READY", "1", timeout=25)
        status = [f["STATUS"] for _, f in notify_socket.all() if f.get("READY") == "1"][0]
        assert "etcd unreachable" in status, status
        assert [str(r.rdata) for r in ask(dns_port, "fromhosts.example").rr] == ["10.7.7.7"]
        assert daemon.stop() == 0, daemon.log()
    finally:
        daemon.kill()


def test_watchdog_pings_stop_while_the_reactor_is_blocked(etcd_server, etcd_root, notify_socket, files, tmp_path):
    block_log = tmp_path / "block.log"
    dns_port = free_port()
    daemon = WedgeableDaemon(
        daemon_args(etcd_server.endpoint, etcd_root, dns_port, files),
        env={"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "1000000",
             "NETWORKD_TEST_BLOCK_LOG": str(block_log), "NETWORKD_TEST_BLOCK_SECONDS": "3"},
    ).start()
    try:
        notify_socket.wait_for("READY", "1")
        time.sleep(2.0)
        before = notify_socket.times_of("WATCHDOG", "1")
        assert len(before) >= 4, f"one ping every 0.25 s once DNS answered its probe: {before}"
        assert max(b - a for a, b in zip(before, before[1:])) < 0.6

        daemon.signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "unblocked" not in (block_log.read_text() if block_log.exists() else ""):
            time.sleep(0.05)
        marks = dict(line.split() for line in block_log.read_text().splitlines())
        blocked, unblocked = float(marks["blocked"]), float(marks["unblocked"])
        assert unblocked - blocked >= 2.9
        time.sleep(1.5)
        pings = notify_socket.times_of("WATCHDOG", "1")
        during = [t for t in pings if blocked + 0.05 < t < unblocked]
        assert during == [], f"pings while the reactor was blocked: {during}"
        gap = [t for t in pings if t > blocked][0] - max(t for t in pings if t <= blocked)
        assert gap >= 2.9, gap
        after = [t for t in pings if t > unblocked]
        assert len(after) >= 3, f"pings resume once the reactor turns again: {after}"
        assert daemon.running()
        assert daemon.stop() == 0, daemon.log()
    finally:
        daemon.kill()


def test_watchdog_pings_only_for_our_pid(etcd_server, etcd_root, notify_socket, files):
    """WATCHDOG_PID of another process: systemd meant someone else; no pings."""
    daemon = Daemon(daemon_args(etcd_server.endpoint, etcd_root, free_port(), files),
                    env={"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "1000000",
                         "WATCHDOG_PID": str(os.getpid())}).start()
    try:
        notify_socket.wait_for("READY", "1")
        time.sleep(1.0)
        assert notify_socket.times_of("WATCHDOG") == []
        assert daemon.stop() == 0
    finally:
        daemon.kill()
