#!/usr/bin/env python3
"""Scale benchmark: one daemon, black-box, with many domains in etcd (issue 13).

For each size in ``--sizes`` (default 1,000 / 10,000 / 40,000 domains) a
private etcd and a fresh daemon are started (by default ``--no-vips``, DNS on
127.0.0.1:<free port>, ``--resolv-conf`` and ``--hosts-file`` pointing at
temp files, ``--no-resolv-conf``).  The domains
``<root>/config/domains/d<i>.scale.lain`` = ``{"ips": ["10.x.y.z"]}`` are
written before the daemon starts, in etcd transactions of 128 puts through
etcd's HTTP gateway (one client, one connection).  Then:

1. put → answer: ``--puts`` puts of one name, each a new IP, through one
   kept-alive HTTP connection; after each put a client queries the name in a
   tight loop (every ms, like tests/test_dns_daemon.py ``_time_until_answer``)
   until the new IP is the answer: p50 / p99 / max of put-start → answer;
2. daemon CPU per put: utime+stime of the daemon (/proc/PID/stat) across
   those puts, divided by their number; meanwhile a client thread asks a
   fixed local name every ~1 ms: its longest wait is the longest reactor
   stall a query saw (the reactor answers it as soon as it is free);
3. burst: ``--burst`` puts (new IPs for d0..d<burst-1>) written one by one as
   fast as the connection allows; the time from the last write until the last
   name answers with its new IP (and the daemon CPU used from the first write
   until then), while a client thread asks a fixed local name every ~10 ms
   and records its latency (p50 / p99 / max; a lost answer counts as 1 s);
4. at rest for ``--rest-seconds`` with nobody asking: the daemon's own CPU %
   (the idle target), every thread's measured time on a CPU (schedstat; the
   tick-sampled utime+stime is printed beside it); then ``--rest-seconds`` more while a local name is asked
   every ~10 ms: its latency p50 / p99 / max, the CPU then (mostly answering:
   ~0.25 ms a query, i.e. ~2.4 %), and the RSS at the end.

With ``--forwarded N`` (issue 13's memory case), after step 4: N distinct
names ``f<i>.fwd.test``, each asked once (64 in flight), which the daemon
forwards to a stub upstream on 127.0.0.x:53 (its resolv.conf's nameserver;
inside the node namespace with ``--vips``) answering each with one A record,
TTL 1 hour, so every answer is cacheable; then the RSS again (its target is
64 MB: a full ``--dns-cache-size`` cache of 10,000 beside the domains and the
VIP configs) and how many were answered.

5. the HTTP API: each of ``/v1/dns/config`` (text and JSON), ``/metrics``,
   ``/v1/status`` and ``/v1/vips`` fetched ``--api-fetches`` times in a row
   while a client asks a fixed local name every ms: each endpoint's fetch time
   p50 / max (and the first fetch, logged: what the API keeps is then empty)
   and the local name's p99 / max meanwhile (from 10 ms before to 10 ms after
   each fetch); the DNS dump also with a put before each fetch (the put
   answered before the fetch starts), so that each body is made anew; then the
   daemon's RSS (logged).

Steps 1-5 also log the daemon's own count of reactor turns over 5 ms during
the step and its longest turn since start (``networkd_reactor_turn_seconds``
in its /metrics, networkd/turns.py: wall time, so a host that did not run
the daemon shows too), beside what the client saw.

With ``--vips N`` (``--local M``, default 100; ``--containers absent|listening``
as bench/hold.py) the daemon runs with VIPs on, inside node namespace "n1"
(bench/vipnode.py: nothing on the host changes; etcd stays on the host's
127.0.0.1 and the node reaches it through a forwarder), DNS on 127.0.0.1:53
and the API on 127.0.0.1:3000 of that namespace.  The N VIP configs and their
pod groups (M local to n1, the others on a node with no daemon, 10 per app)
are written before the daemon starts, like the domains.  Every client then
asks from inside the namespace: the put → answer querier from a UDP socket
made there, the probers from threads that joined it (setns(2) moves only the
calling thread), the API fetcher from a forked process that joined it.
Start-up is measured twice: to the first answer for the last domain, and to
all M local VIPs on eth0 (netlink address events, from the daemon's start).
The idle CPU is also broken down per daemon thread (/proc/PID/task/*/schedstat)
and its children's (iptables-restore, nft).

Each size is measured ``--runs`` times (3 by default), each on a fresh etcd
and daemon; each run's table is printed, then every figure's min / median /
max over the runs with the ratio of the median to its target in issue 13.
The exit status is 1 when a median misses its target (each one is named),
or a run failed.  The machine may be shared: loadavg is recorded before and
after each run.  ``--daemon-repo`` runs another checkout's networkd (a
before/after with the same bench).  Run as root from the repository:

    .venv/bin/python bench/scale.py
    .venv/bin/python bench/scale.py --sizes 10000 --rest-seconds 30 --puts 20
    .venv/bin/python bench/scale.py --sizes 40000 --daemon-repo /path/to/main  # before
    .venv/bin/python bench/scale.py --sizes 10000 --vips 1000 --local 100 --containers listening
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dnslib import QTYPE, RCODE, RR, A, DNSRecord  # noqa: E402

from bench.procstat import RunTime  # noqa: E402
from bench.vipnode import AddressWatch, EtcdWriter, VipNode, build_workload  # noqa: E402
from tests.support.vipnodes import in_netns, join_netns  # noqa: E402
from tests.support.dnsstub import StubServer  # noqa: E402
from tests.support.etcd_server import EtcdServer  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

ROOT = "/bench"
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
TICK = os.sysconf("SC_CLK_TCK")
HOT = "hot.scale.lain"  # the fixed local name asked during the burst and at rest
HOT_IP = "10.250.0.1"
PROBE = "probe.scale.lain"  # the name the put → answer loop writes
NS_DNS_PORT, NS_API_PORT = 53, 3000  # with --vips: inside the node's namespace, where they are free
VIPS_PER_APP = 10  # with --vips: VIP configs per app (pod group), as bench/hold.py


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def domain_ip(i: int, salt: int = 0) -> str:
    return f"10.{(i >> 16) + salt * 4 & 255}.{(i >> 8) & 255}.{i & 255}"


def domain_key(name: str) -> str:
    return f"{ROOT}/config/domains/{name}"


def domain_value(ip: str) -> str:
    return json.dumps({"ips": [ip]})


# -- /proc --------------------------------------------------------------------------


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# -- DNS clients ------------------------------------------------------------------------


def answer_ips(sock: socket.socket, packet: bytes, port: int, timeout: float) -> list[str] | None:
    sock.settimeout(timeout)
    sock.sendto(packet, ("127.0.0.1", port))
    try:
        while True:
            data = sock.recv(4096)
            if data[:2] == packet[:2]:
                return [str(rr.rdata) for rr in DNSRecord.parse(data).rr]
    except socket.timeout:
        return None


def dns_socket(netns: str | None = None) -> socket.socket:
    """A UDP socket in ``netns`` (here when None): it asks the daemon listening on that namespace's 127.0.0.1."""
    return in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))


