"""Fault benchmark: how long VIPs stay unheld through etcd trouble (issue 10).

Builds, in network namespaces (nothing on the host changes): a real 3-member
etcd cluster on 127.0.0.1 (LAN-tuned elections: heartbeat 50 ms, election
timeout 500 ms), three nodes n1-n3 each running networkd with every etcd
endpoint given (one forwarder per member inside the node's namespace, so a
node can be cut off), and three floating VIPs of one app running on all
three nodes.  Every address change is read from netlink in each namespace
(tests/support/addrmonitor.py, event-based, pinned to CPU 1), so unheld and
overlap periods are measured, not sampled.

Per run, a scenario applies one fault and says which time window to judge;
within it, per VIP, an *unheld* period is one in which no node has it, an
*overlap* one in which two do, a *move* a holding that begins.  Scenarios are
functions in ``SCENARIOS`` (name -> function(bench, run) -> Window):

* ``leader-kill``: SIGKILL the etcd leader, wait out a new election and the
  TTL, revive it.  Expected: nothing unheld, nothing moves.
* ``partition-heal``: cut one node (in turn) from etcd until its VIP moved
  away (9 s), heal; judged from the heal on: the node gets its share back,
  one move, unheld <= 200 ms.
* ``etcd-outage``: freeze every etcd member (SIGSTOP) for ``--outage`` s
  (10), thaw; judged from the freeze until the locks are held again.  With
  ``--failsafe on`` (the default: a shared ``--peer-secret-file``) expected:
  nothing unheld, nothing moves; ``--failsafe off``: every VIP drops within
  the TTL and comes back after the thaw.

A bench, not a test: it always exits 0.  Run as root (timings on a busy
shared host are worse than on a quiet one):

    python bench/faults.py --runs 5
    python bench/faults.py --scenarios partition-heal --runs 5 --timeline
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.support.addrmonitor import AddressMonitor  # noqa: E402
from tests.support.etcdcluster import EtcdCluster  # noqa: E402
from tests.support.faultrun import counts, moves, unheld_periods  # noqa: E402
from tests.support.netns import Lan  # noqa: E402
from tests.support.vipnodes import vip_value  # noqa: E402
from tests.support.waiting import wait_until  # noqa: E402
from tests.test_vip_etcd_faults import ClusterOnEtcdCluster  # noqa: E402

ROOT = "/bench"
VIPS = ["10.77.0.101", "10.77.0.102", "10.77.0.103"]
NODES = ["n1", "n2", "n3"]
PARTITION = 9.0  # seconds a node stays cut off in partition-heal


@dataclass
class Window:
    """What a scenario asks to be judged: [start, end] on time.monotonic(), and notes for the table."""

    start: float
    end: float
    notes: dict = field(default_factory=dict)


@dataclass
class Bench:
    etcd: EtcdCluster
    nodes: ClusterOnEtcdCluster
    monitor: AddressMonitor | None = None
    outage: float = 10.0  # seconds etcd-outage freezes the whole cluster

    def balanced(self) -> bool:
        holders = self.monitor.holders_now()
        return (len(holders) == len(VIPS) and all(len(h) == 1 for h in holders.values())
                and set(counts(holders, NODES).values()) == {1})


# -- scenarios ----------------------------------------------------------------------


def leader_kill(bench: Bench, run: int) -> Window:
    """Kill the etcd leader; wait for a new one and past any lease the kill could end; revive it."""
    leader = wait_until(bench.etcd.leader, 10, message="etcd has a leader")
    start = time.monotonic()
    bench.etcd.kill(leader)
    wait_until(lambda: bench.etcd.leader() is not None, 15, message="a new leader")
    elected = time.monotonic() - start
    time.sleep(max(0.0, start + bench.nodes.ttl + 1 - time.monotonic()))
    bench.etcd.revive(leader)
    bench.etcd.wait_healthy(20)
    time.sleep(1)
    return Window(start, time.monotonic(), {"new leader after s": elected})


def partition_heal(bench: Bench, run: int) -> Window:
    """Cut one node from every etcd member until its VIP moved away; judge the rebalancing after the heal."""
    name = NODES[run % len(NODES)]
    node = bench.nodes[name]
    cut = time.monotonic()
    for forwarder in node.forwarders:
        forwarder.cut()
    wait_until(lambda: len(bench.monitor.holders_now()) == len(VIPS)
               and counts(bench.monitor.holders_now(), NODES)[name] == 0, bench.nodes.ttl + 10,
               message=f"{name}'s VIP moved away")
    time.sleep(max(0.0, cut + PARTITION - time.monotonic()))
    healed = time.monotonic()
    for forwarder in node.forwarders:
        forwarder.heal()
    try:
        wait_until(bench.balanced, 10, interval=0.05)
        balanced = time.monotonic() - healed
    except AssertionError:
        balanced = float("nan")
    time.sleep(3)  # would anything move again?
    return Window(healed, time.monotonic(), {"balanced after s": balanced})


def etcd_outage(bench: Bench, run: int) -> Window:
    """Freeze the whole etcd cluster for ``bench.outage`` s; judged until every VIP's lock is held again."""
    start = time.monotonic()
    bench.etcd.freeze()
    try:
        time.sleep(bench.outage)
    finally:
        bench.etcd.thaw()
    thawed = time.monotonic()

    def locks_held() -> bool:
        try:
            return all(bench.nodes.lock_holder(vip) for vip in VIPS)
        except Exception:  # etcd not answering yet
            return False

    wait_until(locks_held, 20, interval=0.05, message="every lock held again after the thaw")
    relocked = time.monotonic() - thawed
    wait_until(bench.balanced, 15, interval=0.05, message="one VIP per node after the thaw")
    time.sleep(2)  # would anything move again?
    return Window(start, time.monotonic(), {"locks held again after the thaw, s": relocked})


