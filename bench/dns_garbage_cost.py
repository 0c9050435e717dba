#!/usr/bin/env python3
"""CPU per hostile packet, by kind, through the batched UDP listener in-process.

The kinds of bench/dns_hostile.py (``forward``: a new name for a silent
upstream) are sent in bursts of 200 from 50 loopback addresses to a
DnsUdpListener on a driven clock, and read with ``doRead``; the thread's
CPU time per packet is printed.  No event loop, no wake-ups: what each
packet costs the slow path itself.  ``--checkout DIR`` measures another
checkout (e.g. ``git archive main``).  Run from the repository:
``.venv/bin/python bench/dns_garbage_cost.py``.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("short", "response", "huge", "random", "formerr", "forward")


def packets(kind: str, n: int, rng: random.Random) -> list[bytes]:
    from dnslib import QTYPE, RR, A, DNSRecord

    out = []
    for i in range(n):
        if kind == "random":
            out.append(os.urandom(rng.randint(1, 512)))
        elif kind == "short":
            out.append(os.urandom(rng.randint(1, 11)))
        elif kind == "formerr":
            out.append(os.urandom(2) + bytes([1, 0, 0, 1, 0, 0, 0, 0, 0, 0]) + os.urandom(rng.randint(1, 60)))
        elif kind == "response":
            reply = DNSRecord.question(f"x{i}.up.test").reply()
            reply.add_answer(RR(f"x{i}.up.test", QTYPE.A, rdata=A("6.6.6.6")))
            out.append(reply.pack())
        elif kind == "huge":
            out.append(os.urandom(rng.randint(2000, 9000)))
        else:
            out.append(DNSRecord.question(f"{os.urandom(6).hex()}.example.net").pack())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", default=REPO)
    parser.add_argument("--bursts", type=int, default=20)
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.checkout))
    from twisted.internet.task import Clock

    from networkd.dns.resolver import Resolver
    from networkd.dns.udp import DnsUdpListener

    class Reactor(Clock):
        def addReader(self, reader):
            pass

        def removeReader(self, reader):
            pass

    rng = random.Random(1)
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    reactor = Reactor()
    resolver = Resolver(reactor, cache_size=10000)
    resolver.set_upstreams([silent.getsockname()])
    udp = DnsUdpListener(resolver, reactor, "127.0.0.1", 0, batched=True)
    udp.stopReading()
    senders = []
    for i in range(50):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((f"127.100.0.{i + 1}", 0))
        s.setblocking(False)
        senders.append(s)
    print(f"networkd from {os.path.abspath(args.checkout)}")
    for kind in KINDS:
        cpu, count = 0.0, 0
        for _ in range(args.bursts):
            burst = packets(kind, 200, rng)
            for j, data in enumerate(burst):
                senders[j % 50].sendto(data, ("127.0.0.1", udp.port))
            started = time.thread_time()
            for _ in range(5):
                udp.doRead()
            cpu += time.thread_time() - started
            count += len(burst)
            reactor.advance(0.1)
            for s in senders:  # the answers
                try:
                    while True:
                        s.recv(65535)
                except BlockingIOError:
                    pass
        print(f"{kind:9s} {cpu / count * 1e6:6.1f} us/packet   upstream questions in flight {len(resolver._inflight)}")
    udp.stopListening()
    silent.close()


if __name__ == "__main__":
    main()