def wait_until_answer(port: int, name: str, expected: str, start: float, timeout: float,
                      sock: socket.socket | None = None) -> float:
    """Ask every millisecond until ``expected`` is the answer; seconds since ``start`` (inf on timeout).
    ``sock``: the socket to ask from (one made in the daemon's namespace); by default a new one here."""
    packet = DNSRecord.question(name, "A").pack()
    with (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) if sock is None else _borrowed(sock)) as s:
        while time.monotonic() - start < timeout:
            if answer_ips(s, os.urandom(2) + packet[2:], port, 0.2) == [expected]:
                return time.monotonic() - start
            time.sleep(0.001)
    return float("inf")


class _borrowed:
    """``with`` on a socket that the caller keeps open."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def __enter__(self) -> socket.socket:
        return self.sock

    def __exit__(self, *exc) -> None:
        pass


class Prober:
    """A thread asking ``name`` every ``interval`` s, recording each answer's latency (a loss counts 1 s).
    ``netns``: the thread joins that network namespace first (where the daemon listens)."""

    def __init__(self, port: int, name: str, expected: str, interval: float = 0.01, netns: str | None = None):
        self.port, self.interval, self.expected, self.netns = port, interval, expected, netns
        self.packet = DNSRecord.question(name, "A").pack()
        self.latencies: list[float] = []
        self.wrong = 0
        self.lost = 0  # no answer within 1 s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        if self.netns is not None:
            join_netns(self.netns)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            while not self._stop.is_set():
                # A new ID each time: a late answer to an earlier question must not count as this one's.
                packet = os.urandom(2) + self.packet[2:]
                t0 = time.monotonic()
                ips = answer_ips(s, packet, self.port, 1.0)
                took = time.monotonic() - t0
                self.latencies.append(1.0 if ips is None else took)
                self.lost += ips is None
                if ips is not None and ips != [self.expected]:
                    self.wrong += 1
                self._stop.wait(max(0.0, self.interval - took))

    def __enter__(self) -> "Prober":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))]


# -- many distinct forwarded names (--forwarded) ------------------------------------------

FORWARDED = "fwd.test"  # f<i>.fwd.test: not local, so forwarded; the stub answers every one


class ForwardStub(StubServer):
    """A stub upstream that answers any ``f<i>.fwd.test`` A question with 172.16.x.y, TTL 1 hour
    (the tests' StubServer answers from a table; 100,000 entries there would be as good, but slower
    to fill); it keeps no record of the questions."""

    def answer(self, data: bytes, proto: str) -> bytes | None:
        request = DNSRecord.parse(data)
        reply = request.reply()
        label = str(request.q.qname).split(".", 1)[0]
        if request.q.qtype == QTYPE.A and label[:1] == "f" and label[1:].isdigit():
            i = int(label[1:])
            reply.add_answer(RR(request.q.qname, QTYPE.A, ttl=self.ttl, rdata=A(f"172.16.{i >> 8 & 255}.{i & 255}")))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply.pack()


class Turns:
    """The daemon's own count of its reactor turns (``networkd_reactor_turn_seconds`` in /metrics):
    ``over(before)`` says how many turns since ``before`` took more than 5 ms, the longest since start
    beside it.  A scrape is one small turn of its own.  ``None`` when the daemon has no such metric
    (``--daemon-repo`` of a checkout before it)."""

    def __init__(self, api_port: int, netns: str | None):
        self.api_port, self.netns = api_port, netns

    def read(self) -> dict | None:
        url = f"http://127.0.0.1:{self.api_port}/metrics"
        command = ["curl", "-sS", "--max-time", "5", url]
        if self.netns:
            command = ["ip", "netns", "exec", self.netns] + command
        try:
            text = subprocess.run(command, capture_output=True, text=True, timeout=10).stdout
        except subprocess.SubprocessError:
            return None
        found = {}
        for line in text.splitlines():
            if line.startswith("networkd_reactor_turn_seconds_bucket{le="):
                bound, _, count = line[len("networkd_reactor_turn_seconds_bucket{le=\""):].partition("\"} ")
                found[bound] = float(count)
            elif line.startswith("networkd_reactor_longest_turn_seconds "):
                found["longest"] = float(line.split()[1])
        return found if "+Inf" in found and "0.005" in found else None

    @staticmethod
    def over(before: dict | None, after: dict | None) -> tuple[int, float] | None:
        """(turns over 5 ms between the two reads, the longest turn since start) or None."""
        if before is None or after is None:
            return None
        over = (after["+Inf"] - after["0.005"]) - (before["+Inf"] - before["0.005"])
        return int(over), after.get("longest", float("nan"))


def turns_text(over: tuple[int, float] | None) -> str:
    if over is None:
        return "daemon turns: not measured"
    return f"daemon turns over 5 ms: {over[0]} (its longest since start {ms(over[1])} ms)"


def forwarded_question(i: int) -> bytes:
    """An A question for f<i>.fwd.test with ID 0 (the sender puts its own), RD set."""
    qname = b"".join(bytes([len(label)]) + label for label in (f"f{i}".encode(), b"fwd", b"test")) + b"\0"
    return b"\0\0\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + qname + b"\x00\x01\x00\x01"


def ask_forwarded(port: int, n: int, netns: str | None, window: int = 64, timeout: float = 2.0) -> dict:
    """Ask f0..f<n-1>.fwd.test once each, ``window`` in flight (below --dns-forward-max), from a thread
    that joined ``netns``; a question unanswered after ``timeout`` s counts as lost.  Counts and seconds."""
    out = {"answered": 0, "servfail": 0, "lost": 0}

    def run() -> None:
        if netns is not None:
            join_netns(netns)
        pending: dict[int, tuple[int, float]] = {}  # ID -> (i, sent at)
        nxt, t0 = 0, time.monotonic()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.05)
            while nxt < n or pending:
                while nxt < n and len(pending) < window:
                    qid = nxt & 0xFFFF
                    if qid in pending:  # 65,536 questions back still unanswered: wait for it first
                        break
                    s.sendto(qid.to_bytes(2, "big") + forwarded_question(nxt)[2:], ("127.0.0.1", port))
                    pending[qid] = (nxt, time.monotonic())
                    nxt += 1
                try:
                    data = s.recv(4096)
                except socket.timeout:
                    data = b""
                if len(data) >= 4:
                    if pending.pop(int.from_bytes(data[:2], "big"), None) is not None:
                        out["servfail" if data[3] & 0x0F == 2 else "answered"] += 1
                now = time.monotonic()
                for qid in [q for q, (_, at) in pending.items() if now - at > timeout]:
                    del pending[qid]
                    out["lost"] += 1
        out["seconds"] = time.monotonic() - t0

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join()
    return out


def ms(v: float) -> str:
    if v != v:
        return "—"
    if v == float("inf"):
        return "timeout"
    return f"{v * 1000:,.0f}" if v >= 0.1 else f"{v * 1000:.1f}"


# -- the HTTP API under scale -------------------------------------------------------------

API_PATHS = ("/v1/dns/config", "/v1/dns/config?format=json", "/metrics", "/v1/status", "/v1/vips")
CHANGED = " (a put before each)"  # the zone changed before each fetch: the body is made again every time


def _fetcher(conn_end, api_port: int, netns: str | None) -> None:
    """In a process of its own (forked): GET each path it is sent on one kept-alive connection,
    answer (status, seconds, bytes).  Reading a 4 MB body in the bench's own process would hold
    the GIL that the DNS prober thread needs: its latencies would be the bench's, not the daemon's.
    ``netns``: the process (its only thread) joins the daemon's namespace first."""
    if netns is not None:
        join_netns(netns)
    conn = http.client.HTTPConnection("127.0.0.1", api_port, timeout=30)
    while True:
        path = conn_end.recv()
        if path is None:
            break
        t0 = time.monotonic()
        conn.request("GET", path)
        answer = conn.getresponse()
        size = len(answer.read())
        conn_end.send((answer.status, time.monotonic() - t0, size))
    conn.close()


