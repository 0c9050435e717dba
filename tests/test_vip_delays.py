"""The VIP host path under delay: a stale decision must never reach the kernel.

The rule (networkd.vips.addresses): the kernel's expiry of a held address
never lies after the deadline (last acknowledged keep-alive's send time +
TTL - margin), whatever happens between the decision and the kernel: a
stalled exchange (rtnl lock contention, preemption), a reactor blocked by
other work, a frozen process.

The first tests run the address keeper against a model of the kernel's
clock (an address expires ``lifetime`` seconds after the kernel *processed*
the request), on a driven clock, so every instant is exact.  The last one
runs a VipManager in this process against a real kernel, in a namespace,
blocks its reactor, and watches the address go with netlink.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from networkd.vips import rtnl
from networkd.vips.addresses import AddressKeeper, Justification
from tests.support.logcapture import LogCapture

TTL, MARGIN = 3, 0.75


class Time:
    """The keeper's clock: the driven reactor clock plus time lost inside exchanges."""

    def __init__(self, clock: task.Clock):
        self.clock = clock
        self.lost = 0.0

    def __call__(self) -> float:
        return self.clock.seconds() + self.lost


class KernelModel:
    """A stand-in for netlink that keeps each address's expiry as the kernel would.

    ``stalls``: seconds that pass inside each following exchange *before* the
    kernel handles it (popped one per exchange; then none).
    """

    def __init__(self, now: Time):
        self.now = now
        self.expiry: dict[str, float] = {}
        self.stalls: list[float] = []
        self.exchanges: list[tuple[float, list, list]] = []
        self.last_exchange = 0.0
        self.last_span = 0.0  # a stall comes before the kernel handles a batch, which it does at one instant

    def _expire(self) -> None:
        for ip in [ip for ip, at in self.expiry.items() if at <= self.now()]:
            del self.expiry[ip]

    def apply(self, removals, puts):
        started = self.now()
        if self.stalls:
            self.now.lost += self.stalls.pop(0)
        self._expire()
        processed = self.now()
        self.exchanges.append((processed, list(removals), list(puts)))
        results = {}
        for ip in removals:
            results[ip] = 0 if self.expiry.pop(ip, None) is not None else 99
        for ip, life in puts:
            self.expiry[ip] = processed + life
            results[ip] = 0
        self.last_exchange = self.now() - started
        return results

    def addresses(self):
        self._expire()
        return [rtnl.Address(ip, 32, 1, math.ceil(at - self.now()), 0, 0) for ip, at in self.expiry.items()]


class Lease:
    """What the reconciler would say: one deadline for all, every wanted address allowed."""

    def __init__(self, now: Time):
        self.now = now
        self.last_ack = now()
        self.alive = True

    def ack(self, sent: float | None = None) -> None:
        self.last_ack = self.now() if sent is None else sent

    @property
    def deadline(self) -> float:
        return self.last_ack + TTL - MARGIN

    def justify(self) -> Justification:
        if not self.alive or self.now() >= self.deadline:
            return Justification(None, lambda ip: False)
        return Justification(self.deadline, lambda ip: True)


@pytest.fixture
def rig():
    clock = task.Clock()
    now = Time(clock)
    kernel = KernelModel(now)
    lease = Lease(now)
    keeper = AddressKeeper(reactor=clock, netlink=kernel, clock=now, justify=lease.justify, renew_ahead=TTL / 3 + 0.5)

    class Rig:
        pass

    r = Rig()
    r.clock, r.now, r.kernel, r.lease, r.keeper = clock, now, kernel, lease, keeper

    def violations():
        """Every request the kernel handled whose expiry lies after the deadline in force then."""
        return r.checked

    r.checked = []
    original = kernel.apply

    def apply(removals, puts):
        results = original(removals, puts)
        processed = kernel.exchanges[-1][0]
        for ip, life in puts:
            if processed + life > lease.deadline:
                r.checked.append((ip, processed, life, lease.deadline))
        return results

    kernel.apply = apply
    r.violations = violations
    return r


