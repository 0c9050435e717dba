"""The failsafe's rules on a fake clock (networkd.peers.failsafe): deadlines, refusals, the end, the retake.

The peer channel is replaced by a recorder; answers are handed in as the
channel would after verifying them.
"""

from __future__ import annotations

import json
import types

import pytest
from twisted.internet import task

from networkd.etcd.session import fencing_margin
from networkd.peers.failsafe import DRIFT, Failsafe
from networkd.peers.wire import Refused
from networkd.vips.fencing import Fencing
from networkd.vips.addresses import AddressKeeper
from networkd.vips.readiness import Readiness
from tests import test_vip_delays as delays
from networkd.vips.planner import FloatingPlan

P = 3.0
X, Y = "10.9.0.1", "10.9.0.2"


class Session:
    def __init__(self, clock, ttl=3):
        self.clock, self.lease, self.last_ack, self.last_error = clock, 0xA, clock.seconds(), None
        self.ttl, self.interval, self.bound = ttl, ttl * 2 / 9, ttl / 6

    def ack_age(self):
        return None if self.last_ack is None else self.clock.seconds() - self.last_ack


class Locks:
    def __init__(self):
        self.mine, self.in_flight = frozenset(), set()

    def held(self):
        return self.mine

    def campaigning(self, ip):
        return ip in self.in_flight


class Inputs:
    def __init__(self, peers: dict[str, str | None]):
        self.members = frozenset(peers) | {"me"}
        self.member_values = {n: json.dumps({"node_ip": "", "healthy": [], **({"peer": p} if p else {})})
                              for n, p in peers.items()}


class Env:
    def __init__(self, peers=None, secret=b"s", ttl=3):
        """The promise P is the TTL, as in the VIP manager (module P: a TTL of 3)."""
        self.clock = task.Clock()
        self.clock.advance(100)
        self.session, self.locks = Session(self.clock, ttl), Locks()
        self.moved = 0
        self.fs = Failsafe(reactor=self.clock, clock=self.clock.seconds, wall=lambda: 1e9, session=self.session,
                           locks=self.locks, inputs=Inputs({"a": "10.0.0.1:3010", "b": "10.0.0.2:3010"}
                                                           if peers is None else peers),
                           hostname="me", promise=float(ttl), secret=secret, listen=("127.0.0.1", 0),
                           changed=self.changed)
        self.fs.holding = lambda: frozenset({X})
        self.fs.lease_deadline = lambda: (None if self.session.last_ack is None
                                          else self.session.last_ack + ttl - fencing_margin(ttl))
        self.sent: list[tuple] = []
        if self.fs.channel is not None:
            self.fs.channel.send = self.send

    def changed(self):
        self.moved += 1

    def send(self, address, kind, **fields):
        nonce = f"n{len(self.sent)}"
        self.sent.append((address, kind, fields, nonce))
        return nonce

    def etcd_gone(self, after: float = 0.6):
        self.session.last_error = "etcd unreachable"
        self.clock.advance(after)

    def answer(self, nonce, member, kind="promise", **fields):
        granted = {"vips": [X], "seconds": self.fs.promise}
        return self.fs._received({"type": kind, "from": member, "nonce": "x" + nonce, "re": nonce,
                                  **(granted if kind == "promise" else {"why": "I can reach etcd"}),
                                  **fields}, ("10.0.0.9", 3010))

    def round(self):
        """The requests of the newest round: member IP -> nonce."""
        return {addr[0]: nonce for addr, kind, fields, nonce in self.sent[-2:]}


class Manager(Fencing):
    """The VIP manager's state that its fencing rules (networkd.vips.fencing) read, over an Env's failsafe."""

    def __init__(self, env, active, holders=None):
        self._session, self.failsafe, self._clock = env.session, env.fs, env.clock.seconds
        self.ttl, self.margin = env.session.ttl, fencing_margin(env.session.ttl)
        self.stopping, self.host_ready, self._active_ips = False, True, frozenset(active)
        self.inputs = types.SimpleNamespace(holders=holders or {ip: "me" for ip in active}, locks_revision=1)
        self.locks = types.SimpleNamespace(may_hold=lambda ip, lease, holders, revision: lease is not None)


def test_off_without_a_secret_changes_nothing():
    env = Env(secret=None)
    plan = FloatingPlan(campaign_now=frozenset({X}))
    assert not env.fs.enabled and env.fs.off_reason == "no --peer-secret-file"
    assert env.fs.filter(plan, frozenset()) is plan
    assert env.fs.deadline_with(5.0) == 5.0