def api_step(api_port: int, dns_port: int, fetches: int, writer: "EtcdWriter", netns: str | None = None,
             turns: Turns | None = None) -> dict:
    """Each endpoint fetched ``fetches`` times in a row (one kept-alive connection, in a process
    of its own), a local name asked every ms meanwhile: per endpoint the fetch time p50 / max, the
    body size, and the local name's p99 / max during its fetches.  The DNS dump twice more with a
    put (answered before the fetch starts) before each fetch, so that each one is rendered anew."""
    import multiprocessing

    out = {}
    ours, theirs = multiprocessing.Pipe()
    child = multiprocessing.get_context("fork").Process(target=_fetcher, args=(theirs, api_port, netns), daemon=True)
    child.start()
    querier = dns_socket(netns) if netns else None
    try:
        for path in API_PATHS + tuple(p + CHANGED for p in API_PATHS[:2]):
            took, size, lat, lost = [], 0, [], 0
            turns0 = turns.read() if turns else None
            for i in range(fetches):
                if path.endswith(CHANGED):
                    ip = f"10.252.{i // 250}.{i % 250 + 1}"
                    start = time.monotonic()
                    writer.put(domain_key(PROBE), domain_value(ip))
                    wait_until_answer(dns_port, PROBE, ip, start, 10, sock=querier if netns else None)
                with Prober(dns_port, HOT, HOT_IP, interval=0.001, netns=netns) as prober:
                    time.sleep(0.01)
                    ours.send(path.removesuffix(CHANGED))
                    status, seconds, size = ours.recv()
                    took.append(seconds)
                    time.sleep(0.01)
                if status != 200:
                    raise RuntimeError(f"GET {path}: {status}")
                lat += prober.latencies
                lost += prober.lost
            over = Turns.over(turns0, turns.read() if turns else None)
            out[path] = {"p50": pct(took, 50), "max": max(took), "first": took[0], "bytes": size,
                         "dns_p99": pct(lat, 99), "dns_max": max(lat), "dns_n": len(lat), "dns_lost": lost,
                         "turns": over}
            log(f"  GET {path} x{fetches}: p50 {ms(pct(took, 50))} max {ms(max(took))} (first {ms(took[0])}) ms, "
                f"{size:,} bytes; "
                f"{HOT} meanwhile p99 {ms(pct(lat, 99))} max {ms(max(lat))} ms over {len(lat)}, {lost} lost; "
                f"{turns_text(over)}")
    finally:
        if querier is not None:
            querier.close()
        ours.send(None)
        child.join(5)
        if child.is_alive():
            child.kill()
    return out


