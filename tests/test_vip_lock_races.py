"""The lock keeper against a real etcd: a read-back answered after our own release (issue 10, item 4).

etcd answers calls on one connection in any order: a linearizable read waits for its read index
while a transaction goes through raft.  So a read-back of a lock sent before we released it may be
answered after the release: it must not adopt the lock again ("lost the lock" then "holding it" in
the same millisecond, seen in the fault runs).
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer, reactor

from networkd.etcd.client import EtcdClient
from networkd.etcd.lock import LeaseLocks
from networkd.etcd.session import Session
from networkd.keys import Keys
from networkd.options import parse_endpoints
from networkd.vips.locks import VERIFY_AFTER, LockKeeper
from networkd.vips.planner import FloatingPlan
from tests.support.logcapture import LogCapture
from tests.support.waiting import eventually, sleep

VIP = "10.0.0.5"


@pytest_twisted.ensureDeferred
async def test_a_read_back_answered_after_our_release_does_not_adopt_the_lock_again(etcd_server, etcd_root):
    keys = Keys(etcd_root)
    client = EtcdClient(parse_endpoints(etcd_server.endpoint), call_timeout=2.0)
    session = Session(client, ttl=5, reactor=reactor)
    locks = LeaseLocks(client)
    late = []  # (deferred handed to the keeper, etcd's answer): delivered when the test says
    read = locks.read

    def answered_late(key):
        handed = defer.Deferred()
        read(key).addBoth(lambda result: late.append((handed, result)))
        return handed

    locks.read = answered_late
    keeper = LockKeeper(locks=locks, keys=keys, hostname="n1", session=session, reactor=reactor,
                        changed=lambda: None, clear_host=lambda ip: defer.succeed(None))
    session.startService()
    try:
        await eventually(lambda: session.lease is not None, message="a lease")
        keeper.drive(FloatingPlan(campaign_now=frozenset({VIP})))
        await eventually(lambda: VIP in keeper.records, message="took the lock")
        lock = keys.vip_lock(VIP)
        assert etcd_server.get_prefix(lock) == {lock: "n1"}
        await sleep(VERIFY_AFTER + 0.1)
        with LogCapture() as logs:
            keeper.observe({}, revision=1)  # the watch has not shown it yet: read it back
            await eventually(lambda: late, message="etcd answered the read-back (still ours)")
            keeper.release(VIP, "rebalancing")
            await eventually(lambda: VIP not in keeper.records, message="released")
            assert etcd_server.get_prefix(lock) == {}
            handed, answer = late[0]
            handed.callback(answer)  # the read-back's answer arrives only now
            keeper.observe({}, revision=etcd_server.revision())  # and the watch catches up
        assert VIP not in keeper.records and VIP not in keeper.held(), "a released lock stays released"
        assert not logs.matching("holding it"), logs.lines
        assert not logs.at_level("warn", "error"), logs.lines
    finally:
        await session.stopService()
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_release_applied_late_does_not_delete_the_lock_we_took_again(etcd_server, etcd_root):
    """A release's delete whose call failed (its connection closed under it) may still reach etcd, after
    the retry released the lock and we took it again on the same lease: it must not delete that new lock.
    Deleted behind our back, the lock goes to another node while our watch may not have told us yet."""
    keys = Keys(etcd_root)
    client = EtcdClient(parse_endpoints(etcd_server.endpoint), call_timeout=2.0)
    session = Session(client, ttl=5, reactor=reactor)
    locks = LeaseLocks(client)
    release = locks.release
    stranded = []  # the first delete: its call failed here, etcd gets it only when the test says

    def first_call_cut(*args):
        if not stranded:
            stranded.append(args)
            return defer.fail(RuntimeError("etcd: call cancelled, its connection was closed"))
        return release(*args)

    locks.release = first_call_cut
    keeper = LockKeeper(locks=locks, keys=keys, hostname="n1", session=session, reactor=reactor,
                        changed=lambda: None, clear_host=lambda ip: defer.succeed(None))
    lock = keys.vip_lock(VIP)
    session.startService()
    try:
        await eventually(lambda: session.lease is not None, message="a lease")
        keeper.drive(FloatingPlan(campaign_now=frozenset({VIP})))
        await eventually(lambda: VIP in keeper.records, message="took the lock")
        with LogCapture():
            keeper.release(VIP, "rebalancing")
            await eventually(lambda: VIP not in keeper.records, message="released by the retry")
        assert stranded and etcd_server.get_prefix(lock) == {}
        keeper.drive(FloatingPlan(campaign_now=frozenset({VIP})))  # ours again, on the same lease
        await eventually(lambda: VIP in keeper.records, message="took the lock again")
        assert keeper.records[VIP].lease == session.lease
        await release(*stranded[0])  # the first delete reaches etcd only now
        assert etcd_server.get_prefix(lock) == {lock: "n1"}, "the lock we hold now was deleted"
    finally:
        await session.stopService()
        await client.close()