def test_every_member_promised_moves_the_deadline_to_the_earliest_send_plus_promise():
    env = Env()
    env.clock.advance(P)  # past the start-up hold-off
    env.session.last_ack = env.clock.seconds()
    env.etcd_gone()
    env.fs._tick()
    sent_at = env.clock.seconds()
    assert {kind for _, kind, _, _ in env.sent} == {"promise?"} and len(env.sent) == 2
    assert env.sent[0][2] == {"vips": [X], "seconds": P}
    nonces = env.round()
    env.clock.advance(0.05)
    env.answer(nonces["10.0.0.1"], "a")
    assert env.fs.covering() is None, "one of two promises is not enough"
    env.answer(nonces["10.0.0.2"], "b")
    assert env.fs.covering() == pytest.approx(sent_at + P * DRIFT - fencing_margin(P))
    lease_deadline = env.fs.lease_deadline()
    assert env.fs.deadline_with(lease_deadline) == env.fs.covering() > lease_deadline
    assert env.fs.filter(FloatingPlan(campaign_now=frozenset({Y})), frozenset({X})) is None, "no campaign in failsafe"

    # The next round: b refuses -> that round moves nothing, even though a promised.
    before = env.fs.covering()
    env.clock.advance(P / 4)
    env.fs._tick()
    nonces = env.round()
    env.answer(nonces["10.0.0.1"], "a")
    env.answer(nonces["10.0.0.2"], "b", kind="refuse")
    assert env.fs.covering() == before
    assert env.fs.counters["promises_refused"] == 1

    # An answer from someone else than the asked member is refused.
    with pytest.raises(Refused, match="answer from 'c'"):
        env.answer(nonces["10.0.0.1"], "c")

    # Nothing more: the failsafe deadline passes and it ends.
    env.clock.advance(before - env.clock.seconds() + 0.01)
    env.fs._tick()
    assert env.fs.covering() is None and not env.fs.vips


def test_a_member_without_a_peer_address_can_never_complete_a_round():
    env = Env(peers={"a": "10.0.0.1:3010", "old": None})
    env.clock.advance(P)
    env.session.last_ack = env.clock.seconds()
    env.etcd_gone()
    env.fs._tick()
    assert len(env.sent) == 1
    env.answer(env.sent[0][3], "a")
    assert env.fs.covering() is None


def test_no_other_member_known_keeps_the_vips_vacuously():
    env = Env(peers={})
    env.clock.advance(P)
    env.session.last_ack = env.clock.seconds()
    env.etcd_gone()
    env.fs._tick()
    assert env.sent == [] and env.fs.covering() == pytest.approx(env.clock.seconds() + P * DRIFT - fencing_margin(P))


def outage_env():
    """Past the start-up hold-off, a keep-alive acknowledged just now, then etcd gone: the first round asks."""
    env = Env()
    env.clock.advance(P)
    env.session.last_ack = env.clock.seconds()
    env.etcd_gone()
    env.fs._tick()
    return env


def promised_env():
    env = outage_env()
    for ip, nonce in env.round().items():
        env.answer(nonce, {"10.0.0.1": "a", "10.0.0.2": "b"}[ip])
    assert env.fs.covering() is not None
    return env


def test_the_same_lease_acknowledged_ends_the_failsafe_and_no_lock_is_taken_while_a_promise_outlives_the_lease():
    env = promised_env()
    env.clock.advance(1.0)
    env.session.last_error, env.session.last_ack = None, env.clock.seconds() - 1.5  # an old keep-alive answered
    env.fs.acked(0xA)
    assert not env.fs.vips and env.fs.covering() is None and env.fs.counters["failsafe_ended"] == 1
    plan = FloatingPlan(campaign_now=frozenset({Y}))
    assert env.fs.filter(plan, frozenset()).campaign_now == frozenset(), "addresses may live past the lease"
    env.clock.advance(3)
    assert env.fs.filter(plan, frozenset()).campaign_now == {Y}


def test_a_new_lease_retakes_the_failsafe_vips_first_under_the_earlier_deadline():
    env = promised_env()
    covering = env.fs.covering()
    env.session.lease, env.session.last_ack, env.session.last_error = 0xB, env.clock.seconds(), None
    env.fs.acked(0xB)
    assert env.fs.retaking
    assert env.fs.deadline_with(env.clock.seconds() + 2.25) == min(covering, env.clock.seconds() + 2.25)
    plan = env.fs.filter(FloatingPlan(campaign_now=frozenset({Y}), release=frozenset({"10.9.0.3"})), frozenset())
    assert (plan.campaign_now, plan.release) == ({X}, frozenset())
    env.fs.settle(frozenset(), {X: None})
    assert env.fs.retaking, "not ours yet"
    env.fs.settle(frozenset({X}), {X: "me"})
    assert not env.fs.retaking and not env.fs.vips


