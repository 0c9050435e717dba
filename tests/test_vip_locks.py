"""The lock keeper: what we believe about each VIP lock, corrected from snapshots and reads (driven clock).

The case that matters most: a burst of lock writes makes the watch lag; a
lock we read back from etcd ourselves must not be thrown away by a snapshot
older than that read (seen with 1,000 VIPs: 950 locks "lost" and retaken,
VIPs down for a minute).
"""

from __future__ import annotations

from twisted.internet import defer, task

from networkd.etcd.client import KeyValue
from networkd.etcd.lock import LeaseLocks
from networkd.keys import Keys
from networkd.vips.locks import VERIFY_AFTER, LockKeeper
from networkd.vips.planner import FloatingPlan
from tests.support.fakeetcd import FakeSession

LEASE = 0x42
KEYS = Keys("/lain")


class Etcd:
    """put_if_absent / get on a dict, with a revision counter like etcd's.

    Not tests.support.fakeetcd.FakeEtcd: these tests turn on revisions (a read
    newer than a snapshot), which that one keeps at 1 for the reconciler tests.
    """

    def __init__(self):
        self.kv, self.revision = {}, 100

    def put_if_absent(self, key, value, lease):
        if key in self.kv:
            return defer.succeed(False)
        self.revision += 1
        self.kv[key] = KeyValue(key, value, self.revision, lease)
        return defer.succeed(True)

    def create_or_get(self, key, value, lease):
        if key in self.kv:
            return defer.succeed((False, self.kv[key]))
        self.revision += 1
        self.kv[key] = KeyValue(key, value, self.revision, lease)
        return defer.succeed((True, None))

    def get(self, key):
        return defer.succeed(self.kv.get(key))

    def get_prefix(self, prefix):
        return defer.succeed((self.revision, [kv for key, kv in sorted(self.kv.items()) if key.startswith(prefix)]))

    def delete_if_lease(self, key, lease, created=0):
        if key in self.kv and self.kv[key].lease == lease:
            self.revision += 1
            del self.kv[key]
            return defer.succeed(True)
        return defer.succeed(False)


def keeper():
    clock, etcd = task.Clock(), Etcd()
    changed = []
    k = LockKeeper(locks=LeaseLocks(etcd), keys=KEYS, hostname="n1", session=FakeSession(clock), reactor=clock,
                   changed=lambda: changed.append(1), clear_host=lambda ip: defer.succeed(None))
    return clock, etcd, k


def test_a_lock_read_back_survives_a_snapshot_older_than_the_read():
    clock, etcd, k = keeper()
    k.drive(FloatingPlan(campaign_now=frozenset({"10.0.0.5"})))
    assert k.held() == {"10.0.0.5"}
    created = etcd.revision
    k.observe({}, revision=created - 1)  # the watch has not caught up yet
    clock.advance(VERIFY_AFTER + 0.1)
    k.observe({}, revision=created - 1)  # still behind: the keeper reads the lock back
    clock.advance(0)
    assert k.records["10.0.0.5"].confirmed, "read back: ours on our lease"
    k.observe({}, revision=created - 1)  # an old snapshot again
    assert k.held() == {"10.0.0.5"}, "an older snapshot cannot say it was deleted"
    assert k.may_hold("10.0.0.5", LEASE, {}, created - 1)
    k.observe({"10.0.0.5": "n1"}, revision=created)
    assert k.held() == {"10.0.0.5"}


def test_a_snapshot_as_new_as_our_knowledge_does_say_it_is_gone():
    clock, etcd, k = keeper()
    k.drive(FloatingPlan(campaign_now=frozenset({"10.0.0.5"})))
    k.observe({"10.0.0.5": "n1"}, revision=etcd.revision)
    assert not k.may_hold("10.0.0.5", LEASE, {}, etcd.revision + 1), "deleted in the newest snapshot"
    k.observe({}, revision=etcd.revision + 1)
    assert k.held() == frozenset()
    k.observe({"10.0.0.6": "n2"}, revision=etcd.revision + 2)
    assert "10.0.0.6" not in k.held()


