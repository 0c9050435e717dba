"""The address monitor's overlap sweep (tests/support/addrmonitor.py), from recorded events alone.

An address added and removed within one read of the monitor (the removal dated back to before
the add, so clamped to it) is an interval of no length.  The sweep ended intervals before it
started them at equal times, so such an interval removed its node before adding it, and the
node stayed "holding" the address for the rest of the record: every later holder of it was
reported as an overlap to the end of the run (bench/cluster.py saw node n11 "with four other
nodes' VIPs" this way, and n04 with five in the hunt's run; no daemon carried them).
"""

from __future__ import annotations

from tests.support.addrmonitor import AddressMonitor

IP = "10.78.4.10"


def recorded(*events):
    """A monitor that was never started, fed (time, node, ip, 'add'|'del') as its thread would."""
    monitor = AddressMonitor({}, {IP})
    for at, node, ip, what in events:
        monitor._apply(at, node, ip, what)
    monitor.ended_at = 100.0
    return monitor


def test_an_address_added_and_removed_within_one_read_is_no_overlap_with_a_later_holder():
    monitor = recorded((1.2, "n04", IP, "add"), (1.2, "n04", IP, "del"), (13.1, "n15", IP, "add"))
    assert monitor.overlaps() == []


def test_a_hand_over_at_one_instant_is_no_overlap_and_a_real_one_is_reported():
    handed = recorded((1.0, "n01", IP, "add"), (5.0, "n01", IP, "del"), (5.0, "n02", IP, "add"))
    assert handed.overlaps() == []
    both = recorded((1.0, "n01", IP, "add"), (4.0, "n02", IP, "add"), (5.0, "n01", IP, "del"))
    assert both.overlaps() == [(IP, ("n01", "n02"), 4.0, 5.0)]


def test_a_node_that_drops_and_takes_an_address_back_at_one_instant_still_holds_it():
    monitor = recorded((1.0, "n01", IP, "add"), (5.0, "n01", IP, "del"), (5.0, "n01", IP, "add"),
                       (6.0, "n02", IP, "add"), (7.0, "n02", IP, "del"))
    assert monitor.overlaps() == [(IP, ("n01", "n02"), 6.0, 7.0)]
