"""``/v1/vips`` with many VIP configs: each entry's cost must not grow with the number of VIPs (issue 13).

Counted, not timed: with 1,000 configs a walk of every VIP's history and of every
applied rule for each entry made one ~0.1 s reactor turn.
"""

from __future__ import annotations

import itertools
import json

from tests.support.vipnodes import pod_group, vip_value
from tests.test_vip_reconciler import node  # noqa: F401  (the fixture)


def test_entries_walk_the_history_once_not_once_per_vip(node, monkeypatch):  # noqa: F811
    vips = {f"10.78.0.{i}": vip_value(f"app{i}", "web", [{"src": "80", "proto": "tcp", "dest": "8080"}])
            for i in range(1, 41)}
    pods = {f"app{i}/app{i}.proc.web": pod_group(f"app{i}", "web", [(1, "n1", "10.9.0.1", f"172.20.0.{i}")])
            for i in range(1, 41)}
    node.publish(vips=vips, pods=pods, locks={"members/n1": "10.9.0.1", "10.78.0.1.lock": "elsewhere"})
    node.clock.advance(1)
    before = node.manager.status()
    calls = []
    history = node.manager.transitions.history
    real = history.unheld_seconds
    monkeypatch.setattr(history, "unheld_seconds", lambda *a, **k: calls.append(1) or real(*a, **k))
    after = node.manager.status()
    assert len(after) == 40 and len(calls) == 1, f"{len(calls)} walks of every VIP's history for 40 entries"
    assert json.dumps(after, sort_keys=True) == json.dumps(before, sort_keys=True)


def test_entries_are_made_a_piece_at_a_time_and_are_the_same(node):  # noqa: F811
    from networkd.api.vipstatus import each_vip_entry

    vips = {f"10.78.0.{i}": vip_value(f"app{i}", "web", [{"src": "80", "proto": "tcp", "dest": "8080"}])
            for i in range(1, 41)}
    vips["bad"] = "not json"
    pods = {f"app{i}/app{i}.proc.web": pod_group(f"app{i}", "web", [(1, "n1", "10.9.0.1", f"172.20.0.{i}")])
            for i in range(1, 41)}
    node.publish(vips=vips, pods=pods, locks={"members/n1": "10.9.0.1", "10.78.0.1.lock": "elsewhere"})
    node.clock.advance(1)
    entries, made, turns = each_vip_entry(node.manager), [], 0
    while piece := list(itertools.islice(entries, 10)):  # as the /v1/vips renderer takes them, a piece a turn
        made += piece
        turns += 1
    assert turns == 5, "40 entries, 10 a turn"
    assert json.dumps(made, sort_keys=True) == json.dumps(node.manager.status(), sort_keys=True)
    assert made[-1]["key"].endswith("/bad") and "error" in made[-1], "an invalid key comes last"