def test_a_lost_contest_is_not_sent_again_before_our_snapshot_shows_the_winner():
    """n2 took the lock at revision R; our watch lags (snapshots older than R say the VIP is free), and
    every pass in the meantime wants it: one request, not one per pass (20 nodes x 200 VIPs sent ~30,000
    futile ones, bench/cluster.py).  Once a snapshot as new as R came, we may ask again (it was freed)."""
    clock, etcd, k = keeper()
    key = KEYS.vip_lock("10.0.0.5").encode()
    etcd.put_if_absent(key, b"n2", 0x43)
    taken = etcd.revision
    sent = []
    for name in ("create_or_get", "put_if_absent"):  # either way of asking counts
        original = getattr(etcd, name)
        setattr(etcd, name, lambda *a, original=original: (sent.append(a[0]), original(*a))[1])
    for _ in range(10):  # passes kicked by other locks' events, all older than the winner
        k.observe({}, revision=taken - 1)
        k.drive(FloatingPlan(campaign_now=frozenset({"10.0.0.5"})))
        clock.advance(0.1)
    assert sent == [key], f"{len(sent)} requests for a lock we lost"
    k.observe({"10.0.0.5": "n2"}, revision=taken)  # the winner, in our snapshot
    etcd.delete_if_lease(key, 0x43)
    k.observe({}, revision=etcd.revision)  # and its release
    k.drive(FloatingPlan(campaign_now=frozenset({"10.0.0.5"})))
    assert len(sent) == 2 and k.held() == {"10.0.0.5"}, "free again: contested and taken"

    from networkd.vips.locks import BEATEN_FOR

    clock2, etcd2, k2 = keeper()  # a watch that never catches up: after BEATEN_FOR, asked again
    etcd2.put_if_absent(key, b"n2", 0x43)
    k2.observe({}, revision=1)
    k2.drive(FloatingPlan(campaign_now=frozenset({"10.0.0.5"})))
    assert k2.beaten("10.0.0.5")
    clock2.advance(BEATEN_FOR)
    assert not k2.beaten("10.0.0.5")


def test_a_vip_dealt_to_another_node_waits_a_lock_ttl_not_the_campaign_grace():
    """Free VIPs dealt out among the least loaded (networkd.vips.spread): one in another node's hand is
    ours to take only if it is still free after a lock TTL (that node is live; if it dies, its members
    key goes within a TTL); an ordinary 'later' one after the campaign grace, as before."""
    from networkd.vips.locks import CAMPAIGN_GRACE

    clock, etcd, k = keeper()
    plan = FloatingPlan(campaign_later=frozenset({"10.0.0.5", "10.0.0.6"}), dealt=frozenset({"10.0.0.5"}))
    k.drive(plan)
    clock.advance(CAMPAIGN_GRACE)
    k.drive(plan)
    assert k.held() == {"10.0.0.6"}, "the ordinary one after the grace, the dealt one not yet"
    clock.advance(k._session.ttl - CAMPAIGN_GRACE)
    k.drive(plan)
    assert k.held() == {"10.0.0.5", "10.0.0.6"}, "nobody took it within a TTL: ours"


def test_many_locks_are_read_back_with_one_range_read():
    clock, etcd, k = keeper()
    ips = {f"10.0.0.{i}" for i in range(1, 200)}
    k.drive(FloatingPlan(campaign_now=frozenset(ips)))
    reads = []
    original = etcd.get_prefix
    etcd.get_prefix = lambda prefix: (reads.append(prefix), original(prefix))[1]
    etcd.get = lambda key: (_ for _ in ()).throw(AssertionError("one read for all, not one per lock"))
    clock.advance(VERIFY_AFTER + 0.1)
    k.observe({}, revision=1)
    clock.advance(0)
    assert reads == [KEYS.vip_locks.encode()]
    assert all(k.records[ip].confirmed for ip in ips)


def test_a_lock_held_by_someone_else_in_a_newer_snapshot_is_lost():
    clock, etcd, k = keeper()
    k.drive(FloatingPlan(campaign_now=frozenset({"10.0.0.5"})))
    k.observe({"10.0.0.5": "n1"}, revision=etcd.revision)
    k.observe({"10.0.0.5": "n2"}, revision=etcd.revision + 5)
    assert k.held() == frozenset()