def test_an_exchange_stalled_past_the_margin_is_put_right_at_once(rig):
    rig.keeper.want({"10.0.0.5"})
    rig.keeper.pass_now()
    assert rig.kernel.expiry == {"10.0.0.5": pytest.approx(2.0)}
    rig.clock.advance(1.0)
    rig.lease.ack()  # deadline 3.25
    rig.kernel.stalls = [1.0]  # the renewal waits 1 s for the rtnl lock: life 2 from t=2.0 would end at 4.0
    with LogCapture() as logs:
        rig.keeper.pass_now()
    assert logs.has("may keep")
    assert rig.kernel.expiry["10.0.0.5"] <= rig.lease.deadline, "renewed again with a lifetime from a fresh clock"
    processed, _, puts = rig.kernel.exchanges[-1]
    assert puts == [("10.0.0.5", 1)] and processed == pytest.approx(2.0)
    assert len(rig.violations()) == 1, "only the stalled exchange overran"


def test_exchanges_that_keep_stalling_end_in_removal(rig):
    rig.keeper.want({"10.0.0.5"})
    rig.keeper.pass_now()
    rig.clock.advance(1.0)
    rig.lease.ack()
    rig.kernel.stalls = [0.9] * 5  # each round gets a fresh, shorter lifetime, until none fits
    rig.keeper.pass_now()
    assert "10.0.0.5" not in rig.kernel.expiry and not rig.keeper.holds("10.0.0.5")
    assert all(processed < deadline for _, processed, _, deadline in rig.violations())


def test_a_pass_run_late_decides_with_the_clock_it_runs_at(rig):
    """A keep-alive sent at t=1 is handled only at t=2.9 (the reactor was blocked): no renewal."""
    rig.keeper.want({"10.0.0.5"})
    rig.keeper.pass_now()
    rig.now.lost = 2.9  # blocked: nothing ran
    rig.lease.ack(sent=1.0)  # deadline 3.25, 0.25 s away: no whole second fits
    rig.keeper.pass_now()
    assert rig.violations() == []
    assert [puts for _, _, puts in rig.kernel.exchanges[1:]] == [], "nothing renewed"
    assert rig.kernel.addresses() == [], "its lifetime (from t=0) ran out at t=2 as set"


def test_late_keep_alives_the_address_lives_until_just_before_the_deadline(rig):
    """Whole-second lifetimes would drop it up to a second early; one top-up keeps it to the deadline."""
    rig.keeper.want({"10.0.0.5"})
    rig.keeper.pass_now()  # at t=0: lifetime 2, the deadline is 2.25
    rig.clock.pump([0.01] * 220)  # no acknowledged keep-alive since
    assert rig.violations() == []
    assert rig.kernel.expiry["10.0.0.5"] == pytest.approx(2.18, abs=0.02), "topped up to just before 2.25"
    assert len(rig.kernel.exchanges) == 2, "one extra request, no more"
    rig.clock.pump([0.01] * 10)
    assert "10.0.0.5" not in rig.kernel.expiry and not rig.keeper.holds("10.0.0.5"), "gone by the deadline"


def test_fencing_at_the_deadline_needs_no_other_timer(rig):
    rig.keeper.want({"10.0.0.5"})
    rig.keeper.pass_now()
    rig.kernel.expiry["10.0.0.5"] = 99  # as if the kernel kept it longer: only we can remove it now
    rig.clock.advance(2.2)
    assert rig.keeper.holds("10.0.0.5")
    rig.clock.advance(0.06)
    assert not rig.keeper.holds("10.0.0.5") and "10.0.0.5" not in rig.kernel.expiry