def test_a_promiser_keeps_its_word_and_refuses_when_it_reaches_etcd_or_contests():
    env = Env()
    request = {"type": "promise?", "from": "h", "nonce": "r1", "vips": [X], "seconds": 60}
    assert env.fs._received(request, ("10.0.0.9", 3010))[1]["why"] == "I can reach etcd"
    env.etcd_gone()
    env.locks.in_flight = {X}
    assert env.fs._received(request, ("10.0.0.9", 3010))[1]["why"] == f"I am contesting {X}"
    env.locks.in_flight = set()
    kind, fields = env.fs._received(request, ("10.0.0.9", 3010))
    assert (kind, fields["seconds"]) == ("promise", P), "never longer than our own P (our hold-off)"
    plan = FloatingPlan(campaign_now=frozenset({X, Y}), campaign_later=frozenset({X}))
    env.clock.advance(P)  # past our own start-up hold-off; the promise was renewed just now
    env.fs._received({**request, "nonce": "r2"}, ("10.0.0.9", 3010))
    filtered = env.fs.filter(plan, frozenset())
    assert (filtered.campaign_now, filtered.campaign_later) == ({Y}, frozenset())
    assert env.fs.promises.blocked() == {X}
    env.clock.advance(P + 0.01)
    assert env.fs.promises.blocked() == frozenset()


def test_start_up_hold_off_contests_nothing_for_one_promise_length():
    env = Env()
    plan = FloatingPlan(campaign_now=frozenset({X}), campaign_later=frozenset({Y}))
    held_off = env.fs.filter(plan, frozenset())
    assert (held_off.campaign_now, held_off.campaign_later) == (frozenset(), frozenset())
    env.clock.advance(P)
    assert env.fs.filter(plan, frozenset()) == plan


def test_a_round_completed_after_the_lease_deadline_revives_nothing():
    env = outage_env()
    nonces = env.round()
    env.clock.advance(2.25)  # the lease deadline passed with no complete round
    env.answer(nonces["10.0.0.1"], "a")
    env.answer(nonces["10.0.0.2"], "b")
    assert env.fs.covering() is None
    env.fs._tick()
    assert not env.fs.vips, "the episode ends at the lease deadline"


def test_a_new_lease_without_a_promise_ends_the_episode():
    env = outage_env()
    assert env.fs.vips and env.fs.covering() is None
    env.session.lease, env.session.last_ack, env.session.last_error = 0xB, env.clock.seconds(), None
    env.fs.acked(0xB)
    assert not env.fs.vips and not env.fs.retaking


def test_a_member_whose_key_expired_before_the_outage_is_still_asked_and_nothing_is_kept_without_it():
    # b was cut from etcd longer than the TTL: its members key expired while we could reach etcd.  Then
    # the partition moves (we lose etcd, b regains it): b must still be asked, else it takes X after our
    # lease expires while we keep X on a vacuous round.
    env = Env(peers={"b": "10.0.0.2:3010"})
    env.clock.advance(P)
    env.fs._tick()
    env.fs._inputs.members, env.fs._inputs.member_values = frozenset({"me"}), {}  # b's members key expired
    env.clock.advance(10 * P)
    env.fs._tick()  # ticks while etcd is reachable do not forget b
    env.session.last_ack = env.clock.seconds()
    env.etcd_gone()
    for _ in range(100):
        env.fs._tick()
        env.clock.advance(P / 4)
        assert env.fs.covering() is None, "X kept although b never promised"
    assert env.sent and {address for address, *_ in env.sent} == {("10.0.0.2", 3010)}, "b asked"


def test_members_are_remembered_across_episodes():
    env = promised_env()
    env.fs.acked(0xA)  # the first episode ends
    env.fs._inputs.members, env.fs._inputs.member_values = frozenset({"me"}), {}
    env.session.last_ack = env.clock.seconds()
    env.etcd_gone()
    sent = len(env.sent)
    env.fs._tick()
    assert {address for address, *_ in env.sent[sent:]} == {("10.0.0.1", 3010), ("10.0.0.2", 3010)}
    assert env.fs.covering() is None


def test_every_promise_loses_at_least_the_kernels_late_expiry():
    # The kernel removes an expired address up to 0.25 s late even with one shared expiry (design.md,
    # "Kernel expiry"): the failsafe deadline must leave the whole fencing margin for that, like the lease's.
    env = outage_env()
    sent_at = env.clock.seconds()
    for ip, nonce in env.round().items():
        env.answer(nonce, {"10.0.0.1": "a", "10.0.0.2": "b"}[ip])
    earliest_promise_end = sent_at + P * DRIFT
    assert earliest_promise_end - env.fs.covering() >= fencing_margin(P) >= 0.5


