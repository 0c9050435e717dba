"""networkd as operators run it (twistd subprocess): dig end to end, etcd
change latency, and a bind failure that stops the daemon (BUG 30)."""

from __future__ import annotations

import os
import signal
import socket
import statistics
import tempfile
import time

import pytest_twisted
from dnslib import DNSRecord
from twisted.internet import threads

from networkd.etcd.client import EtcdClient
from networkd.options import parse_endpoints
from tests.support.daemon import Daemon
from tests.support.dnsstub import dig, dig_answers
from tests.support.ports import free_port
from tests.support.waiting import eventually


def daemon_args(etcd_server, root, dns_port, upstream=None, extra=()):
    workdir = tempfile.mkdtemp(prefix="networkd-dns-files-")
    hosts = os.path.join(workdir, "hosts")
    resolv = os.path.join(workdir, "resolv.conf")
    with open(hosts, "w") as f:
        f.write("10.8.0.1 fromhosts\n")
    with open(resolv, "w") as f:
        f.write(f"nameserver {upstream.host}\n" if upstream else "")
    return [
        "--etcd", etcd_server.endpoint, "--etcd-root", root,
        "--dns-listen", f"127.0.0.1:{dns_port}", "--api-listen", f"127.0.0.1:{free_port()}",
        "--no-vips", "--no-resolv-conf", "--node-ip", "10.1.1.1",
        "--hosts-file", hosts, "--resolv-conf", resolv, *extra,
    ]


def test_daemon_answers_dig(etcd_server, etcd_root, upstream):
    port = free_port()
    etcd_server.put(f"{etcd_root}/config/domains/*.lain", '{"ips": ["10.0.0.9"]}')
    etcd_server.put(f"{etcd_root}/config/domains/node.lain", '{"type": "node"}')
    daemon = Daemon(daemon_args(etcd_server, etcd_root, port, upstream)).start()
    try:
        daemon.wait_for_log("DNS listening on")
        deadline = time.monotonic() + 10
        while dig_answers(port, "x.lain") != ["x.lain. 60 IN A 10.0.0.9"]:
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
        assert dig_answers(port, "node.lain") == ["node.lain. 60 IN A 10.1.1.1"]
        assert dig_answers(port, "fromhosts") == ["fromhosts. 60 IN A 10.8.0.1"]
        assert dig_answers(port, "example.com")[0].endswith("IN A 93.184.216.34")
        assert dig_answers(port, "+tcp", "example.com")[0].endswith("IN A 93.184.216.34")
        assert upstream.names_asked() == ["example.com"], "the second answer came from the cache"
    finally:
        assert daemon.stop() in (0, -signal.SIGTERM), daemon.log()  # twistd re-raises SIGTERM
        assert "Traceback" not in daemon.log()


def test_daemon_options_reach_the_dns_service(etcd_server, etcd_root, upstream):
    """--dns-forward-reverse and --dns-stale-max are the daemon's, not only the DNS service's."""
    port = free_port()
    upstream.records["3.2.1.10.in-addr.arpa"] = []
    upstream.ttl = 1
    daemon = Daemon(daemon_args(etcd_server, etcd_root, port, upstream,
                                extra=("--dns-forward-reverse", "10.1.0.0/16", "--dns-stale-max", "0"))).start()
    try:
        daemon.wait_for_log("DNS listening on")
        dig(port, "-x", "10.1.2.3")
        dig(port, "-x", "10.9.9.9")
        assert upstream.names_asked() == ["3.2.1.10.in-addr.arpa"], "10.1/16 goes upstream, the rest of 10/8 not"
        assert dig_answers(port, "example.com")[0].endswith("IN A 93.184.216.34")
        time.sleep(1.2)  # expired; then the upstream fails: with --dns-stale-max 0 nothing is served stale
        upstream.mode = "servfail"
        assert "status: SERVFAIL" in dig(port, "example.com")
    finally:
        daemon.stop()


def test_bind_failure_stops_the_daemon(etcd_server, etcd_root, upstream):
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind(("127.0.0.1", 0))
    port = blocker.getsockname()[1]
    daemon = Daemon(daemon_args(etcd_server, etcd_root, port, upstream)).start()
    try:
        daemon.process.wait(20)
        assert daemon.process.returncode != 0
        assert f"DNS cannot listen on 127.0.0.1:{port}" in daemon.log()
        assert "Traceback" not in daemon.log()
    finally:
        daemon.kill()
        blocker.close()