def test_no_backlog_renewals_only_when_needed_one_batch_per_keep_alive(rig):
    ips = {f"10.0.{i // 250}.{i % 250 + 1}" for i in range(1000)}
    rig.keeper.want(ips)
    rig.keeper.pass_now()
    for second in range(1, 31):
        for _ in range(10):  # reconcile passes, kicks: they must add no work
            rig.clock.advance(0.1)
            rig.keeper.pass_now()
        rig.lease.ack()
        rig.keeper.pass_now()
        assert set(rig.kernel.expiry) == ips, f"all held at {second}s"
    assert rig.violations() == []
    puts = [len(puts) for _, _, puts in rig.kernel.exchanges if puts]
    assert len(puts) <= 31 and sum(puts) <= 1000 * 31, "one renewal per address per keep-alive at most"


def keep_alives_for_30s(rig, *, interval: float, renew_ahead: float, ahead: float, seed: int):
    """A keeper holding 100 addresses, keep-alives sent every ``interval`` for 30 s and acknowledged 1-40 ms
    later, each starting a pass with ``ahead``: (the keeper, its passes as (when, by a keep-alive))."""
    import random

    rng = random.Random(seed)
    keeper = AddressKeeper(reactor=rig.clock, netlink=rig.kernel, clock=rig.now, justify=rig.lease.justify,
                           renew_ahead=renew_ahead)
    ips = {f"10.0.0.{i}" for i in range(1, 101)}
    keeper.want(ips)
    rig.clock.advance(0)
    passes = []
    original = keeper._pass

    def counted(ahead=0.0):
        passes.append((rig.now(), ahead > 0))
        original(ahead)

    keeper._pass = counted

    def ack(sent):
        rig.lease.ack(sent)
        keeper.pass_now(ahead=ahead)
        assert set(rig.kernel.expiry) == ips, f"all held at {rig.now():.2f}s"

    for k in range(int(30 / interval)):
        rig.clock.callLater(k * interval + rng.uniform(0.001, 0.04), ack, k * interval)
    rig.clock.pump([0.005] * 6000)
    return keeper, passes


def test_at_rest_renewals_ride_on_keep_alive_passes_no_timer_pass_of_their_own(rig):
    """Keep-alives every TTL/6 (0.5 s), acknowledged 1-40 ms after they are sent.  Each pass plans
    every address, so a renewal falls due in the keep-alive pass (not in a timer pass of its own a
    few ms later, as when the keep-alive pass found it not quite due); with no acknowledgement the
    timers still top up and fence by themselves."""
    # renew_ahead as the reconciler set it for TTL 3 (interval + 0.5), ahead half a keep-alive interval
    keeper, passes = keep_alives_for_30s(rig, interval=0.5, renew_ahead=1.0, ahead=0.25, seed=11)
    at_rest = [(t, by_ack) for t, by_ack in passes if 2.0 <= t <= 29.9]
    timer_passes = [round(t, 3) for t, by_ack in at_rest if not by_ack]
    assert timer_passes == [], f"{len(timer_passes)} timer passes beside {len(at_rest) - len(timer_passes)} " \
                               f"keep-alive passes: {timer_passes[:8]}"
    renewals = [t for t, _, puts in rig.kernel.exchanges if puts and 2.0 <= t <= 29.9]
    assert 24 <= len(renewals) <= 29, f"about one renewal a second: {len(renewals)}"
    assert rig.violations() == []
    rig.clock.pump([0.01] * 300)  # the keep-alives stop: the timers top up, then fence at the deadline
    assert not keeper.placed and not rig.kernel.expiry and rig.violations() == []
    last_ack = 29.5
    tops = [t for t, _, puts in rig.kernel.exchanges if puts and t > 30.0]
    assert tops and all(t <= last_ack + TTL - MARGIN for t in tops), "topped up by a timer"


