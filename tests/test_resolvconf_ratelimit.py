"""The guardian's rewrite limit on a driven clock: a burst, then one more as each leaves the window."""

from __future__ import annotations

from twisted.internet import task

from networkd.resolvconf.ratelimit import RewriteLimit


def test_a_burst_then_one_more_each_time_the_oldest_leaves_the_window():
    clock = task.Clock()
    limit = RewriteLimit(clock, burst=3, window=10.0)
    for _ in range(3):
        assert limit.wait() == 0.0
        limit.record()
        clock.advance(1)
    assert limit.wait() == 7.0 and limit.recent == 3, "the first rewrite (t=0) leaves the window at t=10"
    clock.advance(7)
    assert limit.wait() == 0.0 and limit.recent == 2


def test_being_held_back_is_said_once_per_window():
    clock = task.Clock()
    limit = RewriteLimit(clock, burst=1, window=10.0)
    assert limit.warn_now()
    clock.advance(9.9)
    assert not limit.warn_now()
    clock.advance(0.1)
    assert limit.warn_now()
