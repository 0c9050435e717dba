#!/usr/bin/env python3
"""Server CPU per query on the hot path, without a client in the way.

dnsperf on one core saturates before networkd does (both servers then run
at the client's pace), so this measures the server alone: 20,000 queries
for 1,000 local names are queued in the UDP socket, then ``doRead`` drains
them; process CPU time (user + kernel, so the syscalls count) per query is
printed for the batched reader (recvmmsg/sendmmsg), the one-by-one reader
(recvfrom/sendto, kept for non-Linux), and the same one-by-one loop with no
DNS logic at all, which is the floor for a recvfrom/sendto design.
"""

from __future__ import annotations

import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import asyncioreactor  # noqa: E402

asyncioreactor.install()
from twisted.internet import reactor  # noqa: E402
from dnslib import DNSRecord  # noqa: E402

from networkd.dns.resolver import Resolver  # noqa: E402
from networkd.dns.udp import SO_RCVBUFFORCE, DnsUdpListener  # noqa: E402
from networkd.dns.zone import build_zone  # noqa: E402

QUEUED = 20000
COUNTER = ("NOERROR", "local")


def main() -> None:
    resolver = Resolver(reactor, cache_size=10)
    zone, _ = build_zone({f"h{i}.bench.lain": '{"ips": ["10.0.0.1"]}' for i in range(1000)}, [],
                         node_ip=None, webrouters=(), ttl=60)
    resolver.set_zone(zone)
    listener = DnsUdpListener(resolver, reactor, "127.0.0.1", 0, batched=False)
    listener.stopReading()  # we call doRead ourselves
    batched = DnsUdpListener(resolver, reactor, "127.0.0.1", 0, batched=True)
    batched.stopReading()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    client.setblocking(False)
    packets = [bytes(DNSRecord.question(f"h{i}.bench.lain").pack()) for i in range(1000)]
    def fill(n, server=("127.0.0.1", listener.port)):
        for i in range(n):
            client.sendto(packets[i % len(packets)], server)

    def drain():
        try:
            while True:
                client.recv(4096)
        except BlockingIOError:
            pass

    def answered():
        return resolver.stats.queries.get(COUNTER, 0)

    def measure(read, port=listener.port) -> float:
        best = float("inf")
        for _ in range(5):
            fill(QUEUED, ("127.0.0.1", port))
            start_cpu, start = time.process_time(), answered()
            while True:
                before = answered()
                read()
                if answered() == before:
                    break
            per_query = (time.process_time() - start_cpu) / max(1, answered() - start) * 1e6
            drain()
            best = min(best, per_query)
        return best

    fill(len(packets))  # first sight of each question: the slow path packs the answers
    for _ in range(8):
        listener.doRead()
    drain()

    sock = listener.sock
    fixed = b"x" * 60

    def echo():
        recvfrom, sendto, n = sock.recvfrom, sock.sendto, 0
        for _ in range(256):
            try:
                data, addr = recvfrom(8192)
            except BlockingIOError:
                break
            sendto(data[:2] + fixed, addr)
            n += 1
        resolver.stats.queries[COUNTER] = answered() + n

    in_batches = measure(batched.doRead, batched.port)
    one_by_one = measure(listener.doRead)
    floor = measure(echo)
    print(f"server CPU per query, best of 5 x {QUEUED} queued queries:\n"
          f"  networkd, recvmmsg/sendmmsg batches   {in_batches:5.2f} us\n"
          f"  networkd, recvfrom/sendto one by one  {one_by_one:5.2f} us\n"
          f"  bare recvfrom/sendto loop, no DNS     {floor:5.2f} us")
    listener.stopListening()
    batched.stopListening()


if __name__ == "__main__":
    main()
