"""Failover benchmark: how long a VIP is unanswered when its holder dies or stops.

Builds, in network namespaces (nothing on the host changes): a bridge, two
nodes running networkd and a "container" (a TCP listener on the node IP,
port 8080, which answers with the node's name), a client namespace, and a
real etcd.  VIP 10.77.0.100:80 is DNATed to the local listener by the
holder.  A prober in the client namespace opens a connection to the VIP
every 10 ms (each in its own thread, so a connection stuck on a missing
address does not delay the next) and logs when each one ended and who
answered; an address sampler looks at both nodes every 10 ms for overlaps.

Unplanned failover: SIGKILL of the holder; planned: SIGTERM.  Measured from
the signal to the first answer from the other node (so within 10 ms of the
moment it starts answering).  Run as root:

    python bench/failover.py --runs 10
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.support.etcd_server import EtcdServer  # noqa: E402
from tests.support.netns import Lan  # noqa: E402
from tests.support.vipnodes import AddressSampler, Cluster, vip_value  # noqa: E402
from tests.support.waiting import wait_until  # noqa: E402

VIP = "10.77.0.100"

LISTENER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(128)
name = sys.argv[1].encode()
while True:
    c, _ = s.accept()
    try: c.sendall(name)
    except OSError: pass
    c.close()
"""

PROBER = r"""
import socket, sys, threading, time
vip, interval = sys.argv[1], float(sys.argv[2])
lock = threading.Lock()

def probe():
    got = "-"
    try:
        c = socket.create_connection((vip, 80), timeout=0.5)
        c.settimeout(0.5)
        got = c.recv(16).decode() or "empty"
        c.close()
    except OSError:
        pass
    with lock:
        print(f"{time.time():.4f} {got}", flush=True)

while True:  # a new connection every interval, whether or not the last one finished
    threading.Thread(target=probe, daemon=True).start()
    time.sleep(interval)
"""


class Prober:
    def __init__(self, netns: str, interval: float = 0.01):
        self.out = tempfile.NamedTemporaryFile("w+", prefix="prober-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-c", PROBER, VIP, str(interval)],
            stdout=self.out, stderr=subprocess.DEVNULL,
        )

    def results(self) -> list[tuple[float, str]]:
        with open(self.out.name) as f:
            rows = []
            for line in f:
                parts = line.split()
                if len(parts) == 2:
                    rows.append((float(parts[0]), parts[1]))
            return rows

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        os.unlink(self.out.name)


def current_answerer(prober: Prober) -> str | None:
    rows = prober.results()
    return rows[-1][1] if rows and rows[-1][1] != "-" else None


def one_run(cluster: Cluster, prober: Prober, how: int) -> tuple[float, float, int]:
    """Signal the holder; (seconds to first answer from the other node, outage, overlap samples)."""
    holder = wait_until(lambda: current_answerer(prober) if len(cluster.holders_of(VIP)) == 1 else None, 15)
    other = "n2" if holder == "n1" else "n1"
    with AddressSampler(list(cluster.nodes.values()), VIP) as sampler:
        sent = time.time()
        cluster[holder].daemon.signal(how)
        wait_until(lambda: any(t > sent and who == other for t, who in prober.results()), 15)
        time.sleep(0.1)
    rows = prober.results()
    first_other = min(t for t, who in rows if t > sent and who == other)
    last_old = max((t for t, who in rows if who == holder and t <= first_other), default=sent)
    cluster[holder].daemon.process.wait(10)
    cluster[holder].start()  # back as the standby
    time.sleep(0.5)
    return first_other - sent, first_other - last_old, len(sampler.overlaps())


def summary(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (f"{name:<28} min {min(ms):7.0f} ms   median {statistics.median(ms):7.0f} ms   "
            f"max {max(ms):7.0f} ms   (n={len(ms)})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--lock-ttl", type=int, default=3)
    parser.add_argument("--firewall", default="nft", choices=("nft", "legacy"))
    parser.add_argument("--signals", default="KILL,TERM", help="which cases to run, e.g. TERM")
    args = parser.parse_args()
    cases = [(label, how) for label, how in (("unplanned (SIGKILL)", signal.SIGKILL),
                                             ("planned (SIGTERM)", signal.SIGTERM))
             if how.name[3:] in args.signals.upper().split(",")]

    etcd = EtcdServer().start()
    lan = Lan()
    cluster = Cluster(lan, etcd, "/bench", args.firewall, ttl=args.lock_ttl)
    listeners = []
    prober = None
    try:
        for name, host in (("n1", 11), ("n2", 12)):
            node = cluster.add(name, host)
            listeners.append(subprocess.Popen(["ip", "netns", "exec", node.ns.name, sys.executable, "-c",
                                               LISTENER, name]))
        client = lan.add_node("client", "10.77.0.50/24")
        cluster.put_pods("hello", "web", [(1, "n1", "10.77.0.11"), (2, "n2", "10.77.0.12")])
        cluster.put_vip(VIP, vip_value("hello", "web", [{"src": "80", "dest": "8080"}]))
        cluster.start()
        prober = Prober(client.name)
        wait_until(lambda: current_answerer(prober), 15, message="the VIP answers")

        results = {}
        for label, how in cases:
            times, outages, overlaps = [], [], 0
            for i in range(args.runs):
                took, outage, overlap = one_run(cluster, prober, how)
                times.append(took)
                outages.append(outage)
                overlaps += overlap
                print(f"  {label} run {i + 1}: first answer from the new holder after {took * 1000:.0f} ms, "
                      f"outage {outage * 1000:.0f} ms, overlap samples {overlap}", flush=True)
            results[label] = (times, outages, overlaps)

        print(f"\nVIP failover, lock TTL {args.lock_ttl}s, firewall {args.firewall}, {args.runs} runs each, "
              f"a probe started every 10 ms (TCP connect through DNAT)")
        for label, (times, outages, overlaps) in results.items():
            print(summary(f"{label}: signal->answer", times))
            print(summary(f"{label}: outage", outages))
            print(f"{label}: samples with the VIP on both nodes: {overlaps}")
        return 0
    finally:
        if prober is not None:
            prober.close()
        cluster.close()
        for listener in listeners:
            listener.kill()
            listener.wait()
        lan.delete()
        etcd.destroy()


if __name__ == "__main__":
    sys.exit(main())
