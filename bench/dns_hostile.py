#!/usr/bin/env python3
"""DNS under hostile load: real queries' latency while garbage arrives at a fixed rate.

networkd and dnsmasq get the same 100 local names (networkd from etcd,
dnsmasq from --address) and are pinned to CPU 0.  For each server in turn:
a sender on CPU 1 sends ``--garbage-rate`` packets a second to the
server's UDP port from ``--sources`` loopback addresses (1,000), a third each: random bytes
(1-512), a DNS header with junk for a question (FORMERR), and well-formed
queries for random names nobody has (no upstream: answered at once),
while a client sends 100 real queries a second for local names and
records each one's latency (timeout 2 s: counted as lost).  Prints p50,
p99, max and lost per server.  A bench, not a test (always exits 0); run
as root from the repository: ``.venv/bin/python bench/dns_hostile.py``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dnslib import DNSRecord  # noqa: E402

from tests.support.etcd_server import EtcdServer  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
NAMES = [(f"h{i}.bench.lain", f"10.9.{i // 250}.{i % 250 + 1}") for i in range(100)]


def garbage(port: int, rate: int, sources: int, stop: threading.Event, sent: list) -> None:
    os.sched_setaffinity(0, {1})
    socks = []
    for i in range(sources):  # many source addresses: per-client state must not cost the real queries
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((f"127.{100 + i // 250}.{i % 250 + 1}.9", 0))
        socks.append(s)
    rng = random.Random(7)
    packets = []
    for i in range(4096):
        kind = i % 3
        if kind == 0:  # random bytes
            packets.append(os.urandom(rng.randint(1, 512)))
        elif kind == 1:  # a DNS header asking one question, then junk: the FORMERR path
            packets.append(os.urandom(2) + bytes([1, 0, 0, 1, 0, 0, 0, 0, 0, 0]) + os.urandom(rng.randint(1, 60)))
        else:  # a well-formed query for a random name nobody has (no upstream here: answered at once)
            label = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))
            packets.append(DNSRecord.question(f"{label}.example.net", "A").pack())
    interval = 1.0 / rate
    start = time.monotonic()
    n = 0
    while not stop.is_set():
        due = start + n * interval
        now = time.monotonic()
        if due > now:
            time.sleep(min(due - now, 0.01))
            continue
        try:
            socks[n % len(socks)].sendto(packets[n % 4096], ("127.0.0.1", port))
        except OSError:
            pass
        n += 1
    sent.append(n)
    for s in socks:
        s.close()


def real_queries(port: int, seconds: float) -> tuple[list[float], int]:
    """100 queries a second, one at a time; latencies (s) and how many got no answer within 2 s."""
    latencies, lost = [], 0
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        name, _ = NAMES[i % len(NAMES)]
        query = DNSRecord.question(name, "A")
        started = time.monotonic()
        sock.sendto(query.pack(), ("127.0.0.1", port))
        try:
            while True:
                reply = DNSRecord.parse(sock.recv(4096))
                if reply.header.id == query.header.id:
                    break
            latencies.append(time.monotonic() - started)
        except socket.timeout:
            lost += 1
        i += 1
        time.sleep(max(0.0, started + 0.01 - time.monotonic()))
    sock.close()
    return latencies, lost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--garbage-rate", type=int, default=12000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--sources", type=int, default=1000, help="loopback source addresses of the hostile packets")
    parser.add_argument("--checkout", default=REPO, help="run networkd from this checkout (e.g. an older commit)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="networkd-hostile-")
    etcd = EtcdServer().start()
    processes = []
    try:
        root = "/bench"
        ops = "".join(f'put {root}/config/domains/{n} {{"ips":["{ip}"]}}\n' for n, ip in NAMES)
        etcd.ctl("txn", input="\n" + ops + "\n\n")
        hosts, resolv = os.path.join(work, "hosts"), os.path.join(work, "resolv.conf")
        open(hosts, "w").close()
        open(resolv, "w").close()
        nd_port, dm_port = free_port(), free_port()
        processes.append(subprocess.Popen(
            ["taskset", "-c", "0", TWISTD, "--nodaemon", "--pidfile=", "networkd", "--etcd", etcd.endpoint,
             "--etcd-root", root, "--dns-listen", f"127.0.0.1:{nd_port}", "--api-listen", f"127.0.0.1:{free_port()}",
             "--no-vips", "--no-resolv-conf", "--node-ip", "10.1.1.1", "--hosts-file", hosts,
             "--resolv-conf", resolv], stdout=open(os.path.join(work, "networkd.log"), "wb"),
            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": args.checkout}))
        if shutil.which("dnsmasq") or os.path.exists("/usr/sbin/dnsmasq"):
            processes.append(subprocess.Popen(
                ["taskset", "-c", "0", "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
                 "--no-hosts", "--port", str(dm_port), "--listen-address", "127.0.0.1", "--bind-interfaces",
                 "--pid-file=", *(f"--address=/{n}/{ip}" for n, ip in NAMES)],
                stdout=open(os.path.join(work, "dnsmasq.log"), "wb"), stderr=subprocess.STDOUT))
        servers = [("networkd", nd_port)] + ([("dnsmasq", dm_port)] if len(processes) > 1 else [])
        deadline = time.monotonic() + 20
        for _, port in servers:
            while time.monotonic() < deadline:
                if real_queries(port, 0.05)[0]:
                    break
                time.sleep(0.2)
        print(f"garbage {args.garbage_rate}/s from {args.sources} addresses for {args.seconds:.0f} s per server; 100 real queries/s; "
              f"loadavg {open('/proc/loadavg').read().split()[:3]}")
        for label, port in servers:
            stop, sent = threading.Event(), []
            sender = threading.Thread(target=garbage, args=(port, args.garbage_rate, args.sources, stop, sent), daemon=True)
            sender.start()
            time.sleep(1)
            latencies, lost = real_queries(port, args.seconds)
            stop.set()
            sender.join(5)
            latencies.sort()
            rate = sent[0] / (args.seconds + 1) if sent else 0
            p = lambda q: latencies[min(len(latencies) - 1, int(len(latencies) * q))] * 1000 if latencies else float("nan")
            print(f"{label:9s} garbage sent {rate:7.0f}/s  real answered {len(latencies)}, lost {lost}  "
                  f"p50 {p(0.5):6.2f} ms  p99 {p(0.99):6.2f} ms  max {latencies[-1] * 1000 if latencies else 0:7.2f} ms")
    finally:
        for proc in processes:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        etcd.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