SCENARIOS: dict[str, Callable[[Bench, int], Window]] = {
    "leader-kill": leader_kill,
    "partition-heal": partition_heal,
    "etcd-outage": etcd_outage,
}


# -- the harness --------------------------------------------------------------------


@dataclass
class Result:
    unheld: float  # the longest unheld period of any VIP in the window (s)
    unheld_total: float  # all VIPs' unheld time added up (s)
    overlaps: int  # periods with a VIP on two nodes
    overlap_seconds: float
    moves: int
    notes: dict


def judge(monitor: AddressMonitor, window: Window) -> Result:
    intervals = monitor.intervals()
    gaps = [b - a for ip in VIPS for a, b in unheld_periods(intervals, ip, window.start, window.end)]
    overlaps = [o for o in monitor.overlaps() if o[3] > window.start and o[2] < window.end]
    return Result(max(gaps, default=0.0), sum(gaps), len(overlaps), sum(o[3] - o[2] for o in overlaps),
                  len(moves(intervals, window.start, window.end)), window.notes)


def timeline(bench: Bench, monitor: AddressMonitor, window: Window) -> str:
    """Holdings and daemon log lines around the window, in ms from its start."""
    rows = [(s, f"  {n} has {ip} .. {e - window.start:+.3f}") for n, ip, s, e in monitor.intervals()
            if e >= window.start - 1]
    rows += [(at, f"  {name}: {message[:150]}") for name, at, message in daemon_lines(bench, window.start - 1, window.end)
             if any(w in message for w in ("VIP", "lock", "etcd", "lease", "fenc"))]
    return "\n".join(f"{t - window.start:+8.3f} {text}" for t, text in sorted(rows))


def daemon_lines(bench: Bench, start: float, end: float):
    """(node, monotonic time, message) of every daemon log line from ``start`` to ``end`` (logs are JSON:
    ms times)."""
    offset = time.time() - time.monotonic()
    for name, node in bench.nodes.nodes.items():
        for line in node.daemon.log().splitlines():
            try:
                entry = json.loads(line)
                at = calendar.timegm(time.strptime(entry["time"][:19], "%Y-%m-%dT%H:%M:%S"))
                at += float(entry["time"][19:-1] or 0) - offset
            except (ValueError, KeyError):
                continue
            if start <= at <= end:
                yield name, at, entry.get("message", "")


def keepalive_notes(bench: Bench, window: Window) -> dict:
    """The longest keep-alive outage any node logged in the window ("acknowledges keep-alives again
    after X s"), how many keep-alives were acknowledged late (answered after they were given up), and
    how many nodes fenced."""
    outages, late, fenced = [0.0], 0, set()
    for name, _, message in daemon_lines(bench, window.start, window.end):
        if "acknowledges keep-alives again after" in message:
            outages.append(float(message.split("after ")[1].split("s")[0]))
        elif "s after it was sent (given up" in message:
            late += 1
        elif message.startswith("fencing:"):
            fenced.add(name)
    return {"longest keep-alive outage s": max(outages), "late answers taken": late, "nodes fenced": len(fenced)}