def test_at_the_daemons_cadence_renewals_come_every_other_keep_alive_and_no_timer_pass(rig):
    """Keep-alives every 2/9 of the TTL (0.67 s at TTL 3), acknowledged 1-40 ms after they are sent, the
    keeper set as the reconciler sets it: a 2 s lifetime renewed at one acknowledgement has 1.33 s left at
    the next, which leaves it alone, and is renewed at the one after (it was renewed at every one: 1.5
    netlink batches of every held address a second); no timer pass of its own at rest; when the
    keep-alives stop, the timers keep it to just before the deadline and fence there."""
    from networkd.vips.reconciler import renewal_lead

    interval = TTL * 2 / 9
    keeper, passes = keep_alives_for_30s(rig, interval=interval, renew_ahead=renewal_lead(interval), ahead=interval,
                                         seed=7)  # as the reconciler sets them
    at_rest = [(t, by_ack) for t, by_ack in passes if 2.0 <= t <= 29.9]
    assert [round(t, 3) for t, by_ack in at_rest if not by_ack] == [], "no timer pass at rest"
    renewals = [t for t, _, puts in rig.kernel.exchanges if puts and 2.0 <= t <= 29.9]
    keep_alives = len(at_rest)
    assert keep_alives // 2 - 1 <= len(renewals) <= keep_alives // 2 + 1, \
        f"{len(renewals)} renewals for {keep_alives} keep-alives"
    assert rig.violations() == []
    last_ack = (int(30 / interval) - 1) * interval
    rig.clock.pump([0.01] * 300)  # the keep-alives stop: the timers top up, then fence at the deadline
    assert not keeper.placed and not rig.kernel.expiry and rig.violations() == []
    tops = [t for t, _, puts in rig.kernel.exchanges if puts and t > last_ack + 0.1]
    assert tops and all(t <= last_ack + TTL - MARGIN for t in tops), "topped up by a timer"
    lapsed = max(t for t, removals, puts in rig.kernel.exchanges if puts)
    assert lapsed >= last_ack + TTL - MARGIN - 1.1, "the last top-up keeps it to about a second before the deadline"


def test_long_ttl_renews_every_other_keep_alive(rig):
    """TTL 30: lifetime 22 s, keep-alives every 10 s: a renewal is needed only every 20 s."""
    global TTL, MARGIN
    saved = TTL, MARGIN
    TTL, MARGIN = 30, 7.5
    try:
        rig.keeper.renew_ahead = 1.5  # as the reconciler sets it
        rig.lease.ack()
        rig.keeper.want({"10.0.0.5"})
        rig.keeper.pass_now()
        for _ in range(12):
            rig.clock.pump([0.5] * 20)
            rig.lease.ack()
            rig.keeper.pass_now()
            assert rig.keeper.holds("10.0.0.5") and rig.kernel.addresses()
        renewals = sum(len(puts) for _, _, puts in rig.kernel.exchanges[1:])
        assert 5 <= renewals <= 7 and rig.violations() == []
        assert rig.keeper.holds("10.0.0.5") and "10.0.0.5" in rig.kernel.expiry
    finally:
        TTL, MARGIN = saved


def test_audit_removes_what_lives_too_long_and_restores_what_vanished(rig):
    rig.keeper._managed = lambda: {"10.0.0.5", "10.0.0.6", "10.0.0.7"}
    rig.keeper.want({"10.0.0.5", "10.0.0.6"})
    rig.keeper.pass_now()
    rig.kernel.expiry["10.0.0.5"] = rig.now() + 60  # someone re-added it with a long lifetime
    del rig.kernel.expiry["10.0.0.6"]  # someone removed it
    rig.kernel.expiry["10.0.0.7"] = rig.now() + 1  # a leftover we do not hold
    with LogCapture() as logs:
        rig.keeper.audit()
        rig.clock.advance(0.01)
    assert logs.has("past the lease deadline"), "a violation is an error in the log"
    assert rig.keeper.stats["violations"] == 1
    assert "10.0.0.7" not in rig.kernel.expiry
    assert rig.kernel.expiry["10.0.0.5"] <= rig.lease.deadline, "removed, then put back with a lawful lifetime"
    assert rig.kernel.expiry["10.0.0.6"] <= rig.lease.deadline, "put back"


def test_removal_waiters_fire_when_the_kernel_confirmed(rig):
    rig.keeper.want({"10.0.0.5"})
    rig.keeper.pass_now()
    fired = []
    rig.keeper.removed("10.0.0.5").addCallback(fired.append)
    assert not fired
    rig.keeper.want(set())
    rig.clock.advance(0)
    assert fired == [None] and "10.0.0.5" not in rig.kernel.expiry


