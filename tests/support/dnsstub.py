"""Stub DNS upstreams on 127.0.0.x for the DNS tests, and query helpers.

A StubServer answers from a small table in a thread (so it serves both the
in-process Twisted tests and daemon subprocesses) and records what it was
asked.  Behaviours: plain answers, NXDOMAIN with an SOA, "big" names that
are truncated over UDP and complete over TCP, SERVFAIL, and silence.
"""

from __future__ import annotations

import random
import socket
import struct
import subprocess
import threading
import time

from dnslib import AAAA, CLASS, QTYPE, RCODE, RR, SOA, A, DNSQuestion, DNSRecord, RD, TXT

from tests.support.ports import free_port


def random_loopback_host() -> str:
    return f"127.0.0.{random.randint(2, 254)}"


class StubServer:
    """UDP+TCP DNS server on ``host:port``; ``records[name] = [ip, ...]``."""

    def __init__(self, host: str | None = None, port: int = 53, *, ttl: int = 300, mode: str = "answer"):
        self.records: dict[str, list[str]] = {}
        self.nxdomain: set[str] = set()
        self.big: set[str] = set()
        self.typed: dict[tuple[str, int], bytes] = {}  # (name, qtype) -> rdata, for any other type
        self.bogus: set[str] = set()  # SERVFAIL unless CD is set, as a validating resolver does
        self.cd_asked: list[str] = []  # names asked with CD set
        self.ttl = ttl
        self.mode = mode  # answer | servfail | refused | silent | tricky
        self.delay = 0.0  # seconds before each UDP answer goes out
        self.queries: list[tuple[str, str, str]] = []  # (proto, name, type)
        self._stop = threading.Event()
        self.udp, self.tcp = self._bind(host, port)
        self.host, self.port = self.udp.getsockname()[:2]
        self._threads = [threading.Thread(target=self._serve_udp, daemon=True),
                         threading.Thread(target=self._serve_tcp, daemon=True)]
        for t in self._threads:
            t.start()

    def _bind(self, host, port):
        for _ in range(50):
            h = host or random_loopback_host()
            p = port or free_port(h)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                udp.bind((h, p))
                tcp.bind((h, p))
            except OSError:
                udp.close()
                tcp.close()
                if host:
                    raise
                continue
            tcp.listen(16)
            udp.settimeout(0.2)
            tcp.settimeout(0.2)
            return udp, tcp
        raise RuntimeError("no free 127.0.0.x address for a stub server")

    def names_asked(self, proto: str | None = None) -> list[str]:
        return [name for p, name, _ in self.queries if proto is None or p == proto]

    def answer(self, data: bytes, proto: str) -> bytes | None:
        request = DNSRecord.parse(data)
        name = str(request.q.qname).rstrip(".").lower()
        self.queries.append((proto, name, QTYPE[request.q.qtype]))
        if request.header.cd:
            self.cd_asked.append(name)
        if self.mode == "silent":
            return None
        reply = request.reply()
        if self.mode == "servfail" or (name in self.bogus and not request.header.cd):
            reply.header.rcode = RCODE.SERVFAIL
            return reply.pack()
        if self.mode == "refused":
            reply.header.rcode = RCODE.REFUSED
            return reply.pack()
        if name in self.nxdomain:
            reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(RR(name.split(".", 1)[-1] + ".", QTYPE.SOA, ttl=self.ttl,
                              rdata=SOA("ns.stub.", "root.stub.", (1, 3600, 600, 86400, 30))))
            return reply.pack()
        if name in self.big:
            for i in range(60):
                reply.add_answer(RR(request.q.qname, QTYPE.TXT, ttl=self.ttl, rdata=TXT("x" * 60 + str(i))))
            if proto == "udp":
                reply = request.reply()
                reply.header.tc = 1
            return reply.pack()
        rdata = self.typed.get((name, request.q.qtype))
        if rdata is not None:
            reply.add_answer(RR(request.q.qname, request.q.qtype, ttl=self.ttl, rdata=RD(rdata)))
            return reply.pack()
        for ip in self.records.get(name, []):
            if ":" in ip and request.q.qtype == QTYPE.AAAA:
                reply.add_answer(RR(request.q.qname, QTYPE.AAAA, ttl=self.ttl, rdata=AAAA(ip)))
            elif ":" not in ip and request.q.qtype == QTYPE.A:
                reply.add_answer(RR(request.q.qname, QTYPE.A, ttl=self.ttl, rdata=A(ip)))
        if name not in self.records:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply.pack()

    def _serve_udp(self):
        while not self._stop.is_set():
            try:
                data, addr = self.udp.recvfrom(65535)
            except (socket.timeout, OSError):
                continue
            try:
                out = self.answer(data, "udp")
                if out is not None and self.mode == "tricky":
                    self._send_forgeries(data, out, addr)
            except Exception:
                continue
            if out is not None and self.delay:
                threading.Timer(self.delay, self._send_late, (out, addr)).start()
            elif out is not None:
                self.udp.sendto(out, addr)

    def _send_late(self, out: bytes, addr) -> None:
        try:
            self.udp.sendto(out, addr)
        except OSError:
            pass  # closed meanwhile

    def _send_forgeries(self, query: bytes, good: bytes, addr) -> None:
        """Answers a spoofer would try (RFC 5452): all must be ignored."""
        forged = DNSRecord.parse(good)
        for rr in forged.rr:
            rr.rdata = A("6.6.6.6")
        forged_bytes = forged.pack()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
            other.bind((random_loopback_host(), 0))
            other.sendto(forged_bytes, addr)  # right ID and question, wrong source address
        wrong_id = bytearray(forged_bytes)
        wrong_id[0] ^= 0x55
        self.udp.sendto(bytes(wrong_id), addr)
        other_question = DNSRecord.parse(forged_bytes)
        other_question.q.qname = "other." + str(other_question.q.qname)
        self.udp.sendto(other_question.pack(), addr)  # right ID, another question

    def _serve_tcp(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except (socket.timeout, OSError):
                continue
            with conn:
                conn.settimeout(2)
                try:
                    length = struct.unpack(">H", _recv_exact(conn, 2))[0]
                    out = self.answer(_recv_exact(conn, length), "tcp")
                    if out is not None:
                        conn.sendall(struct.pack(">H", len(out)) + out)
                except Exception:
                    continue

    def close(self):
        self._stop.set()
        for t in self._threads:
            t.join(2)
        self.udp.close()
        self.tcp.close()


def _recv_exact(conn, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def query(port: int, name: str, qtype: str | int = "A", host: str = "127.0.0.1", *, timeout: float = 2.0,
          tcp: bool = False, edns: bool = False, source: str | None = None, cd: bool = False,
          qclass: str = "IN") -> DNSRecord:
    """Blocking query with dnslib (use from a thread in Twisted tests);
    ``qtype`` by name or number."""
    q = DNSRecord(q=DNSQuestion(name, qtype if isinstance(qtype, int) else getattr(QTYPE, qtype),
                                getattr(CLASS, qclass)))
    q.header.cd = int(cd)
    if edns:
        from dnslib import EDNS0
        q.add_ar(EDNS0(udp_len=1232))
    data = q.pack()
    if tcp:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(struct.pack(">H", len(data)) + data)
            length = struct.unpack(">H", _recv_exact(s, 2))[0]
            return DNSRecord.parse(_recv_exact(s, length))
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
        if source:
            s.bind((source, 0))
        s.settimeout(timeout)
        s.sendto(data, (host, port))
        while True:
            reply, _ = s.recvfrom(65535)
            if reply[:2] == data[:2]:
                return DNSRecord.parse(reply)


def dig(port: int, *args: str, host: str = "127.0.0.1") -> str:
    """Real dig, one try, short timeout; returns its output."""
    out = subprocess.run(["dig", f"@{host}", "-p", str(port), "+time=2", "+tries=1", *args],
                         capture_output=True, text=True, timeout=10)
    return out.stdout


def dig_answers(port: int, *args: str) -> list[str]:
    """The answer lines of ``dig +noall +answer``, as 'name ttl class type data'."""
    return [" ".join(line.split()) for line in dig(port, "+noall", "+answer", *args).splitlines() if line.strip()]


def timed(fn, *args, **kwargs):
    start = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - start


class Snapshots:
    """Stands in for an etcd PrefixWatcher: ``publish(values)`` hands every
    subscriber a new snapshot (``LocalDns(domains=Snapshots())``)."""

    def __init__(self, values=None):
        from networkd.etcd.reflector import PrefixStatus, Snapshot

        self._make = Snapshot
        self.snapshot = None
        self.status = PrefixStatus("")  # never lost: DNS waits for the first publish
        self._subscribers: list = []
        if values is not None:
            self.publish(values)

    def subscribe(self, subscriber) -> None:
        self._subscribers.append(subscriber)
        if self.snapshot is not None:
            subscriber(self.snapshot)

    def publish(self, values: dict) -> None:
        revision = self.snapshot.revision + 1 if self.snapshot is not None else 1
        self.snapshot = self._make("", revision, dict(values))
        for subscriber in self._subscribers:
            subscriber(self.snapshot)


class LocalDns:
    """A DnsService on 127.0.0.1:<free port> without etcd: forwarding to
    ``upstreams`` (StubServers or (host, port) pairs), UDP and TCP; local
    names from ``domains=Snapshots(...)`` if given."""

    def __init__(self, upstreams, **kwargs):
        from twisted.internet import reactor

        from networkd.dns.service import DnsService
        from networkd.options import ListenAddress

        self.port = free_port()
        self.upstreams = [(u.host, u.port) if isinstance(u, StubServer) else u for u in upstreams]
        self.dns = DnsService(reactor, listen=ListenAddress("127.0.0.1", self.port), **kwargs)

    async def start(self) -> "LocalDns":
        self.dns.startService()
        self.dns.set_upstreams(self.upstreams)
        await self.dns.when_listening()
        return self

    async def stop(self) -> None:
        await self.dns.stopService()

    async def q(self, name: str, qtype: str = "A", **kwargs) -> DNSRecord:
        from twisted.internet import threads

        return await threads.deferToThread(query, self.port, name, qtype, **kwargs)
