"""Readiness (networkd.vips.readiness): what our members value says, and since when the others say ready."""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet.task import Clock

from networkd.vips.readiness import READY_HOLD, Readiness


class Watcher:
    def __init__(self):
        self.status = SimpleNamespace(connected=False)
        self.listeners = []

    def on_status(self, listener):
        self.listeners.append(listener)

    def set(self, connected):
        self.status.connected = connected
        for listener in self.listeners:
            listener(connected)


def make():
    clock, watcher = Clock(), Watcher()
    inputs = SimpleNamespace(complete=True, member_ready={})
    fenced = [False]
    refreshed, kicks = [], []
    health = SimpleNamespace()
    readiness = Readiness(clock, clock.seconds, watcher, inputs, lambda: fenced[0],
                          SimpleNamespace(refresh_presence=lambda: refreshed.append(health.ready())),
                          health, lambda: kicks.append(clock.seconds()))
    return readiness, clock, watcher, inputs, fenced, refreshed, kicks


def test_we_say_ready_only_with_a_live_lock_watch_complete_inputs_and_no_fencing():
    readiness, clock, watcher, inputs, fenced, refreshed, kicks = make()
    readiness.sync()
    assert refreshed == [False], "written once: not ready while the lock watch is down"
    watcher.set(True)
    assert kicks, "the watch coming back asks for a pass"
    readiness.sync()
    assert refreshed == [False, True]
    readiness.sync()
    assert refreshed == [False, True], "no rewrite while nothing changed"
    fenced[0] = True
    readiness.sync()
    inputs.complete = False
    fenced[0] = False
    readiness.sync()
    assert refreshed == [False, True, False], "fenced, then inputs incomplete: not ready"


def test_a_member_is_settled_after_saying_ready_without_a_break_for_the_hold():
    readiness, clock, watcher, inputs, fenced, refreshed, kicks = make()
    inputs.member_ready = {"old": None, "n2": True, "n3": False}
    readiness.sync()
    assert readiness.receivers() == ({"old"}, {"n3"}), "an older daemon is ready all along; n2 only now"
    clock.advance(READY_HOLD - 0.1)
    readiness.sync()
    assert readiness.settled() == {"old"}
    clock.advance(0.2)
    assert kicks, "a pass is asked for once n2 has been ready long enough"
    readiness.sync()
    assert readiness.settled() == {"old", "n2"}
    inputs.member_ready = {"old": None, "n2": False}  # n2 flaps: its clock starts again
    readiness.sync()
    inputs.member_ready = {"old": None, "n2": True}
    clock.advance(1)
    readiness.sync()
    clock.advance(1.5)
    readiness.sync()
    assert readiness.settled() == {"old"}, "ready again for 1.5 s only"
    inputs.member_ready = {"old": None}  # gone (lease expired) and back
    readiness.sync()
    inputs.member_ready = {"old": None, "n2": True}
    readiness.sync()
    clock.advance(READY_HOLD)
    readiness.sync()
    assert readiness.settled() == {"old", "n2"}


def test_a_hold_off_says_not_ready():
    readiness, clock, watcher, inputs, fenced, refreshed, kicks = make()
    watcher.set(True)
    readiness.holding_off = lambda: True
    assert readiness.ready() is False
    readiness.holding_off = lambda: False
    assert readiness.ready() is True


def test_a_pass_is_asked_for_when_our_hold_off_ends_so_we_say_ready_then():
    """A start-up hold-off or a promise makes us say "not ready"; when it ends, a pass at once rewrites our
    members value (not the next anti-entropy pass, up to 5 s later)."""
    readiness, clock, watcher, inputs, fenced, refreshed, kicks = make()
    watcher.set(True)
    held_until = [3.0]
    readiness.holding_off = lambda: clock.seconds() < held_until[0]
    readiness.holding_off_until = lambda: held_until[0] if clock.seconds() < held_until[0] else None
    readiness.sync()
    assert refreshed == [False], "holding off: not ready"
    kicks.clear()
    clock.advance(2.9)
    assert not kicks, "nothing to do before the hold-off ends"
    clock.advance(0.2)
    assert kicks, "a pass is asked for as the hold-off ends"
    readiness.sync()
    assert refreshed == [False, True], "ready again in that pass"


def test_with_the_lock_watch_down_we_contest_nothing_and_release_nothing_for_balance():
    """Our lock snapshot is stale while the watch is down: its free VIPs were mostly taken since (20 daemons
    on 2 cores, their connections dropped under a burst, contested ~2,000 of them) and its counts are old.
    A release for another reason (config deleted) does not come from it and stays."""
    from networkd.vips.planner import FloatingPlan

    readiness, clock, watcher, inputs, fenced, refreshed, kicks = make()
    plan = FloatingPlan(campaign_now=frozenset({"10.0.0.1"}), campaign_later=frozenset({"10.0.0.2"}),
                        keep=frozenset({"10.0.0.3"}), release=frozenset({"10.0.0.4", "10.0.0.5"}),
                        reasons={"10.0.0.4": "rebalancing: this node holds 3 VIPs of hello.web",
                                 "10.0.0.5": "config deleted"}, dealt=frozenset({"10.0.0.2"}))
    blind = readiness.blind(plan)
    assert (blind.campaign_now, blind.campaign_later, blind.dealt) == (set(), set(), set())
    assert blind.release == {"10.0.0.5"} and blind.keep == {"10.0.0.3", "10.0.0.4"}
    watcher.set(True)
    assert readiness.blind(plan) == plan, "the watch is live: the plan as it is"
