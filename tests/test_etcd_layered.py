"""Snapshots' values without a whole copy per publish (networkd.etcd.layered)."""

from __future__ import annotations

import random

import pytest

from networkd.etcd import layered
from networkd.etcd.layered import Layered, LiveValues


@pytest.mark.parametrize("seed", range(5))
def test_every_published_mapping_stays_as_it_was(seed, monkeypatch):
    monkeypatch.setattr(layered, "SMALL", 16)  # layers from 16 keys on, so the test goes through them
    rng = random.Random(seed)
    live, truth, published = LiveValues(), {}, []
    live.replace({f"k{i}": "v0" for i in range(40)})
    truth.update({f"k{i}": "v0" for i in range(40)})
    for step in range(400):
        key = f"k{rng.randrange(60)}"
        if rng.random() < 0.3:
            live.delete(key)
            truth.pop(key, None)
        else:
            live.put(key, f"v{step}")
            truth[key] = f"v{step}"
        if rng.random() < 0.5:
            published.append((live.frozen(), dict(truth)))
        if rng.random() < 0.01:
            fresh = {f"k{i}": "whole" for i in range(rng.randrange(50))}
            live.replace(dict(fresh))
            truth = fresh
    for mapping, expected in published:
        assert dict(mapping) == expected and len(mapping) == len(expected) and sorted(mapping) == sorted(expected)
        for key in (f"k{i}" for i in range(60)):
            assert mapping.get(key) == expected.get(key) and (key in mapping) == (key in expected)
            if key not in expected:
                with pytest.raises(KeyError):
                    mapping[key]
    assert live.as_dict() == truth


def test_a_put_to_a_big_prefix_copies_the_changes_not_the_values():
    live = LiveValues()
    live.replace({f"d{i}.lain": "x" for i in range(40_000)})
    first = live.frozen()
    live.put("d1.lain", "y")
    second = live.frozen()
    live.delete("d2.lain")
    third = live.frozen()
    assert isinstance(second, Layered) and isinstance(third, Layered)
    assert second._base is third._base, "the 40,000 values are shared, not copied"
    assert len(third._top) == 2
    assert (first["d1.lain"], second["d1.lain"], len(second), len(third), "d2.lain" in third) == \
        ("x", "y", 40_000, 39_999, False)
