"""What the decided stack weighs before networkd holds any data: the RSS floor.

Each step runs in a fresh interpreter that imports everything of the steps
before it plus its own modules, and prints its RSS (``VmRSS``, the figure
issue 13's targets are about: file pages of shared libraries count).  The
steps follow the stack: Python with asyncio (Twisted's reactor runs on it),
Twisted's core with twistd's runner, twisted.web (the API), grpc and aetcd
(etcd v3), prometheus_client, then networkd's own modules, every part enabled
(the etcd layer, DNS, resolv.conf guardian, VIPs, leader tasks, API).

    python bench/rss_floor.py [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEPS = [
    ("Python 3 (site, no imports)", []),
    ("+ asyncio (it imports ssl: libcrypto)", ["asyncio"]),
    ("+ Twisted core, asyncio reactor, twistd's runner", [
        "twisted.internet.asyncioreactor", "twisted.internet.defer", "twisted.internet.protocol",
        "twisted.application.service", "twisted.application.internet", "twisted.scripts.twistd",
        "twisted.logger", "twisted.python.usage"]),
    ("+ twisted.web (the HTTP API)", ["twisted.web.server", "twisted.web.resource"]),
    ("+ grpc", ["grpc"]),
    ("+ aetcd", ["aetcd"]),
    ("+ prometheus_client", ["prometheus_client"]),
    ("+ networkd, every part enabled (no data)", [
        "networkd.tap", "networkd.app", "networkd.etcd.client", "networkd.etcd.session",
        "networkd.etcd.reflector", "networkd.etcd.lock", "networkd.dns.service",
        "networkd.resolvconf", "networkd.vips.reconciler", "networkd.vips.health",
        "networkd.leader.election", "networkd.leader.tasks", "networkd.api", "networkd.api.parts",
        "networkd.systemd.service", "networkd.systemd.notify"]),
]

PROBE = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
        print(int(line.split()[1]))
"""


def rss_kb(modules: list[str]) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, *modules], cwd=REPO, check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
    return int(out.stdout.split()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    modules: list[str] = []
    previous = 0.0
    print(f"| step ({sys.version.split()[0]}) | RSS, median of {args.runs} (MB) | added (MB) |")
    print("|---|---|---|")
    for label, names in STEPS:
        modules += names
        mb = statistics.median(rss_kb(modules) for _ in range(args.runs)) / 1024
        print(f"| {label} | {mb:.1f} | {mb - previous:+.1f} |", flush=True)
        previous = mb
    return 0


if __name__ == "__main__":
    sys.exit(main())