# -- one size -----------------------------------------------------------------------------


def thread_shares(before: dict, after: dict, seconds: float) -> list[tuple[str, float]]:
    """CPU share of each thread over ``seconds`` (threads of one name summed), largest first."""
    shares: dict[str, float] = {}
    for tid, (name, cpu) in after.items():
        shares[name] = shares.get(name, 0.0) + (cpu - before.get(tid, (name, 0.0))[1]) / seconds
    return sorted(shares.items(), key=lambda kv: -kv[1])


def children_cpu(pid: int) -> float:
    """CPU of the waited-for children of ``pid`` (iptables-restore, nft ...)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / TICK


def case(r: dict) -> str:
    """The case a run measured, as a column heading."""
    label = f"{r['size']:,} domains"
    if r.get("vips"):
        label += f" + {r['vips']:,} VIP configs ({r['local']:,} local)"
    return label


def write_resolv(resolv: str, args, netns: str | None, stubs: list) -> None:
    """The daemon's resolv.conf: with --forwarded, its nameserver is a ForwardStub (in ``netns``), added
    to ``stubs`` (the caller stops them); else 127.0.0.1 (nothing is forwarded)."""
    host = "127.0.0.1"
    if args.forwarded:
        stub = in_netns(netns, lambda: ForwardStub(host="127.0.0.2" if netns else None, ttl=3600))
        stubs.append(stub)
        host = stub.host
    with open(resolv, "w") as f:
        f.write(f"nameserver {host}\n")


def start_daemon(size: int, args, work: str, etcd, writer: EtcdWriter, result: dict, stubs: list):
    """Start the daemon as the case asks: (pid, DNS port, API port, netns or None, its log, the VipNode
    or None, the Popen to stop or None, the AddressWatch or None); ``result["started"]``: when.
    With --forwarded the stub upstream it forwards to is added to ``stubs``."""
    hosts = os.path.join(work, "hosts")
    resolv = os.path.join(work, "resolv.conf")
    open(hosts, "w").close()
    env = {**os.environ, "PYTHONPATH": args.daemon_repo}  # that checkout's networkd, not the venv's
    if not args.vips:
        write_resolv(resolv, args, None, stubs)
        port, api_port = free_port(), free_port()
        daemon_log = os.path.join(work, f"networkd-{size}.log")
        result["started"] = time.monotonic()
        proc = subprocess.Popen(
            [TWISTD, "--nodaemon", "--pidfile=", "networkd",
             "--etcd", etcd.endpoint, "--etcd-root", ROOT, "--dns-listen", f"127.0.0.1:{port}",
             "--api-listen", f"127.0.0.1:{api_port}", "--no-vips", "--no-resolv-conf",
             "--node-ip", "10.1.1.1", "--hosts-file", hosts, "--resolv-conf", resolv],
            stdout=open(daemon_log, "wb"), stderr=subprocess.STDOUT, env=env,
        )
        return proc.pid, port, api_port, None, daemon_log, None, proc, None
    node = VipNode(etcd, ROOT, log=log)
    try:
        write_resolv(resolv, args, node.netns, stubs)
        t0 = time.monotonic()
        pods, vips, local = build_workload(ROOT, args.vips, args.local, VIPS_PER_APP, node.ip)
        writer.put_all(pods)
        writer.put_all(vips)
        result["local_ips"] = sorted(local)
        log(f"{size}: wrote {len(pods)} pod groups and {len(vips)} VIP configs ({len(local)} local) "
            f"in {time.monotonic() - t0:.1f} s; node namespace {node.netns}")
        if args.containers == "listening":
            node.start_listener()
        watch = AddressWatch(node.netns, local)
        result["started"] = time.monotonic()
        daemon = node.start_dns_daemon(NS_DNS_PORT, ["--hosts-file", hosts, "--resolv-conf", resolv], env=env)
    except BaseException:
        node.close()
        raise
    return daemon.pid, NS_DNS_PORT, NS_API_PORT, node.netns, daemon.log_path, node, None, watch


def run_size(size: int, args, work: str) -> dict:
    result: dict = {"size": size, "vips": args.vips, "local": args.local if args.vips else 0,
                    "load_before": loadavg()}
    etcd = EtcdServer().start()
    proc = node = watch = querier = None
    stubs: list = []
    writer = EtcdWriter(etcd.endpoint)
    try:
        t0 = time.monotonic()
        items = [(domain_key(f"d{i}.scale.lain"), domain_value(domain_ip(i))) for i in range(size)]
        items += [(domain_key(HOT), domain_value(HOT_IP)), (domain_key(PROBE), domain_value("10.251.0.0"))]
        writer.put_all(items)
        log(f"{size}: wrote {len(items)} domains in {time.monotonic() - t0:.1f} s")

        pid, port, api_port, ns, daemon_log, node, proc, watch = start_daemon(size, args, work, etcd, writer, result, stubs)
        started = result.pop("started")
        # With --vips every DNS client asks from inside the node's namespace: the put → answer querier
        # from a socket made there, the probers from threads that joined it, the API fetcher a process
        # that joined it.  Without, they ask here as they always did (a socket of their own per wait).
        querier = dns_socket(ns) if ns else None
        last = f"d{size - 1}.scale.lain"
        up = wait_until_answer(port, last, domain_ip(size - 1), started, 120, sock=querier)
        result["startup"] = up
        log(f"{size}: daemon {pid} answers {last} after {up:.2f} s")
        if watch is not None:
            watch.done.wait(max(0.0, started + 120 - time.monotonic()))
            held = watch.all_at - started if watch.all_at is not None else float("inf")
            result["startup_vips"] = held
            on_eth0 = node.node.addresses()
            missing = set(result["local_ips"]) - on_eth0
            log(f"{size}: all {args.local} local VIPs on eth0 {ms(held)} ms after the daemon's start "
                f"(netlink events; now {len(on_eth0)} /32s on eth0, {len(missing)} local ones missing)")
        time.sleep(2)  # let start-up work settle

        # 1 + 2: put → answer, CPU per put
        turns = Turns(api_port, ns)
        delays = []
        turns0 = turns.read()
        with Prober(port, HOT, HOT_IP, interval=0.001, netns=ns) as stall:
            cpu0 = cpu_seconds(pid)
            for i in range(1, args.puts + 1):
                ip = f"10.251.{i // 250}.{i % 250 + 1}"
                start = time.monotonic()
                writer.put(domain_key(PROBE), domain_value(ip))
                delays.append(wait_until_answer(port, PROBE, ip, start, args.put_timeout, sock=querier))
            cpu_used = cpu_seconds(pid) - cpu0
        result["put_p50"], result["put_p99"], result["put_max"] = pct(delays, 50), pct(delays, 99), max(delays)
        result["cpu_per_put"] = cpu_used / args.puts
        result["put_turns"] = Turns.over(turns0, turns.read())
        lat = stall.latencies
        result.update(put_hot_p99=pct(lat, 99), put_hot_max=max(lat), put_hot_n=len(lat))
        log(f"{size}: put → answer p50 {ms(result['put_p50'])} p99 {ms(result['put_p99'])} "
            f"max {ms(result['put_max'])} ms over {args.puts}; CPU/put {ms(result['cpu_per_put'])} ms; "
            f"{HOT} asked every ms meanwhile: p99 {ms(result['put_hot_p99'])} max {ms(result['put_hot_max'])} ms "
            f"over {len(lat)}; {turns_text(result['put_turns'])}")
        time.sleep(1)

        # 3: burst
        n = min(args.burst, size)
        burst = [(domain_key(f"d{i}.scale.lain"), domain_value(domain_ip(i, salt=1))) for i in range(n)]
        turns0 = turns.read()
        with Prober(port, HOT, HOT_IP, netns=ns) as prober:
            time.sleep(0.5)
            cpu0 = cpu_seconds(pid)
            w0 = time.monotonic()
            for key, value in burst:
                writer.put(key, value)
            w1 = time.monotonic()
            served = wait_until_answer(port, f"d{n - 1}.scale.lain", domain_ip(n - 1, salt=1), w1,
                                       args.burst_timeout, sock=querier)
            burst_cpu = cpu_seconds(pid) - cpu0
            time.sleep(0.5)
        result["burst_turns"] = Turns.over(turns0, turns.read())
        lat = prober.latencies
        result.update(burst_n=n, burst_write=w1 - w0, burst_served=served, burst_cpu=burst_cpu,
                      burst_hot_p50=pct(lat, 50), burst_hot_p99=pct(lat, 99), burst_hot_max=max(lat),
                      burst_hot_n=len(lat), burst_wrong=prober.wrong, burst_lost=prober.lost)
        log(f"{size}: burst of {n} written in {w1 - w0:.2f} s; last served {ms(served)} ms after the last write "
            f"({burst_cpu:.1f} s CPU); {HOT} p50 {ms(pct(lat, 50))} p99 {ms(pct(lat, 99))} max {ms(max(lat))} ms "
            f"over {len(lat)} queries, {prober.lost} lost (counted as 1 s), {prober.wrong} wrong; "
            f"{turns_text(result['burst_turns'])}")
        if served == float("inf"):  # do not measure "rest" while the daemon still works through the burst
            wait_until_answer(port, f"d{n - 1}.scale.lain", domain_ip(n - 1, salt=1), time.monotonic(),
                              args.burst_timeout, sock=querier)
        time.sleep(3)

        # 4: rest: first nobody asks (the daemon's own CPU: the idle target), then HOT is asked
        # 100 times a second (its latency; the CPU then is mostly answering, ~0.25 ms a query)
        # The figure is the threads' measured time on a CPU (schedstat); utime+stime, sampled by the
        # 100 Hz tick, is kept beside it (at 0.5 % it counts ~30 ticks a minute: ±13 % from run to run).
        run_time = RunTime(pid)
        threads0 = run_time.threads()
        cpu0, ticks0, r0 = run_time.seconds(), cpu_seconds(pid), time.monotonic()
        if ns:  # the daemon's children (iptables-restore, nft)
            children0 = children_cpu(pid)
        time.sleep(args.rest_seconds)
        took = time.monotonic() - r0
        idle_cpu = (run_time.seconds() - cpu0) / took
        result["idle_cpu_ticks"] = (cpu_seconds(pid) - ticks0) / took
        result["idle_threads"] = thread_shares(threads0, run_time.threads(), took)
        line = ", ".join(f"{name} {share * 100:.2f} %" for name, share in result["idle_threads"] if share > 0)
        if ns:
            result["idle_children_cpu"] = (children_cpu(pid) - children0) / took
            line += f"; children {result['idle_children_cpu'] * 100:.2f} %"
        log(f"{size}: at rest, nobody asking, per thread (schedstat): {line}; utime+stime "
            f"{result['idle_cpu_ticks'] * 100:.2f} %")
        cpu0, r0, turns0 = cpu_seconds(pid), time.monotonic(), turns.read()
        with Prober(port, HOT, HOT_IP, netns=ns) as prober:
            time.sleep(args.rest_seconds)
        result["rest_turns"] = Turns.over(turns0, turns.read())
        rest_cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - r0)
        lat = prober.latencies
        result.update(idle_cpu=idle_cpu, rest_cpu=rest_cpu, rest_p50=pct(lat, 50), rest_p99=pct(lat, 99),
                      rest_max=max(lat), rest_n=len(lat), rest_lost=prober.lost, rss=rss_mb(pid))
        log(f"{size}: at rest {args.rest_seconds:g} s, nobody asking: CPU {idle_cpu * 100:.2f} %; then asked "
            f"100/s: CPU {rest_cpu * 100:.2f} %, {HOT} p50 {ms(result['rest_p50'])} "
            f"p99 {ms(result['rest_p99'])} max {ms(result['rest_max'])} ms over {len(lat)}, {prober.lost} lost; "
            f"RSS {result['rss']:.0f} MB; {turns_text(result['rest_turns'])}")
        # 4b: many distinct forwarded names, each asked once: the cache fills (and stays bounded)
        if args.forwarded:
            asked = ask_forwarded(port, args.forwarded, ns)
            time.sleep(2)
            result.update(fwd_n=args.forwarded, fwd_answered=asked["answered"], fwd_servfail=asked["servfail"],
                          fwd_lost=asked["lost"], fwd_seconds=asked["seconds"], rss_forwarded=rss_mb(pid))
            log(f"{size}: {args.forwarded:,} distinct forwarded names asked in {asked['seconds']:.1f} s: "
                f"{asked['answered']:,} answered, {asked['servfail']:,} SERVFAIL, {asked['lost']:,} lost; "
                f"RSS {result['rss_forwarded']:.0f} MB")
        # 5: the API while a local name is asked every ms
        if args.api_fetches:
            result["api"] = api_step(api_port, port, args.api_fetches, writer, ns, turns)
            result["rss_after_api"] = rss_mb(pid)  # the API keeps what it made (dump bodies, VIP texts)
            log(f"{size}: RSS after the API fetches {result['rss_after_api']:.0f} MB")
        if node is not None:
            missing = set(result["local_ips"]) - node.node.addresses()
            result["vips_missing_end"] = len(missing)
            log(f"{size}: at the end {args.local - len(missing)} of {args.local} local VIPs on eth0")
        with open(daemon_log, "rb") as f:
            result["tracebacks"] = f.read().count(b"Traceback")
    finally:
        writer.close()
        for closing in (querier, watch):
            if closing is not None:
                closing.close()
        if proc is not None:
            stop_process(proc)
        if node is not None:
            node.close()
        for stub in stubs:
            stub.close()
        etcd.destroy()
        result["load_after"] = loadavg()
        result.pop("local_ips", None)
    return result


def print_table(results: list[dict], args) -> None:
    sizes = [case(r) for r in results]
    g = lambda key: [r.get(key, float("nan")) for r in results]  # noqa: E731
    rows = [
        ("etcd put → DNS answer, p50 / p99 (max) ms", [
            f"{ms(r.get('put_p50', float('nan')))} / {ms(r.get('put_p99', float('nan')))} "
            f"({ms(r.get('put_max', float('nan')))})" for r in results]),
        ("daemon CPU per put", [f"{ms(v)} ms" for v in g("cpu_per_put")]),
        ("local name asked every ms during the puts, p99 (max: longest stall seen)", [
            f"{ms(r['put_hot_p99'])} ({ms(r['put_hot_max'])}) ms" if "put_hot_max" in r else "—" for r in results]),
        ("burst of puts: how many, written in / last served after", [
            f"{r['burst_n']:,}, {r['burst_write']:.2f} s / {ms(r['burst_served'])} ms ({r['burst_cpu']:.1f} s CPU)"
            if "burst_served" in r else "—" for r in results]),
        ("local name during the burst, p50 / p99 (max) ms", [
            f"{ms(r['burst_hot_p50'])} / {ms(r['burst_hot_p99'])} ({ms(r['burst_hot_max'])}), "
            f"{r['burst_lost']} of {r['burst_hot_n']} lost" if "burst_hot_p99" in r else "—" for r in results]),
        (f"at rest {args.rest_seconds:g} s, nobody asking: daemon CPU", [f"{v * 100:.2f} %" if v == v else "—"
                                                                         for v in g("idle_cpu")]),
        (f"at rest {args.rest_seconds:g} s, a local name asked 100/s: daemon CPU", [
            f"{v * 100:.2f} %" if v == v else "—" for v in g("rest_cpu")]),
        ("at rest: local name p50 / p99 (max) ms", [
            f"{ms(r['rest_p50'])} / {ms(r['rest_p99'])} ({ms(r['rest_max'])})" if "rest_p99" in r else "—"
            for r in results]),
        ("at rest: RSS", [f"{r['rss']:.0f} MB" if "rss" in r else "—" for r in results]),
    ] + ([
        ("distinct forwarded names asked: answered / SERVFAIL / lost (seconds)", [
            f"{r['fwd_answered']:,} / {r['fwd_servfail']:,} / {r['fwd_lost']:,} ({r['fwd_seconds']:.0f} s)"
            if "fwd_n" in r else "—" for r in results]),
        ("after them: RSS", [f"{r['rss_forwarded']:.0f} MB" if "rss_forwarded" in r else "—" for r in results]),
    ] if args.forwarded else []) + [
        ("start-up: first answer for the last domain", [f"{r['startup']:.2f} s" if "startup" in r else "—"
                                                        for r in results]),
    ] + ([
        ("start-up: all local VIPs on eth0", [f"{r['startup_vips']:.2f} s" if "startup_vips" in r else "—"
                                              for r in results]),
        ("at rest, nobody asking: the busiest threads", [", ".join(
            f"{name} {share * 100:.2f} %" for name, share in r.get("idle_threads", [])[:3])
            + f"; children {r.get('idle_children_cpu', 0) * 100:.2f} %" for r in results]),
    ] if any(r.get("vips") for r in results) else []) + [
        ("loadavg before / after", [f"{r['load_before']} / {r.get('load_after', '?')}" for r in results]),
    ]
    print()
    print("| measure | " + " | ".join(sizes) + " |")
    print("|---" * (len(sizes) + 1) + "|")
    for label, cells in rows:
        print(f"| {label} | " + " | ".join(cells) + " |")


# -- repeated runs: min / median / max, and the targets of issue 13 -----------------------

# (label, figure of one run or None, unit, target: ("<" or "<=", bound) or None)
def _api(path: str, key: str):
    return lambda r: r.get("api", {}).get(path, {}).get(key)


FIGURES = [
    ("put → answer p50", lambda r: r.get("put_p50"), "ms", None),
    ("put → answer p99", lambda r: r.get("put_p99"), "ms", ("<", 0.050)),
    ("daemon CPU per put", lambda r: r.get("cpu_per_put"), "ms", None),
    ("local name during the puts, p99", lambda r: r.get("put_hot_p99"), "ms", ("<", 0.005)),
    ("local name during the puts, max (longest stall)", lambda r: r.get("put_hot_max"), "ms", None),
    ("burst: last served after the last write", lambda r: r.get("burst_served"), "ms", ("<", 2.0)),
    ("burst: daemon CPU", lambda r: r.get("burst_cpu"), "s", None),
    ("local name during the burst, p99", lambda r: r.get("burst_hot_p99"), "ms", ("<", 0.005)),
    ("at rest, nobody asking: daemon CPU", lambda r: r.get("idle_cpu"), "%", ("<", 0.005)),
    ("at rest, asked 100/s: daemon CPU", lambda r: r.get("rest_cpu"), "%", None),
    ("at rest: local name p99", lambda r: r.get("rest_p99"), "ms", ("<", 0.005)),
    ("at rest: RSS", lambda r: r.get("rss"), "MB", ("<=", 50.0)),
    ("after --forwarded distinct names: RSS", lambda r: r.get("rss_forwarded"), "MB", ("<=", 64.0)),
    ("start-up: the last domain answered after", lambda r: r.get("startup"), "s", ("<", 1.5)),
] + [
    (f"GET {path}: {what}", _api(path, key), "ms", target)
    for path in API_PATHS + tuple(p + CHANGED for p in API_PATHS[:2])
    for what, key, target in (
        ("p50", "p50", None),
        ("max", "max", ("<", 0.100) if path in ("/metrics", "/v1/vips") else None),
        ("local name meanwhile, p99", "dns_p99", ("<", 0.005)),
        ("local name meanwhile, max", "dns_max", None),
    )
]


VIP_FIGURES = [  # only with --vips
    ("start-up: all local VIPs on eth0 after", lambda r: r.get("startup_vips"), "s", ("<", 2.5)),
]


def fmt(value, unit: str) -> str:
    if value is None or value != value:
        return "—"
    if unit == "ms":
        return ms(value)
    if unit == "%":
        return f"{value * 100:.2f}"
    if unit == "MB":
        return f"{value:.0f}"
    return f"{value:.2f}"


def summarize(results: list[dict]) -> list[str]:
    """Print min / median / max over the runs of each size, with the ratio of the median to the
    target; return the targets missed (by the median)."""
    sizes = sorted({(r["size"], case(r)) for r in results})
    missed = []
    print()
    print("| measure | " + " | ".join(f"{label}: min / median / max" for _, label in sizes) + " | target |")
    print("|---" * (len(sizes) + 2) + "|")
    for label, figure, unit, target in FIGURES + (VIP_FIGURES if any(r.get("vips") for r in results) else []):
        cells = []
        for size, heading in sizes:
            values = sorted(v for v in (figure(r) for r in results if case(r) == heading and not r.get("error"))
                            if v is not None)
            if not values:
                cells.append("—")
                continue
            median = values[len(values) // 2] if len(values) % 2 else (values[len(values) // 2 - 1]
                                                                       + values[len(values) // 2]) / 2
            cell = f"{fmt(values[0], unit)} / {fmt(median, unit)} / {fmt(values[-1], unit)}"
            if target is not None:
                op, bound = target
                ok = median < bound if op == "<" else median <= bound
                cell += f" ({median / bound:.2f}× target)" if bound else ""
                if not ok:
                    cell += " MISSED"
                    missed.append(f"{label} at {heading}: median {fmt(median, unit)} {unit}, "
                                  f"target {op} {fmt(bound, unit)} {unit}")
            cells.append(cell)
        goal = "—" if target is None else f"{target[0]} {fmt(target[1], unit)} {unit}"
        print(f"| {label} ({unit}) | " + " | ".join(cells) + f" | {goal} |")
    runs = {heading: sum(case(r) == heading and not r.get("error") for r in results) for _, heading in sizes}
    print("\nruns per size: " + ", ".join(f"{heading}: {n}" for heading, n in runs.items()))
    print("loadavg per run: " + "; ".join(f"{case(r)}: {r['load_before']} → {r.get('load_after', '?')}"
                                         for r in results))
    return missed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,40000", help="comma-separated domain counts")
    parser.add_argument("--puts", type=int, default=50, help="puts of one name for put → answer")
    parser.add_argument("--put-timeout", type=float, default=30)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--burst-timeout", type=float, default=300)
    parser.add_argument("--rest-seconds", type=float, default=60)
    parser.add_argument("--runs", type=int, default=3, help="runs of each size (a fresh etcd and daemon each)")
    parser.add_argument("--api-fetches", type=int, default=20, help="fetches of each API endpoint (0: no API step)")
    parser.add_argument("--daemon-repo", default=REPO,
                        help="the checkout whose networkd the daemon runs (to measure a before/after)")
    parser.add_argument("--vips", type=int, default=0, metavar="N",
                        help="N VIP configs: the daemon runs with VIPs in a node namespace (default 0: --no-vips, here)")
    parser.add_argument("--local", type=int, default=100, metavar="M",
                        help="with --vips: how many of them are local to the node (default 100)")
    parser.add_argument("--containers", default="absent", choices=("absent", "listening"),
                        help="with --vips: listening makes every container address answer on port 80 in the node")
    parser.add_argument("--forwarded", type=int, default=0, metavar="N",
                        help="after the rest: N distinct names forwarded to a stub upstream, then the RSS again")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    if args.vips and not (0 <= args.local <= args.vips <= 250 * 250):
        parser.error("need 0 <= --local <= --vips <= 62500")
    # SIGTERM (and SIGINT, ignored in a shell's background jobs) stops the bench the way Ctrl-C does:
    # the daemon and etcd are stopped and their directories removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    began = time.monotonic()
    log(f"loadavg {loadavg()}, {os.cpu_count()} CPUs")
    results: list[dict] = []
    missed: list[str] = []
    interrupted = False
    work = tempfile.mkdtemp(prefix="networkd-scale-")
    try:
        for run in range(1, args.runs + 1):
            for size in (int(s) for s in args.sizes.split(",") if s.strip()):
                log(f"run {run} of {args.runs}, {size:,} domains")
                try:
                    results.append(run_size(size, args, work))
                except KeyboardInterrupt:  # Ctrl-C: the runs measured so far still get their table
                    log(f"{size}: interrupted")
                    interrupted = True
                    break
                except Exception:  # a bench: report and go on with the next size
                    traceback.print_exc()
                    results.append({"size": size, "vips": args.vips, "local": args.local if args.vips else 0,
                                    "load_before": loadavg(), "error": True})
            if interrupted:
                break
        for run in range(0, len(results), len(args.sizes.split(","))):
            print_table(results[run:run + len(args.sizes.split(","))], args)
        missed = summarize(results)
        print(f"\ntook {time.monotonic() - began:.0f} s; loadavg now {loadavg()}")
        for line in missed:
            print(f"target missed: {line}")
        if any(r.get("error") for r in results):
            print("some runs failed (see above)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, default=str)
    finally:
        if os.environ.get("KEEP_BENCH"):
            print("kept", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if missed or interrupted or any(r.get("error") for r in results) else 0)


if __name__ == "__main__":
    main()