# -- a real kernel, a real reactor ------------------------------------------------------

VIP = "10.66.0.5"


class MonotonicSession:
    """A lease session whose acknowledgements the test gives (on the monotonic clock)."""

    ttl = TTL
    interval = 1.0  # the test acknowledges about once a second
    bound = TTL / 6

    def __init__(self):
        self.clock = time.monotonic
        self.lease = 0x42
        self.last_ack = self.clock()
        self.acks, self.losses = [], []

    def ack_age(self):
        return self.clock() - self.last_ack

    def on_ack(self, cb):
        self.acks.append(cb)

    def on_lost(self, cb):
        self.losses.append(cb)

    def on_reconnect(self, cb):
        pass

    def ack(self):
        self.last_ack = self.clock()
        for cb in self.acks:
            cb(self.lease)


class Removals:
    """RTM_DELADDR times inside a namespace (of ``ip``, or of every address), from a netlink socket read
    in a thread: ``times`` for ``ip``, ``first[ip]`` for each address removed."""

    def __init__(self, netns: str, ip: str | None = None):
        import socket
        import threading

        from tests.support.vipnodes import in_netns

        self.ip, self.times, self.first = ip, [], {}
        self._sock = in_netns(netns, lambda: self._open(socket))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _open(socket):
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        s.bind((0, rtnl.RTMGRP_IPV4_IFADDR))
        s.settimeout(0.05)
        return s

    def _run(self):
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except OSError:
                continue
            for message in rtnl.messages(data):
                address = rtnl.parse_address(message) if message.type == rtnl.RTM_DELADDR else None
                if address is None or (self.ip is not None and address.ip != self.ip):
                    continue
                now = time.monotonic()
                self.first.setdefault(address.ip, now)
                if address.ip == self.ip:
                    self.times.append(now)

    def close(self):
        self._stop.set()
        self._thread.join(1)
        self._sock.close()


@pytest.fixture
def host(privileged, monkeypatch):
    """A VipManager in this process whose netlink sockets live in a namespace of the test's own."""
    from tests.support.nlnamespace import netlink_namespace

    with netlink_namespace(monkeypatch, "nddl") as ns:
        yield from _host_in(ns)


def _host_in(ns):
    from networkd.keys import Keys
    from networkd.vips.reconciler import VipManager
    from tests.support.hostfakes import FakeArp, FakeBackend
    from tests.support.vipnodes import pod_group
    from tests.test_vip_reconciler import FakeEtcd, Journal, Watchers

    manager = None
    try:
        journal, keys, watchers, session = Journal(), Keys("/lain"), Watchers(), MonotonicSession()
        manager = VipManager(
            reactor=reactor, client=FakeEtcd(journal), keys=keys, watch=watchers, session=session,
            hostname="n1", interface="eth0", node_ip="10.66.0.1", firewall_backend=FakeBackend(journal),
            announcer=FakeArp(journal), to_thread=defer.maybeDeferred,
        )
        manager.startService()
        watchers.publish(keys.vips, {VIP: json.dumps({"app": "hello", "proc": "web", "ports": [{"src": 80}]})})
        watchers.publish(keys.pod_groups, {"hello/hello.proc.web": pod_group(
            "hello", "web", [(1, "n1", "10.66.0.1", "172.20.0.5")])})
        watchers.publish(keys.vip_locks, {"members/n1": "10.66.0.1"})

        class Host:
            pass

        h = Host()
        h.ns, h.manager, h.session, h.watchers, h.keys = ns, manager, session, watchers, keys
        yield h
    finally:
        if manager is not None and manager.running:
            pytest_twisted.blockon(manager.stopService())


def on_interface(ns) -> bool:
    return f"{VIP}/32" in ns.run("ip", "-o", "-4", "addr", "show", "dev", "eth0").stdout