def test_a_release_whose_delete_failed_is_finished_never_undone():
    """The delete may have been applied though its answer was lost: the address must not come back."""
    clock, etcd, k = keeper()
    k.drive(FloatingPlan(campaign_now=frozenset({"10.0.0.5"})))
    k.observe({"10.0.0.5": "n1"}, revision=etcd.revision)
    applied_but_failed = []

    def delete_then_fail(key, lease, created=0):
        applied_but_failed.append(key)
        del etcd.kv[key]  # etcd applied it ...
        return defer.fail(TimeoutError())  # ... but the answer never came

    etcd.delete_if_lease = delete_then_fail
    k.release("10.0.0.5", "rebalancing")
    assert applied_but_failed and "10.0.0.5" in k.records
    k.observe({"10.0.0.5": "n1"}, revision=etcd.revision - 1)  # a lagging snapshot still names us
    assert not k.may_hold("10.0.0.5", LEASE, {"10.0.0.5": "n1"}, etcd.revision - 1), "never put back"
    del etcd.delete_if_lease  # etcd answers again
    clock.advance(0.5)
    assert "10.0.0.5" not in k.records and k.errors == {}, "the release was finished"


def test_our_own_release_seen_in_a_snapshot_first_is_no_lost_lock():
    """The watch may show our delete before its answer arrives: that is the release landing, not a loss."""
    from tests.support.logcapture import LogCapture

    clock, etcd, k = keeper()
    k.drive(FloatingPlan(campaign_now=frozenset({"10.0.0.5"})))
    k.observe({"10.0.0.5": "n1"}, revision=etcd.revision)
    answer = defer.Deferred()
    applied = etcd.delete_if_lease
    etcd.delete_if_lease = lambda key, lease, created=0: (applied(key, lease), answer)[1]  # applied, answer still on its way
    with LogCapture() as logs:
        k.release("10.0.0.5", "rebalancing")
        clock.advance(0)
        assert k.observe({}, revision=etcd.revision) is False, "nothing was lost"
        answer.callback(True)
        clock.advance(0)
    assert not logs.matching("lost the lock"), logs.lines
    assert logs.matching("VIP 10.0.0.5 released"), logs.lines
    assert "10.0.0.5" not in k.records and not k.errors


def test_members_value_writes_go_one_at_a_time_so_the_newest_wins():
    """Two writes of our members key in flight at once may be applied in either order by etcd;
    one at a time, the newest value is the one left (seen: a node stuck at "healthy for nothing")."""
    clock, etcd, k = keeper()
    writes = []  # (value, answer) in the order they were sent

    def put(key, value, lease):
        d = defer.Deferred()
        writes.append((value, d))
        return d

    etcd.put = put
    values = iter(['{"healthy": []}', '{"healthy": ["10.0.0.5"]}', '{"healthy": ["10.0.0.5", "10.0.0.6"]}'])
    current = [next(values)]
    k.presence_value = lambda: current[0]
    k.announce(LEASE, "10.1.1.1")
    current[0] = next(values)
    k.refresh_presence()
    current[0] = next(values)
    k.refresh_presence()
    assert [v for v, _ in writes] == [b'{"healthy": []}'], "the next write waits for the one in flight"
    writes[0][1].callback(7)
    assert [v for v, _ in writes][-1] == b'{"healthy": ["10.0.0.5", "10.0.0.6"]}', "then only the newest goes"
    assert len(writes) == 2
    writes[1][1].callback(8)
    k.refresh_presence()
    assert len(writes) == 2, "nothing new to write"


def test_our_release_seen_with_the_next_holders_lock_first_is_no_lost_lock():
    """The watch may show our delete and the next node's lock together, before our delete's answer."""
    from tests.support.logcapture import LogCapture

    clock, etcd, k = keeper()
    k.drive(FloatingPlan(campaign_now=frozenset({"10.0.0.5"})))
    k.observe({"10.0.0.5": "n1"}, revision=etcd.revision)
    answer = defer.Deferred()
    applied = etcd.delete_if_lease
    etcd.delete_if_lease = lambda key, lease, created=0: (applied(key, lease), answer)[1]
    with LogCapture() as logs:
        k.release("10.0.0.5", "rebalancing")
        etcd.put_if_absent("/lain/networkd/vips/10.0.0.5.lock", b"n2", 0x43)  # n2 takes it at once
        assert k.observe({"10.0.0.5": "n2"}, revision=etcd.revision) is False, "nothing was lost"
        answer.callback(False)  # "not ours any more": released all the same
        clock.advance(0)
    assert not logs.at_level("warn", "error"), logs.lines
    assert logs.matching("VIP 10.0.0.5 released (rebalancing)"), logs.lines
    assert "10.0.0.5" not in k.records and not k.errors


