"""What the host side says and does when an address leaves or arrives, against the real kernel in a
namespace (issue 10, item 4): an expired lifetime is told apart from a removal by someone else, and
said to be expected (keep-alives late: the kernel fences first) or not (the lease was alive)."""

from __future__ import annotations

import time

import pytest
from twisted.internet import task

from networkd.vips import netlink as netlink_module
from networkd.vips.addresses import AddressKeeper, Justification
from tests.support.logcapture import LogCapture
from tests.support.waiting import wait_until

A, B = "10.66.3.1", "10.66.3.2"


@pytest.fixture
def in_namespace(privileged, monkeypatch):
    from tests.support.nlnamespace import netlink_namespace

    with netlink_namespace(monkeypatch, "ndhe") as ns:
        yield ns


def on_interface(ns) -> set[str]:
    out = ns.run("ip", "-o", "-4", "addr", "show", "dev", "eth0").stdout
    return {line.split()[3][:-3] for line in out.splitlines() if line.split()[3].endswith("/32")}


class Rig:
    """A keeper on the real kernel whose reactor never turns (as if held up): the test runs each pass
    and reads the netlink events itself; ``deadline`` is the lease deadline it is given."""

    def __init__(self, ns):
        self.ns = ns
        self.netlink = netlink_module.Netlink("eth0")
        self.netlink.start()
        self.events = netlink_module._EventReader(self.netlink, self.netlink.port)
        self.netlink.on_address_removed = lambda ip, left: self.keeper.vanished(ip, left)
        self.deadline = time.monotonic()
        self.removed: list[str] = []
        self.keeper = AddressKeeper(reactor=task.Clock(), netlink=self.netlink, clock=time.monotonic,
                                    renew_ahead=1.5, justify=lambda: Justification(self.deadline, lambda ip: True),
                                    on_removed=self.removed.append)

    def lease_for(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def hold(self, *ips: str) -> None:
        self.keeper.want(ips)
        self.keeper.pass_now()

    def until_gone(self, ip: str) -> None:
        wait_until(lambda: ip not in on_interface(self.ns), 3, interval=0.02, message=f"{ip} expired")
        time.sleep(0.02)
        self.events.doRead()

    def close(self) -> None:
        self.events.close()
        self.netlink.stop()


def test_expired_or_removed_by_hand_is_said_as_it_was(in_namespace):
    rig = Rig(in_namespace)
    try:
        with LogCapture() as by_hand:
            rig.lease_for(5.5)
            rig.hold(A)  # lifetime 5 s
            in_namespace.run("ip", "addr", "del", f"{A}/32", "dev", "eth0")
            time.sleep(0.05)
            rig.events.doRead()
        assert by_hand.matching(f"VIP {A} was removed from eth0 by someone else (5s of its lifetime left)"), \
            by_hand.lines

        with LogCapture() as alive:
            rig.lease_for(1.5)
            rig.hold(A)  # lifetime 1 s
            rig.lease_for(10)  # keep-alives acknowledged, but the keeper did not run to renew it
            rig.until_gone(A)
        assert alive.matching(f"VIP {A}: its kernel lifetime ran out though the lease allows"), alive.lines
        assert alive.at_level("warn") and not alive.matching("someone else"), alive.lines

        with LogCapture() as late:
            rig.lease_for(1.5)
            rig.hold(A, B)  # both get 1 s: the lease deadline allows no more
            rig.until_gone(A)
            rig.until_gone(B)
        assert len(late.matching("ran out")) == 2 and len(late.matching("expected, keep-alives are late")) == 2, \
            late.lines
        assert not late.at_level("warn", "error"), late.lines
        # every loss was reported (the API's transitions); A and B expire together, in either order
        assert rig.removed[:2] == [A, A] and sorted(rig.removed[2:]) == [A, B], rig.removed
    finally:
        rig.close()


def test_an_address_put_back_by_a_late_renewal_is_known_to_be_there(in_namespace):
    """The kernel takes the address, a keep-alive answer comes just after and the renewal makes it
    again, before the removal event is read: the event is old news, the address is there."""
    rig = Rig(in_namespace)
    try:
        rig.lease_for(1.5)
        rig.hold(A)
        wait_until(lambda: A not in on_interface(in_namespace), 3, interval=0.02, message="expired")
        with LogCapture() as logs:
            rig.lease_for(3.5)
            rig.keeper.pass_now()  # the renewal: the kernel adds it again
            assert A in on_interface(in_namespace)
            time.sleep(0.02)
            rig.events.doRead()  # the expiry's RTM_DELADDR, read only now
        assert A in rig.keeper.placed and A in on_interface(in_namespace) and rig.removed == []
        assert logs.matching("ran out just before a late renewal put it back"), logs.lines
        assert not logs.at_level("warn", "error"), logs.lines
    finally:
        rig.close()


class RecordingArp:
    """The announcer's interface, recording what would be sent (no frames leave the namespace's host)."""

    def __init__(self):
        self.sent, self.allowed = [], lambda ip: True

    def announce(self, ip):
        self.sent.append(ip)

    def cancel(self, ip):
        pass

    def cancel_all(self):
        pass


def test_no_gratuitous_arp_for_an_address_gone_before_it_went_out(in_namespace):
    """The lock of A is lost in the same reactor turn as its address went up (the snapshot saying so
    had already arrived): A lives a few milliseconds, and the LAN is not told it moved here."""
    from twisted.internet import defer

    from networkd.vips.host import VipHost

    clock, arp, wanted = task.Clock(), RecordingArp(), {A, B}
    deadline = time.monotonic() + 10
    host = VipHost(reactor=clock, interface="eth0", clock=time.monotonic,
                   justify=lambda: Justification(deadline, lambda ip: ip in wanted), renew_ahead=1.5,
                   managed=lambda: (A, B), desired_rules=frozenset, to_thread=defer.maybeDeferred,
                   netlink=netlink_module.Netlink("eth0", None, time.monotonic), announcer=arp)
    host.netlink.start()
    events = []
    host.on_change = lambda ip, added: events.append((ip, added))
    try:
        host.apply(frozenset({A, B}))
        up = time.monotonic()
        assert {a.ip for a in host.netlink.addresses()} == {A, B}
        wanted.discard(A)  # the lock of A is lost: what was already queued for this turn runs first
        host.apply(frozenset({B}))
        lived = time.monotonic() - up
        assert on_interface(in_namespace) == {B} and lived < 0.05, lived
        clock.advance(0)  # the next turn
        assert arp.sent == [B], "announced only what is still here"
        assert events == [(B, True)], "A was never acquired as far as anyone is told"
    finally:
        host.netlink.stop()