def test_a_deadline_left_standing_after_the_episode_covers_only_the_episodes_vips():
    env = promised_env()  # X kept under promises
    env.clock.advance(1.0)
    env.session.last_error, env.session.last_ack = None, env.clock.seconds() - 1.5  # an old keep-alive answered
    env.fs.acked(0xA)
    manager = Manager(env, {X, Y})  # Y: its lock held on the same lease, active again now the episode ended
    just = manager._justification()
    assert just.deadline > manager._lease_deadline(), "the promises' deadline still stands"
    assert just.may_hold(X)
    assert not just.may_hold(Y), "Y's address would live past its lease on promises nobody gave for it"
    env.clock.advance(just.deadline - env.clock.seconds() + 0.01)
    env.session.last_ack = env.clock.seconds()
    just = manager._justification()
    assert just.deadline == manager._lease_deadline() and just.may_hold(Y)


def test_a_node_bound_by_a_promise_says_it_is_not_ready_to_receive():
    env = Env()
    env.clock.advance(P)  # past the start-up hold-off
    readiness = Readiness(env.clock, env.clock.seconds, object(),
                          types.SimpleNamespace(complete=True, member_ready={}), lambda: False,
                          types.SimpleNamespace(refresh_presence=lambda: None), types.SimpleNamespace(), lambda: None)
    readiness.holding_off = env.fs.holding_off  # as the VIP manager wires it
    assert readiness.ready()
    env.etcd_gone()
    request = {"type": "promise?", "from": "h", "nonce": "r1", "vips": [X], "seconds": P}
    assert env.fs._received(request, ("10.0.0.9", 3010))[0] == "promise"
    env.session.last_error, env.session.last_ack = None, env.clock.seconds()  # etcd back for us first
    env.clock.advance(P / 2)
    assert not readiness.ready(), "X released towards us would stay unheld: we promised not to contest it"
    env.clock.advance(P / 2 + 0.01)
    assert readiness.ready()


def test_the_hold_off_says_when_it_ends_start_up_then_a_promise():
    env = Env()
    assert env.fs.holding_off_until() == env.clock.seconds() + P, "the start-up hold-off"
    env.clock.advance(P)
    assert env.fs.holding_off_until() is None
    env.etcd_gone()
    request = {"type": "promise?", "from": "h", "nonce": "r2", "vips": [X], "seconds": P}
    assert env.fs._received(request, ("10.0.0.9", 3010))[0] == "promise"
    assert env.fs.holding_off_until() == pytest.approx(env.clock.seconds() + P), "bound by the promise"
    env.clock.advance(P + 0.01)
    assert env.fs.holding_off_until() is None and not env.fs.holding_off()


def test_the_audit_lets_a_retaken_vip_live_on_its_promises():
    # A TTL of 10: X placed under promises lives to D, past the deadline of the new lease when the
    # request that got it was sent before the newest round (etcd slow to answer after a thaw).  The
    # promises still cover X until D: the audit must not call that a violation and remove X.
    ttl = 10
    env = Env(ttl=ttl)
    env.clock.advance(ttl)  # past the start-up hold-off
    t0 = env.session.last_ack = env.clock.seconds()
    env.etcd_gone()
    manager = Manager(env, {X})
    kernel = delays.KernelModel(delays.Time(env.clock))
    keeper = AddressKeeper(reactor=env.clock, netlink=kernel, clock=env.clock.seconds,
                           justify=manager._justification, renew_ahead=2.0)
    keeper.want({X})
    for at in (0.6, 3.1, 5.6):  # complete rounds every P/4, X renewed when due
        env.clock.advance(t0 + at - env.clock.seconds())
        env.fs._tick()
        for ip, nonce in env.round().items():
            env.answer(nonce, {"10.0.0.1": "a", "10.0.0.2": "b"}[ip])
        keeper.pass_now()
    covering = env.fs.covering()
    assert kernel.expiry[X] > t0 + ttl - fencing_margin(ttl), "X placed past the old lease's deadline"
    env.clock.advance(0.4)
    env.session.lease, env.session.last_ack, env.session.last_error = 0xB, t0 + 1.0, None
    env.fs.acked(0xB)
    assert env.fs.retaking and manager.deadline() < kernel.expiry[X] <= covering
    keeper.audit()
    env.clock.advance(0.01)
    assert keeper.stats["violations"] == 0 and X in kernel.expiry, "X kept while its lock is retaken"
