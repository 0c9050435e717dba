#!/usr/bin/env python3
"""DNS under hostile load: real queries' latency while garbage arrives at a fixed rate.

networkd and dnsmasq (``--cache-size=10000``) get the same 100 local names
(networkd from etcd, dnsmasq from --address) and the same upstream on
127.0.0.x, a small server in a process of its own that answers 100
"forwarded" names at once and drops every other question (black-holed).
Both servers are pinned to ``--server-cpu`` (0).  For each server in turn a
sender process on ``--sender-cpu`` (1; 0 to emulate a busy node) sends
``--garbage-rate`` packets a second to its UDP port from ``--sources``
loopback addresses, cycling through the kinds in ``--kinds``:

  random     random bytes (1-512)
  short      a truncated header (1-11 bytes)
  formerr    a DNS header asking one question, then junk (the FORMERR path)
  response   well-formed answers (QR=1), sent from the upstream's address
  huge       2-9 KB of random bytes (beyond the batched reader's 4 KB slot)
  forward    well-formed queries for random names: forwarded, and the
             upstream never answers them (a black-holed upstream)

while a client process sends 100 real queries a second, alternating a
local name and a forwarded name cached before the garbage started, and
records each one's latency (no answer, or one without the address, within
2 s: lost).  Each round prints, per server, p50/p99/max, lost, the
server's CPU and the datagrams its socket dropped (/proc/net/udp); at the
end the rounds are pooled per kind of name.  ``--rounds`` interleaves the
servers (a noisy neighbour then hurts all alike); ``--baseline DIR`` adds
networkd from another checkout (``git archive main | tar -x -C DIR``).
A bench, not a test (always exits 0); run as root from the repository:
``.venv/bin/python bench/dns_hostile.py --rounds 3``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dnslib import QTYPE, RCODE, RR, A, DNSRecord  # noqa: E402

from tests.support.etcd_server import EtcdServer  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
LOCAL = [(f"h{i}.bench.lain", f"10.9.{i // 250}.{i % 250 + 1}") for i in range(100)]
FORWARDED = [(f"f{i}.up.test", f"172.16.{i // 250}.{i % 250 + 1}") for i in range(100)]
KINDS = ("random", "short", "formerr", "response", "huge", "forward")


def upstream(sock: socket.socket) -> None:
    """Answers A for the FORWARDED names at once (TTL 3600), drops everything else."""
    os.sched_setaffinity(0, {1})
    addresses = {b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0": ip
                 for name, ip in FORWARDED}
    while True:
        data, addr = sock.recvfrom(65535)
        end = data.find(b"\0", 12) + 1
        ip = addresses.get(data[12:end].lower()) if end > 12 else None
        if ip is None or data[end:end + 4] != b"\0\1\0\1":
            continue
        header = data[:2] + bytes([0x81, 0x80]) + b"\0\1\0\1\0\0\0\0"
        record = b"\xc0\x0c\0\1\0\1" + (3600).to_bytes(4, "big") + b"\0\4" + socket.inet_aton(ip)
        sock.sendto(header + data[12:end + 4] + record, addr)


def make_packets(kinds, upstream_host: str) -> list[tuple[str, bytes]]:
    rng = random.Random(7)
    packets = []
    for i in range(6000):
        kind = kinds[i % len(kinds)]
        if kind == "random":
            data = os.urandom(rng.randint(1, 512))
        elif kind == "short":
            data = os.urandom(rng.randint(1, 11))
        elif kind == "formerr":
            data = os.urandom(2) + bytes([1, 0, 0, 1, 0, 0, 0, 0, 0, 0]) + os.urandom(rng.randint(1, 60))
        elif kind == "response":
            name = "".join(rng.choice("abcdefghij") for _ in range(10)) + ".up.test"
            reply = DNSRecord.question(name, "A").reply()
            reply.add_answer(RR(name, QTYPE.A, ttl=60, rdata=A("6.6.6.6")))
            data = reply.pack()
        elif kind == "huge":
            data = os.urandom(rng.randint(2000, 9000))
        else:  # forward
            label = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))
            data = DNSRecord.question(f"{label}.example.net", rng.choice(["A", "AAAA"])).pack()
        packets.append((kind, data))
    return packets


def garbage(port: int, rate: int, sources: int, kinds, upstream_host: str, cpu: int, seconds: float, out) -> None:
    os.sched_setaffinity(0, {cpu})
    socks = []
    for i in range(sources):  # many source addresses: per-client state must not cost the real queries
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((f"127.{100 + i // 250}.{i % 250 + 1}.9", 0))
        socks.append(s)
    spoofer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # "answers" from the upstream's address
    spoofer.bind((upstream_host, 0))
    packets = [(kind, spoofer if kind == "response" else None, data) for kind, data in make_packets(kinds, upstream_host)]
    alphabet = bytes(range(97, 123)) * 10  # a-z, to pick from by random bytes
    interval = 1.0 / rate
    start = time.monotonic()
    end = start + seconds
    n = 0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = start + n * interval
        if due > now:
            time.sleep(min(due - now, 0.01))
            continue
        kind, sock, data = packets[n % len(packets)]
        if kind == "forward":  # a name never asked before: 12 new letters (cache hits cost nothing)
            data = data[:13] + bytes(alphabet[b] for b in os.urandom(12)) + data[25:]
        try:
            (sock or socks[n % len(socks)]).sendto(data, ("127.0.0.1", port))
        except OSError:
            pass
        n += 1
    out.put(n / seconds)


def real_queries(port: int, seconds: float, cpu: int | None = None, out=None):
    """100 queries a second, one at a time, local and forwarded names in
    turn; {"local": [latency s], "forwarded": [...]} and how many got no answer within 2 s."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    latencies = {"local": [], "forwarded": []}
    lost = {"local": 0, "forwarded": 0}
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        kind = "local" if i % 2 == 0 else "forwarded"
        name, _ = (LOCAL if kind == "local" else FORWARDED)[(i // 2) % 100]
        query = DNSRecord.question(name, "A")
        started = time.monotonic()
        sock.sendto(query.pack(), ("127.0.0.1", port))
        try:
            while True:
                reply = DNSRecord.parse(sock.recv(4096))
                if reply.header.id == query.header.id:
                    break
            if reply.rr:
                latencies[kind].append(time.monotonic() - started)
            else:  # an answer without the address is no better than none
                lost[kind] += 1
                if sum(lost.values()) <= 5:
                    print(f"  {name}: {RCODE.get(reply.header.rcode)} after "
                          f"{(time.monotonic() - started) * 1000:.0f} ms", flush=True)
        except socket.timeout:
            lost[kind] += 1
            if sum(lost.values()) <= 5:
                print(f"  {name}: no answer in 2 s", flush=True)
        i += 1
        time.sleep(max(0.0, started + 0.01 - time.monotonic()))
    sock.close()
    if out is not None:
        out.put((latencies, lost))
    return latencies, lost


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentiles(values: list[float]) -> str:
    if not values:
        return "   -   /   -   /   -   "
    values = sorted(values)
    p = lambda q: values[min(len(values) - 1, int(len(values) * q))] * 1000  # noqa: E731
    return f"{p(0.5):6.2f} / {p(0.99):6.2f} / {values[-1] * 1000:7.2f}"


def networkd_counters(api: int) -> str:
    """networkd's DNS counters from /metrics, one line."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{api}/metrics", timeout=2) as r:
            text = r.read().decode()
    except Exception as e:  # noqa: BLE001 - a bench: show what there is
        return str(e)
    keep = [line.replace("networkd_dns_", "") for line in text.splitlines()
            if line.startswith("networkd_dns_") and "latency" not in line and "created" not in line]
    return "; ".join(keep)


def udp_drops(port: int) -> int:
    """Datagrams the kernel dropped for the socket bound to 127.0.0.1:port (full receive buffer)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/udp") as f:
        for line in f:
            fields = line.split()
            if fields[1] == want:
                return int(fields[-1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--garbage-rate", type=int, default=12000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved runs per server; latencies are pooled")
    parser.add_argument("--sources", type=int, default=1000, help="loopback source addresses of the hostile packets")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"garbage kinds, in turn: {','.join(KINDS)}")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--sender-cpu", type=int, default=1, help="0: the garbage competes with the server for its CPU")
    parser.add_argument("--servers", default="networkd,dnsmasq")
    parser.add_argument("--checkout", default=REPO, help="run networkd from this checkout")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also run networkd from this checkout (e.g. `git archive main`) in the same rounds")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    if not set(kinds) <= set(KINDS):
        sys.exit(f"unknown kinds: {set(kinds) - set(KINDS)}")
    wanted = args.servers.split(",")
    work = tempfile.mkdtemp(prefix="networkd-hostile-")
    etcd = EtcdServer().start()
    processes = []
    up_sock = None
    for _ in range(50):
        host = f"127.0.0.{random.randint(2, 254)}"
        up_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            up_sock.bind((host, 53))
            break
        except OSError:
            up_sock.close()
    stub = multiprocessing.Process(target=upstream, args=(up_sock,), daemon=True)
    stub.start()
    try:
        root = "/bench"
        ops = "".join(f'put {root}/config/domains/{n} {{"ips":["{ip}"]}}\n' for n, ip in LOCAL)
        etcd.ctl("txn", input="\n" + ops + "\n\n")
        hosts, resolv = os.path.join(work, "hosts"), os.path.join(work, "resolv.conf")
        open(hosts, "w").close()
        with open(resolv, "w") as f:
            f.write(f"nameserver {host}\n")
        servers = []  # (label, DNS port, process, API port)

        def start_networkd(label: str, checkout: str) -> None:
            port, api = free_port(), free_port()
            processes.append(subprocess.Popen(
                ["taskset", "-c", str(args.server_cpu), TWISTD, "--nodaemon", "--pidfile=", "networkd",
                 "--etcd", etcd.endpoint, "--etcd-root", root, "--dns-listen", f"127.0.0.1:{port}",
                 "--api-listen", f"127.0.0.1:{api}", "--no-vips", "--no-resolv-conf", "--node-ip", "10.1.1.1",
                 "--hosts-file", hosts, "--resolv-conf", resolv],
                stdout=open(os.path.join(work, f"{label}.log"), "wb"), stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": checkout}))
            servers.append((label, port, processes[-1], api))
            print(f"{label} pid {processes[-1].pid}", flush=True)  # for py-spy

        if "networkd" in wanted:
            start_networkd("networkd", args.checkout)
        if args.baseline:
            start_networkd("baseline", os.path.abspath(args.baseline))
        if "dnsmasq" in wanted and (shutil.which("dnsmasq") or os.path.exists("/usr/sbin/dnsmasq")):
            port = free_port()
            processes.append(subprocess.Popen(
                ["taskset", "-c", str(args.server_cpu), "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null",
                 "--no-resolv", "--no-hosts", "--port", str(port), "--listen-address", "127.0.0.1",
                 "--bind-interfaces", "--pid-file=", "--cache-size=10000", f"--server={host}",
                 *(f"--address=/{n}/{ip}" for n, ip in LOCAL)],
                stdout=open(os.path.join(work, "dnsmasq.log"), "wb"), stderr=subprocess.STDOUT))
            servers.append(("dnsmasq", port, processes[-1], None))
        for _, port, _, _ in servers:  # up, with every forwarded name cached
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                latencies, lost = real_queries(port, 2.6)  # every name (100 of each kind) at least once
                if not any(lost.values()):
                    break
                time.sleep(0.2)
        print(f"garbage {args.garbage_rate}/s ({','.join(kinds)}) from {args.sources} addresses, "
              f"{args.rounds} x {args.seconds:.0f} s per server, sender on CPU {args.sender_cpu}, servers on CPU "
              f"{args.server_cpu}; 100 real queries/s (half local, half cached forwarded); loadavg "
              f"{open('/proc/loadavg').read().split()[:3]}", flush=True)
        print(f"{'server':9s} {'names':9s} {'answered':>8s} {'lost':>5s}   p50 / p99 / max (ms)   "
              f"garbage sent/s  server CPU  socket drops")
        pooled: dict = {}
        for round_ in range(args.rounds):
            for label, port, proc, api in servers:
                sent, results = multiprocessing.Queue(), multiprocessing.Queue()
                sender = multiprocessing.Process(target=garbage, args=(
                    port, args.garbage_rate, args.sources, kinds, host, args.sender_cpu, args.seconds + 1, sent))
                sender.start()
                time.sleep(1)
                cpu_before, drops_before = cpu_seconds(proc.pid), udp_drops(port)
                client = multiprocessing.Process(target=real_queries, args=(port, args.seconds, 1, results))
                client.start()
                latencies, lost = results.get()
                client.join()
                cpu = (cpu_seconds(proc.pid) - cpu_before) / args.seconds * 100
                drops = udp_drops(port) - drops_before
                rate = sent.get()
                sender.join()
                both = latencies["local"] + latencies["forwarded"]
                print(f"{label:9s} {'all':9s} {len(both):8d} {sum(lost.values()):5d}   {percentiles(both)}   "
                      f"{rate:7.0f}        {cpu:4.0f} %   {drops:8d}   (round {round_ + 1})", flush=True)
                for kind in ("local", "forwarded"):
                    into = pooled.setdefault((label, kind), ([], [0]))
                    into[0].extend(latencies[kind])
                    into[1][0] += lost[kind]
                if api is not None and round_ == args.rounds - 1:
                    print(f"{label} counters:", networkd_counters(api), flush=True)
        print("pooled:")
        for label, *_ in servers:
            for kind in ("local", "forwarded"):
                values, (lost,) = pooled[(label, kind)]
                print(f"{label:9s} {kind:9s} {len(values):8d} {lost:5d}   {percentiles(values)}", flush=True)
    finally:
        for proc in processes:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        stub.kill()
        stub.join(2)
        up_sock.close()
        etcd.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