def test_a_lock_released_before_its_read_back_answered_is_not_called_lost():
    """Taken, not yet in the snapshot, read back, released meanwhile: the read-back's "gone" is our release."""
    from tests.support.logcapture import LogCapture

    clock, etcd, k = keeper()
    k.drive(FloatingPlan(campaign_now=frozenset({"10.0.0.5"})))
    answer = defer.Deferred()
    etcd.get = lambda key: answer
    clock.advance(VERIFY_AFTER + 0.1)
    k.observe({}, revision=1)  # the watch lags: read it back
    clock.advance(0)
    with LogCapture() as logs:
        release = defer.Deferred()
        applied = etcd.delete_if_lease
        etcd.delete_if_lease = lambda key, lease, created=0: (applied(key, lease), release)[1]
        k.release("10.0.0.5", "rebalancing")
        answer.callback(None)  # read after our delete: gone
        release.callback(True)
    assert not logs.at_level("warn", "error"), logs.lines
    assert "10.0.0.5" not in k.records


class Stalled(Etcd):
    """Lock requests answered only when the test says so, to count those in flight."""

    def __init__(self):
        super().__init__()
        self.pending: list[defer.Deferred] = []

    def create_or_get(self, key, value, lease):
        d = defer.Deferred()
        self.pending.append(d)
        return d


def test_a_burst_keeps_few_lock_requests_in_flight_and_a_failure_without_text_is_named_once():
    """1,000 VIPs to contest: at most MAX_IN_FLIGHT requests out; errors with an empty text (a cancelled
    call) are named by their type, one summary line for all, each VIP's error kept for the API."""
    from twisted.internet.defer import CancelledError

    from networkd.vips.contests import MAX_IN_FLIGHT, SUMMARY_EVERY
    from tests.support.logcapture import LogCapture

    clock, etcd = task.Clock(), Stalled()
    k = LockKeeper(locks=LeaseLocks(etcd), keys=KEYS, hostname="n1", session=FakeSession(clock), reactor=clock,
                   changed=lambda: None, clear_host=lambda ip: defer.succeed(None))
    ips = frozenset(f"10.1.{i // 250}.{i % 250 + 1}" for i in range(1000))
    with LogCapture() as logs:
        k.drive(FloatingPlan(campaign_now=ips))
        assert len(etcd.pending) == MAX_IN_FLIGHT
        assert all(k.campaigning(ip) for ip in ips), "waiting ones count as contested (no promise given for them)"
        for _ in range(3):
            etcd.pending.pop(0).errback(CancelledError())
        assert len(etcd.pending) == MAX_IN_FLIGHT, "each answer lets one more go"
        clock.advance(SUMMARY_EVERY)
    lines = logs.matching("could not contest")
    assert lines == [lines[0]] and "could not contest 3 VIPs (" in lines[0] and "cancelled" in lines[0], lines
    assert sorted(k.errors.values()) == ["lock: the call was cancelled"] * 3
    k.drive(FloatingPlan(campaign_now=frozenset(sorted(ips)[:10])))  # the newest plan wants 10 of them
    for d in list(etcd.pending):
        etcd.pending.remove(d)
        d.callback((True, None))
    while etcd.pending:
        etcd.pending.pop(0).callback((True, None))
    assert len(k.held()) <= MAX_IN_FLIGHT + 10, "the ones no longer wanted were not sent"
    assert not any(k.campaigning(ip) for ip in ips)


def test_describe_never_says_nothing():
    from twisted.internet.defer import CancelledError, TimeoutError as DeferredTimeout

    from networkd.vips.contests import describe

    assert describe(KeyError()) == "KeyError"
    assert describe(RuntimeError(""), "http://127.0.0.1:2379") == "RuntimeError from etcd http://127.0.0.1:2379"
    assert describe(CancelledError()) == "the call was cancelled"
    assert describe(DeferredTimeout(1.0, "Deferred")) == "no answer within 1s"
    assert describe(ValueError("bad\nmore")) == "bad"