@pytest_twisted.ensureDeferred
async def test_real_kernel_stalled_renewal_then_frozen_reactor_address_gone_before_lease_deadline(host):
    from tests.support.waiting import eventually, sleep

    await eventually(lambda: host.manager.held_count() == 1, 3, message="took the VIP")
    host.watchers.publish(host.keys.vip_locks, {"members/n1": "10.66.0.1", f"{VIP}.lock": "n1"})
    for _ in range(3):  # held and renewed normally
        await sleep(0.5)
        host.session.ack()
    assert on_interface(host.ns)

    real_apply = host.manager.netlink.apply
    stalled = []

    def apply_after_a_stall(removals, puts):
        if puts and not stalled:
            stalled.append(time.monotonic())
            time.sleep(1.0)  # the rtnl lock is busy for longer than the margin: the kernel sees it late
        return real_apply(removals, puts)

    host.manager.netlink.apply = apply_after_a_stall
    removals = Removals(host.ns.name, VIP)
    try:
        with LogCapture() as logs:
            await sleep(0.6)
            host.session.ack()  # a renewal is due: it stalls inside the exchange
            acked = host.session.last_ack
            assert stalled, "the renewal went through the stalled exchange"
            time.sleep(TTL + 1)  # then the whole reactor freezes: only the kernel can remove it
        assert logs.has("may keep")
        assert removals.times, "the kernel removed the address"
        gone = removals.times[0] - acked
        # Nominal expiry by acked + TTL - margin; the kernel's expiry timer may add up to ~0.25 s.
        assert gone < TTL, f"gone {gone:.2f}s after the last acknowledged keep-alive, lease deadline {TTL}s"
    finally:
        removals.close()


@pytest.fixture
def busy_cpu():
    """Pins this process to one CPU kept busy by a spinning child, as on a loaded node.

    The kernel's address expiry timer is deferrable: on an idle CPU it waits for the next wake-up
    (docs/design.md, "Kernel expiry"); on a busy one it runs on time, which is what is tested here."""
    import os
    import subprocess
    import sys

    before = os.sched_getaffinity(0)
    cpu = min(before)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(spinner.pid, {cpu})
        os.sched_setaffinity(0, {cpu})
        yield cpu
    finally:
        os.sched_setaffinity(0, before)
        spinner.kill()
        spinner.wait()


def test_real_kernel_removes_addresses_placed_at_different_times_when_their_lifetimes_end(privileged, monkeypatch,
                                                                                          busy_cpu):
    """The kernel's expiry timer never runs sooner than a second after its previous run: a VIP added
    half a second after another, then left alone (a frozen daemon), must still go by the lifetime the
    keeper counted on, give or take the timer's rounding, not a second later."""
    from networkd.vips.netlink import Netlink
    from tests.support.nlnamespace import netlink_namespace

    with netlink_namespace(monkeypatch, "ndal") as ns:
        netlink = Netlink("eth0", reactor=None)
        netlink.start()
        removals = Removals(ns.name)
        try:
            acked = time.monotonic()
            deadline = acked + 2.5
            keeper = AddressKeeper(reactor=task.Clock(), netlink=netlink, clock=time.monotonic, renew_ahead=1.5,
                                   justify=lambda: Justification(deadline, lambda ip: True))
            keeper.want({"10.66.1.1"})
            keeper.pass_now()  # lifetime 2 s
            time.sleep(0.5)
            keeper.want({"10.66.1.1", "10.66.1.2"})
            keeper.pass_now()  # the new one gets 1 s
            promised = dict(keeper.placed)
            # From here on nothing runs the keeper (its reactor never turns): only the kernel removes.
            time.sleep(3.0)
            assert set(removals.first) == set(promised), f"removed: {removals.first}, placed: {promised}"
            late = {ip: round(removals.first[ip] - promised[ip], 3) for ip in promised}
            # The timer rounds up to a whole second when that is under 0.25 s away.
            assert all(lateness <= 0.3 for lateness in late.values()), f"seconds after the lifetime ended: {late}"
            assert all(removals.first[ip] <= deadline for ip in promised), "an address outlived the deadline"
        finally:
            removals.close()
            netlink.stop()