def _time_until_answer(port: int, name: str, expected: str, start: float, timeout: float = 2.0) -> float:
    """Query every millisecond until ``expected`` is the answer; seconds since ``start``."""
    packet = DNSRecord.question(name, "A").pack()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while time.monotonic() - start < timeout:
            s.sendto(packet, ("127.0.0.1", port))
            try:
                reply = DNSRecord.parse(s.recv(4096))
            except socket.timeout:
                continue
            if [str(rr.rdata) for rr in reply.rr] == [expected]:
                return time.monotonic() - start
            time.sleep(0.001)
    raise AssertionError(f"{name} did not become {expected} within {timeout}s")


@pytest_twisted.ensureDeferred
async def test_etcd_change_is_served_promptly(etcd_server, etcd_root, upstream):
    port = free_port()
    key = f"{etcd_root}/config/domains/fast.lain"
    etcd_server.put(key, '{"ips": ["10.0.0.0"]}')
    daemon = Daemon(daemon_args(etcd_server, etcd_root, port, upstream)).start()
    client = EtcdClient(parse_endpoints(etcd_server.endpoint))
    try:
        await threads.deferToThread(daemon.wait_for_log, "DNS listening on")
        await threads.deferToThread(_time_until_answer, port, "fast.lain", "10.0.0.0", time.monotonic(), 10)
        delays = []
        for i in range(1, 41):
            ip = f"10.0.{i // 250}.{i % 250 + 1}"
            start = time.monotonic()
            waiting = threads.deferToThread(_time_until_answer, port, "fast.lain", ip, start)
            await client.put(key.encode(), f'{{"ips": ["{ip}"]}}'.encode())
            delays.append(await waiting)
        delays.sort()
        p99 = delays[int(len(delays) * 0.99) - 1]
        print(f"etcd put -> DNS answer: median {statistics.median(delays) * 1000:.1f} ms, "
              f"p99 {p99 * 1000:.1f} ms, max {delays[-1] * 1000:.1f} ms")
        # Every change is served, none waits for a periodic resync. Latency targets belong in bench/
        # scripts, not in a timed test (a loaded CI host is no benchmark): the figures are printed.
        assert p99 < 1.0, delays

        # And as users see it: dig sees each new value.
        for i in range(5):
            ip = f"10.9.0.{i + 1}"
            await client.put(key.encode(), f'{{"ips": ["{ip}"]}}'.encode())
            await eventually(lambda: dig_answers(port, "fast.lain") == [f"fast.lain. 60 IN A {ip}"], 2,
                             message=f"dig sees {ip}")
    finally:
        await client.close()
        await threads.deferToThread(daemon.stop)


def test_a_big_zone_is_filled_in_slices_and_no_query_sees_it_half_filled(etcd_server, etcd_root):
    """8,000 names: the first snapshot goes into the zone in slices (as one turn it kept the reactor,
    and the lease's keep-alives, waiting ~0.7 s); queries sent from the daemon's start on wait in the
    socket until the zone holds all of it: none is answered from a half-filled zone (without the wait,
    names not filled in yet go upstream and fail)."""
    import json

    from tests.test_dns_zonefeed import bulk_put

    names = 8000
    bulk_put(etcd_server.endpoint, [(f"{etcd_root}/config/domains/d{i}.big.lain",
                                     json.dumps({"ips": [f"10.9.{i >> 8}.{i & 255}"]})) for i in range(names)])
    port, api = free_port(), free_port()
    args = daemon_args(etcd_server, etcd_root, port)
    args[args.index("--api-listen") + 1] = f"127.0.0.1:{api}"
    asked = [f"d{i}.big.lain" for i in range(0, names, names // 16)] + [f"d{names - 1}.big.lain"]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(0.05)
    daemon = Daemon(args).start()
    try:
        deadline = time.monotonic() + 20
        replies: dict[str, DNSRecord] = {}
        while len(replies) < len(asked):  # each name asked until answered, from the daemon's start on
            assert time.monotonic() < deadline, daemon.log()
            for name in asked:
                if name not in replies:
                    sock.sendto(DNSRecord.question(name, "A").pack(), ("127.0.0.1", port))
            try:
                while True:
                    reply = DNSRecord.parse(sock.recv(4096))
                    replies[str(reply.q.qname).rstrip(".")] = reply
            except (socket.timeout, ConnectionRefusedError):
                pass  # not bound yet, or bound and holding: the queries wait in the socket
        for name in asked:
            i = int(name[1:].split(".")[0])
            assert replies[name].header.rcode == 0, f"{name}: rcode {replies[name].header.rcode} from a half-filled zone"
            assert [str(rr.rdata) for rr in replies[name].rr] == [f"10.9.{i >> 8}.{i & 255}"]
        assert "Traceback" not in daemon.log()
    finally:
        sock.close()
        daemon.stop()
