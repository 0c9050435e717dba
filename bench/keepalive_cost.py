"""Keep-alive cost benchmark: what lease keep-alives alone cost a process at rest, per transport.

A private etcd; for each transport, in turn, a fresh child process builds
what the daemon builds for etcd (networkd's EtcdClient on Twisted's asyncio
reactor, four idle prefix watches, the lease Session with ``--lock-ttl``'s
TTL: a keep-alive every 2/9 of it) and, after ``--settle`` seconds, reads its
own CPU (every thread's time on a CPU, /proc/self/task/*/schedstat) over ``--seconds``.
Transports:

* ``none``: the watches and the lease, no keep-alives (grpc at rest: the floor);
* ``grpc``: keep-alives on one LeaseKeepAlive stream (``--etcd-keepalives grpc``);
* ``gateway``: keep-alives through etcd's JSON gateway (the default).

Runs alternate the transports (the order rotates each run), so a host whose
load drifts affects them alike.  Prints min / median / max CPU (% of one
core) per transport and what one keep-alive costs above the floor.  A bench,
not a test: it always exits 0.

    python bench/keepalive_cost.py --runs 3 --seconds 30
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.procstat import RunTime  # noqa: E402

TRANSPORTS = ("none", "grpc", "gateway")


def child(transport: str, endpoint: str, ttl: int, settle: float, seconds: float) -> None:
    """One transport in this process; prints a JSON line with its CPU and keep-alive count."""
    from networkd.app import install_asyncio_reactor

    reactor = install_asyncio_reactor()
    from twisted.internet import defer, task

    from networkd.etcd.client import EtcdClient
    from networkd.etcd.session import Session
    from networkd.options import parse_endpoints

    client = EtcdClient(parse_endpoints(endpoint), reactor=reactor if transport == "gateway" else None)
    session = Session(client, ttl, reactor)
    acks = []
    session.on_ack(acks.append)
    run_time = RunTime(os.getpid())  # every thread's time on a CPU (schedstat), not 10 ms ticks
    out = {}

    async def run():
        for k in range(4):  # the daemon watches a few prefixes; idle here
            await client.watch_prefix(f"/bench/w{k}/".encode(), 1, lambda event: None)
        if transport == "none":
            session.lease = await client.grant_lease(ttl)
        else:
            session.startService()
        await task.deferLater(reactor, settle, lambda: None)
        cpu, at, count = run_time.seconds(), time.monotonic(), len(acks)
        await task.deferLater(reactor, seconds, lambda: None)
        elapsed = time.monotonic() - at
        out.update(transport=transport, cpu=100 * (run_time.seconds() - cpu) / elapsed, keepalives=len(acks) - count,
                   seconds=elapsed, opened={"gateway": client.gateway.opened if client.gateway else 0,
                                            "grpc": client.keepalives.opened})
        if session.running:
            await session.stopService()

    def done(result):
        print(json.dumps(out), flush=True)
        os._exit(0)

    reactor.callWhenRunning(lambda: defer.ensureDeferred(run()).addBoth(done))
    reactor.run()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0, help="CPU measured over this (default 30)")
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--lock-ttl", type=int, default=3)
    parser.add_argument("--child", choices=TRANSPORTS, help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.endpoint, args.lock_ttl, args.settle, args.seconds)
        return 0

    from tests.support.etcd_server import EtcdServer

    server = EtcdServer().start()
    results: dict[str, list[dict]] = {t: [] for t in TRANSPORTS}
    try:
        for run in range(args.runs):
            order = TRANSPORTS[run % 3:] + TRANSPORTS[:run % 3]
            for transport in order:
                load = open("/proc/loadavg").read().split()[0]
                out = subprocess.run(
                    [sys.executable, __file__, "--child", transport, "--endpoint", server.endpoint,
                     "--lock-ttl", str(args.lock_ttl), "--settle", str(args.settle), "--seconds", str(args.seconds)],
                    capture_output=True, text=True, timeout=args.settle + args.seconds + 60)
                line = [x for x in out.stdout.splitlines() if x.startswith("{")]
                if not line:
                    print(f"run {run + 1} {transport}: no result\n{out.stderr[-2000:]}", flush=True)
                    continue
                result = json.loads(line[-1])
                results[transport].append(result)
                print(f"run {run + 1} {transport:8s} CPU {result['cpu']:.3f} % over {result['seconds']:.0f} s, "
                      f"{result['keepalives']} keep-alives, connections/streams {result['opened']}, "
                      f"loadavg {load}", flush=True)
    finally:
        server.destroy()

    print(f"\nCPU at rest (% of one core), lock TTL {args.lock_ttl} s, {args.runs} runs of {args.seconds:.0f} s, "
          f"min / median / max:")
    floor = statistics.median(r["cpu"] for r in results["none"]) if results["none"] else 0.0
    for transport, rs in results.items():
        if not rs:
            continue
        cpu = [r["cpu"] for r in rs]
        line = f"  {transport:8s} {min(cpu):.3f} / {statistics.median(cpu):.3f} / {max(cpu):.3f} %"
        if transport != "none":
            rate = statistics.median(r["keepalives"] / r["seconds"] for r in rs)
            line += (f"   above the floor {statistics.median(cpu) - floor:.3f} %: "
                     f"{10 * (statistics.median(cpu) - floor) / rate:.2f} ms of CPU per keep-alive ({rate:.2f}/s)")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
