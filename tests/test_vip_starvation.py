"""Twelve nodes, 120 VIPs, one starved CPU: never two holders of one VIP at once.

Every daemon (all its threads), a private etcd and BUSY_LOOPS busy loops
share CPU 0, so timers, keep-alives, netlink calls and etcd itself run
late; an event-based monitor (tests.support.addrmonitor) watches every
node's addresses from CPU 1.  All VIPs of a few apps are written in one
transaction while every node runs a container of every app, so every node
is a candidate for every VIP and the locks churn (first come, then
rebalancing); on top of that, every 4 s a pod group loses three nodes or
gets them back, and one node at a time is frozen (SIGSTOP) for FREEZE s.
Any moment at which two nodes carry the same VIP fails the test.

The addresses are 10.77.1.x/32 on the nodes' eth0: only inside the test's
namespaces.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from base64 import b64encode

import pytest

from tests.support.addrmonitor import AddressMonitor
from tests.support.daemon import Daemon
from tests.support.etcd_server import EtcdServer
from tests.support.vipnodes import Cluster, Node, pod_group, vip_value
from tests.support.waiting import wait_until

TTL = 3
NODES = 12
APPS = ["alpha", "bravo", "charlie", "delta"]
VIPS_PER_APP = 30  # 120 VIPs, written in one transaction (etcd allows 128 operations)
BUSY_LOOPS = 8
WATCH = 50.0  # seconds of churn under observation
FREEZE = 2.5  # seconds one node is SIGSTOPped at a time (its keep-alives stop; TTL is 3 s)
STARVED_CPU = 0
WEB = [{"src": "80", "dest": "8080"}]

pytestmark = pytest.mark.skipif(not {0, 1} <= os.sched_getaffinity(0), reason="needs CPUs 0 and 1")


def pin(pid: int, cpus: set[int]) -> set[int]:
    """Pin every thread of ``pid`` to ``cpus``; returns the thread ids pinned."""
    done = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
            done.add(int(tid))
        except ProcessLookupError:
            pass
    return done


def threads_off(pid: int, cpus: set[int]) -> list[int]:
    off = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            if os.sched_getaffinity(int(tid)) != cpus:
                off.append(int(tid))
        except ProcessLookupError:
            pass
    return off


class PinnedDaemon(Daemon):
    """A daemon started on the starved CPU: ``taskset`` execs ``ip netns exec``, which execs twistd."""

    def command(self) -> list[str]:
        return ["taskset", "-c", str(STARVED_CPU), *super().command()]


class PinnedNode(Node):
    def start(self, wait: bool = True) -> Daemon:
        self.daemon = PinnedDaemon(self.args(), netns=self.ns.name).start()
        if wait:
            self.daemon.wait_for_log("DNAT rules in place", timeout=60)
        return self.daemon


class PinnedCluster(Cluster):
    def add(self, name: str, host: int) -> Node:
        ip = f"10.77.0.{host}"
        ns = self.lan.add_node(name, f"{ip}/24")
        node = PinnedNode(name, ns, ip, self.etcd.client_port, self.root, self.firewall, self.ttl)
        self.nodes[name] = node
        return node


@pytest.fixture
def starved_etcd():
    """A private etcd (like ``private_etcd``) whose every thread runs on the starved CPU."""
    server = EtcdServer().start()
    try:
        pin(server.process.pid, {STARVED_CPU})
        yield server
    finally:
        server.destroy()


@pytest.fixture
def busy_loops():
    """Start ``n`` busy loops on the starved CPU; all are killed at the end."""
    started: list[subprocess.Popen] = []

    def start(n: int) -> list[subprocess.Popen]:
        for _ in range(n):
            p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            started.append(p)
            os.sched_setaffinity(p.pid, {STARVED_CPU})
        return started

    yield start
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(5)


def put_all(etcd: EtcdServer, kvs: dict[str, str]) -> None:
    """Write all ``kvs`` in one etcd transaction (gRPC gateway; values verbatim)."""
    enc = lambda s: b64encode(s.encode()).decode()  # noqa: E731
    body = {"success": [{"request_put": {"key": enc(k), "value": enc(v)}} for k, v in kvs.items()]}
    request = urllib.request.Request(f"{etcd.endpoint}/v3/kv/txn", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=20) as response:
        reply = json.loads(response.read())
    assert reply.get("succeeded"), reply


def pods_key(root: str, app: str) -> str:
    return f"{root}/deployd/pod_groups/{app}/{app}.proc.web"


def placements(cluster: Cluster, app_index: int, nodes: list[str]) -> list[tuple[int, str, str, str]]:
    """A container of the app on each of ``nodes``: 10.77.2<app>.<node host>."""
    return [(i + 1, n, cluster[n].ip, f"10.77.{20 + app_index}.{cluster[n].ip.rsplit('.', 1)[1]}")
            for i, n in enumerate(nodes)]


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}) ")


def log_excerpt(log: str, ip: str, start: float, end: float, before: float = 4.0, after: float = 2.0,
                limit: int = 12) -> list[str]:
    """Lines about ``ip`` (or fencing / the lease) logged from ``start - before`` to ``end + after`` (wall clock)."""
    out = []
    pattern = re.compile(rf"{re.escape(ip)}\b|fencing|lease lost|acknowledges our lease")
    for line in log.splitlines():
        m = _STAMP.match(line)
        if not m or not pattern.search(line):
            continue
        t = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S%z").timestamp()
        if start - before - 1 <= t <= end + after:  # whole seconds in the log
            out.append(line[:220])
    return out[-limit:]


def describe(overlaps, cluster: Cluster, to_wall, monitor: AddressMonitor, shown: int = 4) -> str:
    longest = max(e - s for _, _, s, e in overlaps)
    ips = sorted({ip for ip, *_ in overlaps})
    lines = [f"{len(overlaps)} periods with two or more holders of one VIP "
             f"({len(ips)} VIPs, longest {longest:.2f}s):"]
    for ip, nodes, start, end in overlaps[:shown]:
        lines.append(f"  {ip} on {', '.join(nodes)} for {end - start:.2f}s "
                     f"from {datetime.datetime.fromtimestamp(to_wall(start), datetime.timezone.utc).isoformat(timespec='milliseconds')}")
        for n in nodes:
            for line in log_excerpt(cluster[n].daemon.log(), ip, to_wall(start), to_wall(end)):
                lines.append(f"      {n}: {line}")
    lines.append("daemon logs: " + " ".join(f"{n}={node.daemon.log_path}" for n, node in cluster.nodes.items()))
    fd, path = tempfile.mkstemp(prefix="networkd-addr-events-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump({"events": [(round(to_wall(t), 4), n, ip, what) for t, n, ip, what in monitor.events],
                   "overlaps": [(ip, nodes, round(to_wall(s), 4), round(to_wall(e), 4))
                                for ip, nodes, s, e in overlaps]}, f)
    lines.append(f"address events (wall clock): {path}")
    return "\n".join(lines)


def test_no_vip_on_two_nodes_at_once_under_cpu_starvation(lan, starved_etcd, etcd_root, busy_loops):
    cluster = PinnedCluster(lan, starved_etcd, etcd_root, "nft", ttl=TTL)
    names = [f"n{i + 1}" for i in range(NODES)]
    for i, name in enumerate(names):
        cluster.add(name, 11 + i)
    vips = {app: [f"10.77.1.{a * VIPS_PER_APP + v + 1}" for v in range(VIPS_PER_APP)]
            for a, app in enumerate(APPS)}
    all_vips = {ip for ips in vips.values() for ip in ips}
    frozen: list[Node] = []
    try:
        # Containers of every app on every node; no VIPs yet.
        put_all(starved_etcd, {pods_key(etcd_root, app): pod_group(app, "web", placements(cluster, a, names))
                               for a, app in enumerate(APPS)})
        cluster.start()
        for node in cluster.nodes.values():
            pid = node.daemon.pid
            wait_until(lambda: "twistd" in open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace"),
                       5, message=f"pid {pid} is twistd")
            pin(pid, {STARVED_CPU})
            assert threads_off(pid, {STARVED_CPU}) == [], f"{node.name}: threads off CPU {STARVED_CPU}"
        pin(starved_etcd.process.pid, {STARVED_CPU})
        assert threads_off(starved_etcd.process.pid, {STARVED_CPU}) == [], "etcd threads off the starved CPU"
        busy_loops(BUSY_LOOPS)

        namespaces = {n: cluster[n].ns.name for n in names}
        with AddressMonitor(namespaces, all_vips) as monitor:
            to_wall = lambda t, off=time.time() - time.monotonic(): t + off  # noqa: E731
            # Every VIP at once: every node contests every one.
            put_all(starved_etcd, {f"{etcd_root}/config/vips/{ip}": vip_value(app, "web", WEB)
                                   for app, ips in vips.items() for ip in ips})
            began = time.monotonic()
            step = 0
            while time.monotonic() - began < WATCH:
                time.sleep(4.0)
                step += 1
                app_index = step % len(APPS)
                app = APPS[app_index]
                if step % 2:
                    # move the app: drop three nodes from its pod group (their VIPs of it must go)
                    leaving = {names[(step * 3 + k) % NODES] for k in range(3)}
                    staying = [n for n in names if n not in leaving]
                    starved_etcd.put(pods_key(etcd_root, app),
                                     pod_group(app, "web", placements(cluster, app_index, staying)))
                else:
                    # everyone runs it again, and one node freezes for a moment
                    starved_etcd.put(pods_key(etcd_root, app),
                                     pod_group(app, "web", placements(cluster, app_index, names)))
                    node = cluster[names[step % NODES]]
                    node.daemon.signal(signal.SIGSTOP)
                    frozen.append(node)
                    time.sleep(FREEZE)
                    node.daemon.signal(signal.SIGCONT)
                    frozen.remove(node)
            held = monitor.holders_now()
        monitor.check()
        overlaps = monitor.overlaps()
        longest = max((e - s for _, _, s, e in overlaps), default=0.0)
        print(f"{len(monitor.events)} address events, {len(held)} of {len(all_vips)} VIPs held at the end, "
              f"{len(overlaps)} overlaps, longest {longest:.2f}s, "
              f"{len({o[0] for o in overlaps})} VIPs affected")
        assert overlaps == [], describe(overlaps, cluster, to_wall, monitor)
    finally:
        for p_node in frozen:
            p_node.daemon.signal(signal.SIGCONT)
        # SIGKILL: quick under starvation; the namespaces (and their addresses) go with the lan fixture.
        for name in names:
            node = cluster.nodes.get(name)
            if node is not None and node.daemon is not None:
                node.daemon.signal(signal.SIGKILL)
        cluster.close()
