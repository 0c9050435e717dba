#!/usr/bin/env python3
"""What ``GET /v1/vips`` and ``GET /metrics`` cost the reactor with 1,000 VIP configs (issue 13), in-process.

The VIP manager runs as in the daemon but with the recording host fakes of
the tests (tests/support/hostfakes.py: no kernel, no etcd) and a driven
clock: ``--configs`` floating VIP configs, ``--local`` of them on apps with a
container on this node, 10 per app.  Then, ``--repeat`` times: the entries'
JSON as the API wrote it before (``json.dumps(indent=2)``, the pure-Python
encoder, in one turn), the ``/v1/vips`` body as the API makes it now (entries
made and C-encoded 10 a piece, in 1 ms slices as the API runs them) on a first fetch and on the
next one a second later (each unchanged entry's text kept), ``/metrics`` by
``generate_latest`` in one turn and by the API's sliced renderer (per-VIP
families from plain rows) on a first and a next scrape.  Times are the
thread's CPU (the host may be busy); min / median / max over the repeats.

    .venv/bin/python bench/apivips.py --configs 1000 --local 100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from twisted.internet import defer, task  # noqa: E402

from networkd.api import metrics  # noqa: E402
from networkd.api.parts import ApiParts  # noqa: E402
from networkd.etcd.client import KeyValue  # noqa: E402
from networkd.keys import Keys  # noqa: E402
from networkd.vips.reconciler import VipManager  # noqa: E402
from tests.support.fakeetcd import FakeEtcd, FakeSession, Journal, Watchers  # noqa: E402
from tests.support.hostfakes import FakeArp, FakeBackend, FakeNetlink  # noqa: E402
from tests.support.vipnodes import pod_group, vip_value  # noqa: E402


class Etcd(FakeEtcd):
    """The tests' fake, with the range read the lock read-back uses for many locks at once."""

    def get_prefix(self, prefix: bytes, **_):
        return defer.succeed((1, [KeyValue(key, value, 1, lease or 0) for key, (value, lease) in self.kv.items()
                                  if key.startswith(prefix)]))


class Client:
    """What the metrics collector reads of the etcd client."""
    failovers = 0
    endpoint = "fake"


def build(configs: int, local: int):
    clock, journal, keys, watchers = task.Clock(), Journal(), Keys("/lain"), Watchers()
    manager = VipManager(
        reactor=clock, client=Etcd(journal), keys=keys, watch=watchers, session=FakeSession(clock),
        hostname="n1", interface="eth0", node_ip="10.9.0.1", firewall_backend=FakeBackend(journal),
        netlink=FakeNetlink(journal), announcer=FakeArp(journal), to_thread=defer.maybeDeferred)
    manager.startService()
    clock.advance(0)
    vips, pods, locks = {}, {}, {"members/n1": "10.9.0.1"}
    for i in range(configs):
        ip, app = f"10.78.{i // 250}.{i % 250 + 1}", f"app{i // 10:03d}"
        here = i * local // configs != (i + 1) * local // configs
        node = "n1" if here else "ghost"
        pods[f"{app}/{app}.proc.web"] = pod_group(app, "web", [(1, node, "10.9.0.1" if here else "10.9.0.99",
                                                                 f"172.20.{i // 250}.{i % 250 + 1}")])
        vips[ip] = vip_value(app, "web", [{"src": "80", "proto": "tcp", "dest": "8080"}])
        locks[f"{ip}.lock"] = node
    watchers.publish(keys.vips, vips)
    watchers.publish(keys.pod_groups, pods)
    watchers.publish(keys.vip_locks, locks)
    clock.advance(0)
    clock.advance(1)
    parts = ApiParts(reactor=clock, client=Client(), etcd_root="/lain", hostname="n1", node_ip="10.9.0.1",
                     dns_listen=None, vips=manager)
    return clock, manager, parts


def cpu(f):
    t0 = time.thread_time()
    result = f()
    return time.thread_time() - t0, result


def sliced(renderer, budget: float = 0.001):  # networkd/api/slices.py BUDGET
    """Run a renderer as networkd/api/slices.py does: (longest turn, all turns, body)."""
    longest = total = 0.0
    while True:
        t0 = time.thread_time()
        deadline = time.perf_counter() + budget
        try:
            while time.perf_counter() < deadline:
                next(renderer)
        except StopIteration as stop:
            took = time.thread_time() - t0
            return max(longest, took), total + took, b"".join(stop.value)
        took = time.thread_time() - t0
        longest, total = max(longest, took), total + took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=1000)
    parser.add_argument("--local", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    # (here, not at the top: bench/apistall.py imports build() with another checkout's networkd)
    from networkd.api.resources import _vips_renderer
    from networkd.api.vipstatus import EntryTexts, add_held_for, vip_entries

    clock, manager, parts = build(args.configs, args.local)
    print(f"{len(manager.status())} VIP entries, {manager.held_count()} held here")
    registry = metrics.make_registry(parts)
    texts, lines = EntryTexts(), {}
    rows: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        entries = add_held_for(vip_entries(manager), manager, clock.seconds())
        took, _ = cpu(lambda: json.dumps(entries, indent=2, sort_keys=True).encode() + b"\n")
        rows.setdefault("/v1/vips: JSON as before (indent=2, pure-Python encoder, one turn)", []).append(took)
        longest, total, body = sliced(_vips_renderer(manager, clock, EntryTexts()))
        rows.setdefault("/v1/vips: first fetch (every entry encoded), longest slice", []).append(longest)
        rows.setdefault("/v1/vips: first fetch, all slices", []).append(total)
        assert json.loads(body) == json.loads(json.dumps(entries)), "the body has the entries"
        sliced(_vips_renderer(manager, clock, texts))
        clock.advance(1)  # time moves (held_for, unheld_seconds), nothing else
        longest, total, body = sliced(_vips_renderer(manager, clock, texts))
        rows.setdefault("/v1/vips: next fetch (kept texts), longest slice", []).append(longest)
        rows.setdefault("/v1/vips: next fetch, all slices", []).append(total)
        took, old_text = cpu(lambda: metrics.render_metrics(registry))
        rows.setdefault("/metrics: generate_latest (one turn)", []).append(took)
        longest, total, text = sliced(metrics.metrics_renderer(registry))
        rows.setdefault("/metrics: first scrape, longest slice", []).append(longest)
        rows.setdefault("/metrics: first scrape, all slices", []).append(total)
        sliced(metrics.metrics_renderer(registry, lines))
        longest, total, text = sliced(metrics.metrics_renderer(registry, lines))
        rows.setdefault("/metrics: next scrape (kept labels), longest slice", []).append(longest)
        rows.setdefault("/metrics: next scrape, all slices", []).append(total)
        assert old_text == text, "the metrics are generate_latest's"
    print(f"/v1/vips body {len(body):,} bytes (indent=2 before: {len(json.dumps(entries, indent=2)) + 1:,}), "
          f"/metrics {len(text):,} bytes; CPU ms, min / median / max over {args.repeat}:")
    for label, values in rows.items():
        values.sort()
        print(f"  {label}: {values[0] * 1000:.1f} / {values[len(values) // 2] * 1000:.1f} / "
              f"{values[-1] * 1000:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