def summary(name: str, values: list[float], unit: str = "ms", scale: float = 1000, digits: int = 0) -> str:
    v = [x * scale for x in values]
    f = f"8.{digits}f"
    return f"{name:<34} min {min(v):{f}}   median {statistics.median(v):{f}}   max {max(v):{f}} {unit}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"of {', '.join(SCENARIOS)}")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--lock-ttl", type=int, default=3)
    parser.add_argument("--firewall", default="nft", choices=("nft", "legacy"))
    parser.add_argument("--timeline", action="store_true", help="print each run's holdings and daemon logs")
    parser.add_argument("--outage", type=float, default=10.0, help="seconds etcd-outage freezes etcd")
    parser.add_argument("--keepalives", default="gateway", choices=("gateway", "grpc"),
                        help="the daemons' --etcd-keepalives")
    parser.add_argument("--failsafe", default="on", choices=("on", "off"),
                        help="give the nodes a shared --peer-secret-file (the peer-confirmed failsafe)")
    args = parser.parse_args()
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")

    etcd = EtcdCluster(3).start()
    lan = Lan()
    nodes = ClusterOnEtcdCluster(lan, etcd, ROOT, args.firewall, ttl=args.lock_ttl)
    bench = Bench(etcd, nodes, outage=args.outage)
    results: dict[str, list[Result]] = {}
    secret = tempfile.NamedTemporaryFile("w", prefix="networkd-bench-peer-secret-")
    secret.write("a shared secret for the bench nodes\n")
    secret.flush()
    try:
        for i, name in enumerate(NODES):
            nodes.add(name, 11 + i)
            nodes[name].extra_args = ["--log-format", "json", "--etcd-keepalives", args.keepalives]
            if args.failsafe == "on":
                nodes[name].extra_args += ["--peer-secret-file", secret.name]
        nodes.put_pods("hello", "web", [(i + 1, n, f"10.77.0.{11 + i}") for i, n in enumerate(NODES)])
        for vip in VIPS:
            nodes.put_vip(vip, vip_value("hello", "web", [{"src": "80", "dest": "8080"}]))
        nodes.start()
        namespaces = {name: node.ns.name for name, node in nodes.nodes.items()}
        for scenario in chosen:
            results[scenario] = []
            for run in range(args.runs):
                with AddressMonitor(namespaces, set(VIPS), poll=0.005) as monitor:
                    bench.monitor = monitor
                    wait_until(bench.balanced, 30, message="one VIP per node")
                    time.sleep(2)  # settled
                    window = SCENARIOS[scenario](bench, run)
                monitor.check()
                window.notes.update(keepalive_notes(bench, window))
                result = judge(monitor, window)
                results[scenario].append(result)
                notes = ", ".join(f"{k} {v:.2f}" for k, v in result.notes.items())
                print(f"{scenario} run {run + 1}: longest unheld {result.unheld * 1000:.0f} ms "
                      f"(all VIPs {result.unheld_total * 1000:.0f} ms), moves {result.moves}, "
                      f"overlaps {result.overlaps} ({result.overlap_seconds * 1000:.0f} ms); {notes}", flush=True)
                if args.timeline:
                    print(timeline(bench, monitor, window), flush=True)

        print(f"\nVIP faults: 3-member etcd, 3 nodes, 3 VIPs, lock TTL {args.lock_ttl}s, firewall {args.firewall}, "
              f"failsafe {args.failsafe}, keep-alives {args.keepalives}, {args.runs} runs each; netlink events in every namespace")
        for scenario, rs in results.items():
            print(f"{scenario}:")
            print(summary("  longest unheld VIP per run", [r.unheld for r in rs]))
            print(summary("  moves per run", [r.moves for r in rs], unit="", scale=1))
            print(f"  overlaps (two nodes with one VIP): {sum(r.overlaps for r in rs)} in {len(rs)} runs")
            for key in rs[0].notes:
                print(summary(f"  {key}", [r.notes[key] for r in rs], unit="s", scale=1, digits=2))
        return 0
    finally:
        etcd.thaw()  # if interrupted mid-freeze
        nodes.close()
        lan.delete()
        etcd.destroy()
        secret.close()


if __name__ == "__main__":
    sys.exit(main())
