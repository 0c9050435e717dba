"""The per-VIP history behind /v1/vips and /metrics (issue 11 item 6)."""

from __future__ import annotations

import pytest
from twisted.internet import task

from networkd.vips.history import HISTORY, VipHistory, reason_kind


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


def test_transitions_counts_since_and_seconds_unheld():
    clock, wall = task.Clock(), task.Clock()
    wall.advance(1_700_000_000)
    history = VipHistory(clock.seconds, wall.seconds)
    history.observe(["10.0.0.1", "10.0.0.2"], {"10.0.0.2": "n2"})
    clock.advance(2.5)
    assert history.unheld_seconds() == {"10.0.0.1": 2.5}
    history.observe(["10.0.0.1", "10.0.0.2"], {"10.0.0.1": "n1"})
    clock.advance(1.0)
    history.observe(["10.0.0.1", "10.0.0.2"], {"10.0.0.1": "n1", "10.0.0.2": "n1"})
    assert history.unheld_seconds() == {"10.0.0.1": 2.5, "10.0.0.2": 1.0}
    history.observe(["10.0.0.2"], {})  # 10.0.0.1's config is gone: its past stays, no open period
    clock.advance(1.0)
    assert history.unheld_seconds() == {"10.0.0.1": 2.5, "10.0.0.2": 2.0}

    for n in range(HISTORY + 2):
        wall.advance(1)
        history.record("acquired" if n % 2 == 0 else "released", "10.0.0.1",
                       "lock held on lease 1" if n % 2 == 0 else "rebalancing: 2 VIPs")
    recent = history.recent("10.0.0.1")
    assert len(recent) == HISTORY and recent[-1] == {"at": "2023-11-14T22:13:32Z", "event": "released",
                                                     "reason": "rebalancing: 2 VIPs"}
    assert history.counts == {("acquired", "lock held"): 6, ("released", "rebalancing"): 6}
    assert history.since["10.0.0.1"] == wall.seconds()
