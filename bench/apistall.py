#!/usr/bin/env python3
"""The longest reactor stall while ``GET /v1/vips`` and ``GET /metrics`` are fetched with 1,000 VIP configs (issue 13).

In-process, on the real reactor: the VIP manager of ``bench/apivips.py``
(the tests' host fakes, a driven clock, ``--configs`` VIP configs) is shown
by the real ApiResource on 127.0.0.1, a 1 ms ``LoopingCall`` on the reactor
notes the wall time and the reactor thread's CPU between two of its ticks,
and ``curl`` (other processes, so no client holds our GIL) fetches each path
``--fetches`` times in a row.  Printed per path: the fetch times (p50, max,
the first one: every entry encoded), and between two ticks the longest wall
gap and the most reactor CPU (the longest turn, a garbage collection
included), with how many gaps were over 5 ms.  ``--repo`` measures another
checkout's networkd (the "before").

    .venv/bin/python bench/apistall.py --configs 1000 --fetches 20
    .venv/bin/python bench/apistall.py --repo /path/to/main   # before
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=1000)
    parser.add_argument("--local", type=int, default=100)
    parser.add_argument("--fetches", type=int, default=20)
    parser.add_argument("--repo", default=REPO, help="the checkout whose networkd is measured")
    args = parser.parse_args()
    sys.path.insert(0, args.repo)
    sys.path.insert(1, os.path.join(REPO, "bench"))
    sys.path.insert(2, REPO)  # the tests' fakes (tests/support) of this checkout

    from twisted.internet import defer, reactor, task, threads
    from twisted.web import server

    import networkd  # first: apivips puts this checkout first on the path, the package stays --repo's
    import apivips
    from networkd.api.parts import ApiParts
    from networkd.api.resources import ApiResource

    print(f"networkd from {os.path.dirname(os.path.dirname(networkd.__file__))}; loadavg {os.getloadavg()}")
    _clock, manager, parts = apivips.build(args.configs, args.local)
    parts = ApiParts(**{**parts.__dict__, "reactor": reactor})
    port = reactor.listenTCP(0, server.Site(ApiResource(parts)), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}"
    gaps: list[tuple[float, float]] = []  # (wall, reactor CPU) between two ticks
    last = [time.perf_counter(), time.thread_time()]

    def tick():
        now = (time.perf_counter(), time.thread_time())
        gaps.append((now[0] - last[0], now[1] - last[1]))
        last[:] = now

    ticker = task.LoopingCall(tick)
    ticker.start(0.001)

    def fetch_all(path: str) -> list[float]:
        took = []
        for _ in range(args.fetches):
            t0 = time.perf_counter()
            subprocess.run(["curl", "-sf", "-o", "/dev/null", url + path], check=True)
            took.append(time.perf_counter() - t0)
            time.sleep(0.02)
        return took

    async def run():
        try:
            for path in ("/v1/vips", "/metrics"):
                del gaps[:]
                took = await threads.deferToThread(fetch_all, path)
                walls = sorted(g[0] for g in gaps)
                cpus = sorted(g[1] for g in gaps)
                print(f"GET {path} x{args.fetches}: p50 {sorted(took)[len(took) // 2] * 1e3:.1f} "
                      f"max {max(took) * 1e3:.1f} (first {took[0] * 1e3:.1f}) ms (curl included); between two "
                      f"1 ms ticks: longest {walls[-1] * 1e3:.1f} ms wall, {cpus[-1] * 1e3:.1f} ms reactor CPU, "
                      f"{sum(w > 0.005 for w in walls)} of {len(walls)} gaps over 5 ms wall, "
                      f"{sum(c > 0.005 for c in cpus)} over 5 ms CPU")
        finally:
            ticker.stop()
            await port.stopListening()
            reactor.stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(run()))
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
