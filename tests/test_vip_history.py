"""The per-VIP history behind /v1/vips and /metrics (issue 11 item 6)."""

from __future__ import annotations

import pytest
from twisted.internet import task

from networkd.vips.history import HISTORY, VipHistory, reason_kind
from tests.support.waiting import wait_until
from tests.test_vip_nodes import cluster_factory  # noqa: F401 (fixture)


@pytest.mark.parametrize("event, reason, kind", [
    ("acquired", "lock held on lease 91ea23492b9ac09", "lock held"),
    ("released", "unhealthy here (probe tcp://10.0.0.1:80: connection refused); a healthy candidate takes it",
     "unhealthy"),
    ("unhealthy", "probe tcp://10.0.0.1:80: connection refused", "unhealthy"),
    ("healthy", "probes answer", "healthy"),
    ("released", "rebalancing: this node holds 3 VIPs of a.web", "rebalancing"),
    ("released", "no local container", "no local container"),
    ("fenced", "etcd has not acknowledged our lease in time", "etcd has not acknowledged our lease in time"),
])
def test_reason_kinds_are_bounded_labels(event, reason, kind):
    assert reason_kind(event, reason) == kind


def test_transitions_counts_since_holders_and_seconds_unheld():
    clock, wall = task.Clock(), task.Clock()
    wall.advance(1_700_000_000)
    history = VipHistory(clock.seconds, wall.seconds)
    history.observe(["10.0.0.1", "10.0.0.2"], {"10.0.0.2": "n2"})
    started = wall.seconds()
    clock.advance(2.5)
    wall.advance(2.5)
    assert history.unheld_seconds() == {"10.0.0.1": 2.5, "10.0.0.2": 0.0}, "every floating VIP has a figure"
    assert history.holders == {"10.0.0.1": (None, started), "10.0.0.2": ("n2", started)}
    history.observe(["10.0.0.1", "10.0.0.2"], {"10.0.0.1": "n1"})
    clock.advance(1.0)
    wall.advance(1.0)
    history.observe(["10.0.0.1", "10.0.0.2"], {"10.0.0.1": "n1", "10.0.0.2": "n1"})
    assert history.unheld_seconds() == {"10.0.0.1": 2.5, "10.0.0.2": 1.0}
    assert history.holders == {"10.0.0.1": ("n1", started + 2.5), "10.0.0.2": ("n1", started + 3.5)}
    assert history.holder_changes == {"10.0.0.1": 1, "10.0.0.2": 2}, "n2 -> none -> n1"
    history.observe(["10.0.0.2"], {})  # 10.0.0.1's config is gone: its past stays, no open period
    clock.advance(1.0)
    assert history.unheld_seconds() == {"10.0.0.1": 2.5, "10.0.0.2": 2.0}
    assert set(history.holders) == {"10.0.0.2"}

    for n in range(HISTORY + 2):
        wall.advance(1)
        history.record("acquired" if n % 2 == 0 else "released", "10.0.0.1",
                       "lock held on lease 1" if n % 2 == 0 else "rebalancing: 2 VIPs")
    recent = history.recent("10.0.0.1")
    assert len(recent) == HISTORY and recent[-1] == {"at": "2023-11-14T22:13:35Z", "event": "released",
                                                     "reason": "rebalancing: 2 VIPs"}
    assert history.counts == {("acquired", "lock held"): 6, ("released", "rebalancing"): 6}
    assert history.since["10.0.0.1"] == wall.seconds()


def test_every_node_shows_each_vips_holder_since_changes_and_unheld_time(cluster_factory):
    """Issue 10 item 5, through the API of real daemons: the node that does not hold the VIP shows the
    cluster's holder from the lock snapshot, since when, how often it changed and the seconds unheld."""
    import json
    import signal
    import time

    from tests.test_vip_nodes import VIP, one_vip_on_two_nodes

    def api(node, path):
        return c[node].ns.run("curl", "-sf", f"http://127.0.0.1:3000{path}").stdout

    def entry(node):
        return next(e for e in json.loads(api(node, "/v1/vips")) if e.get("key") == VIP)

    c = cluster_factory()
    holder, other = one_vip_on_two_nodes(c)
    wait_until(lambda: entry(other)["holder"] == holder, 5, message="the other node sees the holder")
    seen = entry(other)
    assert not seen["held_by_me"] and seen["holder_since"] and seen["transitions"] == []
    assert seen["unheld_seconds"] < 5  # before anyone took it at start-up
    metrics = api(other, "/metrics")
    assert f'networkd_vip_holder{{holder="{holder}",vip="{VIP}"}} 1.0' in metrics, metrics
    assert f'networkd_vip_holder_since_timestamp_seconds{{vip="{VIP}"}}' in metrics
    assert f'networkd_vip_holder_changes_total{{vip="{VIP}"}}' in metrics
    assert f'networkd_vip_unheld_seconds_total{{vip="{VIP}"}}' in metrics

    before = seen["holder_changes"]
    killed = time.monotonic()
    c[holder].daemon.signal(signal.SIGKILL)  # its lock goes with its lease, then the other takes it
    wait_until(lambda: entry(other)["held_by_me"], TTL_WAIT, message="taken over")
    took = time.monotonic() - killed
    now = entry(other)
    assert now["holder"] == other and now["holder_changes"] >= before + 2, (seen, now)  # holder -> none -> other
    assert 0 < now["unheld_seconds"] - seen["unheld_seconds"] < took, (seen, now)
    assert now["holder_since"] >= seen["holder_since"]
    metrics = api(other, "/metrics")
    assert f'networkd_vip_holder{{holder="{other}",vip="{VIP}"}} 1.0' in metrics
    assert f'holder="{holder}"' not in metrics


TTL_WAIT = 8  # a SIGKILLed holder's lease expires within the TTL (3 s), then the other contests at once
