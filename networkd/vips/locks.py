"""The etcd locks of this node's floating VIPs: one record per VIP, on the process lease.

A lock is ``<root>/networkd/vips/<ip>.lock`` = hostname, created only if
absent, attached to the lease of the session (networkd.etcd.session) and
released only while still on it (networkd.etcd.lock).  This module keeps
what we believe about each lock and corrects it from the lock snapshot:

* a lock we took is *confirmed* once the snapshot shows it; one that the
  snapshot never shows is read back from etcd after ``VERIFY_AFTER``;
* a confirmed lock the snapshot shows deleted or held by another node is
  lost at once, and so is every lock when the lease changes;
* a lock the snapshot shows as ours that we do not know is read back: ours
  on this lease (adopted) or a previous process's (left to expire).

Release is host first: ``clear_host(ip)`` must have removed the address and
its rules before the lock is deleted, or another node could add the address
while we still carry it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable, Mapping

from twisted.internet import defer
from twisted.logger import Logger

from networkd.etcd.lock import LeaseLocks
from networkd.vips.contests import FailureSummary, Throttle, describe
from networkd.vips.planner import MEMBERS

log = Logger()

VERIFY_AFTER = 1.0  # a lock not seen in the snapshot this long after we took it is read back
BEATEN_FOR = 5.0  # at most this long, a lost contest is not sent again before our snapshot shows the winner
CAMPAIGN_GRACE = 1.0  # a node that is not the least loaded waits this long for a free VIP
# ... and this many lock TTLs for one dealt to another least loaded node (networkd.vips.spread): that node is
# live and takes it at once; if it fails, its members key goes within a TTL and the VIP is dealt again.
# 20 busy daemons on 2 cores, whose lock snapshots lagged 1-2 s behind a burst, each contested the ~100
# VIPs still free in theirs after 1 s: 7,400 lock transactions, every daemon's keep-alive late.
DEALT_GRACE_TTLS = 1.0
STOP_TIMEOUT = 1.0  # each etcd call on the way out
RELEASE_RETRY = 0.5  # seconds between attempts to delete a lock we are releasing
# A lock that went with its holder's lease (expired or revoked: the lock and the holder's members key
# deleted at one etcd revision) is taken, but its address is added only this long after we saw it go.
# The old holder's kernel drops the address by its own fencing deadline, a margin (TTL/4) before etcd
# can expire the lease; yet on a CPU-starved node the kernel's expiry ran more than that margin late
# (two holders for 0.01 s in tests/test_vip_starvation.py).  A lock its holder deleted itself (a move,
# a stop: the address went first) is used at once.
EXPIRY_GRACE = 0.3


@dataclass
class LockRecord:
    lease: int  # the lease the lock is on
    acquired_at: float
    confirmed: bool = False  # seen in the lock snapshot, or read back from etcd
    releasing: bool = False
    revision: int = 0  # we know it was ours at this etcd revision: an older snapshot cannot say otherwise
    reason: str = ""  # why we release it
    created: int = 0  # the lock's create revision, when known: a release deletes only this incarnation
    usable_at: float = 0.0  # the address may go on the host from then on (EXPIRY_GRACE)


class LockKeeper:
    def __init__(self, *, locks: LeaseLocks, keys, hostname: str, session, reactor,
                 changed: Callable[[], None], clear_host: Callable[[str], Awaitable]):
        self._locks = locks
        self._keys = keys
        self.hostname = hostname
        self._session = session
        self._reactor = reactor
        self._changed = changed
        self._clear_host = clear_host
        self.records: dict[str, LockRecord] = {}
        self.later: dict[str, float] = {}  # ip -> when to contest it anyway
        self.errors: dict[str, str] = {}  # ip -> last error
        self._campaigning: set[str] = set()  # sent or waiting their turn (networkd.vips.contests)
        # ip -> (revision of the lock that beat us, when): not asked again while our snapshot is older
        self._beaten: dict[str, tuple[int, float]] = {}
        self._snapshot_revision = 0
        self._throttle = Throttle()
        self._contest_failures = FailureSummary(reactor, "contest")
        self._verified_at: dict[str, float] = {}
        self._to_verify: set[str] = set()
        self._verify_call = None
        self._ours_in_snapshot: set[str] = set()
        self._seen_holders: Mapping[str, str] = {}  # the lock snapshot's holders at the previous observe
        self._expired: dict[str, float] = {}  # ip -> when we saw its lock go with its holder's lease
        self._news = 0  # counts changes to our records: a read-back sent before one of its IP's is stale
        self._news_of: dict[str, int] = {}  # ip -> the count at its newest change
        self._presence_key = f"{keys.vip_locks}{MEMBERS}{hostname}"
        self._announced: int | None = None
        self._announced_value: str | None = None
        self._presence_writing = False  # one members write at a time: etcd may apply two in either order
        self._presence_next: tuple[int, str] | None = None  # the newest value waiting for it
        self.presence_value: Callable[[], str] | None = None  # our members value (default: the node IP)
        self.stopping = False

    # -- views ---------------------------------------------------------------

    def held(self) -> frozenset[str]:
        """IPs whose lock we hold on the current lease (releasing ones included)."""
        lease = self._session.lease
        return frozenset(ip for ip, r in self.records.items() if lease is not None and r.lease == lease)

    def may_hold(self, ip: str, lease: int, holders, revision: int) -> bool:
        """The address of ``ip`` may be on the host: the lock is ours on ``lease``, not leaving,
        and the newest snapshot (at ``revision``) does not say it is gone (until the next pass drops it)."""
        record = self.records.get(ip)
        if record is None or record.lease != lease or record.releasing:
            return False
        if record.usable_at > self._reactor.seconds():
            return False  # its previous holder's lease expired a moment ago (EXPIRY_GRACE)
        return not record.confirmed or revision < record.revision or holders.get(ip) == self.hostname

    def campaigning(self, ip: str) -> bool:
        """A lock request for ``ip`` is in flight or waiting its turn (it may still make us the holder)."""
        return ip in self._campaigning

    def releasing(self, ip: str) -> bool:
        record = self.records.get(ip)
        return record is not None and record.releasing

    def in_flight(self) -> bool:
        """A lock request, read-back or release is under way or waiting its turn: its answer (or its
        failure, which kicks nothing) may leave something for the next pass to do."""
        return bool(self._campaigning or self._to_verify or self._verify_call is not None
                    or any(r.releasing for r in self.records.values()))

    def unsettled(self) -> bool:
        """A lock we took that the snapshot has not shown yet, or one of ours we do not know."""
        return (any(not r.confirmed for r in self.records.values())
                or not self._ours_in_snapshot <= self.records.keys() or bool(self.later))

    # -- the snapshot ----------------------------------------------------------

    def observe(self, holders, revision: int, members: frozenset[str] | None = None,
                deleted: Mapping[str, int] | None = None) -> bool:
        """Correct what we believe from the lock snapshot (ip -> holder, at ``revision``; ``members``:
        the live daemons in it; ``deleted``: its keys deleted since the one before, at which revision).

        A snapshot older than what we read from etcd ourselves (the watch lags
        behind a burst of writes) neither confirms nor contradicts it.
        """
        if members is not None:
            self._note_expiries(holders, members, deleted)
        self._ours_in_snapshot = {ip for ip, holder in holders.items() if holder == self.hostname}
        self._snapshot_revision = max(self._snapshot_revision, revision)
        for ip in [ip for ip, (beaten, _) in self._beaten.items() if beaten <= revision]:
            del self._beaten[ip]  # our snapshot shows the winner (or what came after it)
        if self.stopping:
            return False  # our own releases on the way out are no news
        lease = self._session.lease
        now = self._reactor.seconds()
        lost_any = False
        for ip, record in list(self.records.items()):
            holder = holders.get(ip)
            lost = None
            if record.lease != lease:
                lost = "lease changed"
            elif holder == self.hostname:
                record.confirmed = True
                record.revision = max(record.revision, revision)
            elif record.confirmed and revision >= record.revision:
                lost = "lock deleted" if holder is None else f"lock now held by {holder}"
            elif not record.confirmed and now - record.acquired_at > VERIFY_AFTER:
                self._verify(ip)  # not seen in the snapshot yet: ask etcd
            if lost and record.releasing and record.lease == lease:
                # Our own delete, seen in the watch before its answer (maybe with the next holder's
                # lock after it): the release landed, nothing was lost.
                log.info("VIP {ip} released ({why})", ip=ip, why=record.reason)
                self._forget(ip)
            elif lost:
                log.warn("lost the lock of VIP {ip}: {why}", ip=ip, why=lost)
                self._forget(ip)
                lost_any = True
        if lease is not None:
            for ip in self._ours_in_snapshot - self.records.keys():
                self._verify(ip)  # ours on this lease (adopt), or a previous process's (wait)
        return lost_any

    def _note_expiries(self, holders, members: frozenset[str], deleted: Mapping[str, int] | None) -> None:
        """Locks gone since the previous snapshot with their holder's lease (EXPIRY_GRACE): deleted at
        the very revision that deleted its members key.  A holder that stops releases its locks, then
        revokes its lease: other revisions.  After a full read (``deleted`` None) a lock gone with its
        holder's members key counts as expired.  Each snapshot is a new mapping: a pass that sees the
        same one again compares nothing."""
        seen = self._seen_holders
        if holders is seen:
            return
        now = self._reactor.seconds()
        for ip in [ip for ip, at in self._expired.items() if now - at > EXPIRY_GRACE]:
            del self._expired[ip]
        for ip, holder in seen.items():
            if holder == self.hostname or ip in holders:
                continue
            if deleted is None:
                expired = holder not in members
            else:
                at = deleted.get(f"{ip}.lock")
                expired = at is not None and at == deleted.get(MEMBERS + holder)
            if expired:
                self._expired[ip] = now
        self._seen_holders = holders

    def _forget(self, ip: str) -> None:
        self.records.pop(ip, None)
        self._changed_record(ip)

    def _changed_record(self, ip: str) -> None:
        self._news += 1
        self._news_of[ip] = self._news

    def lease_lost(self) -> None:
        if self.records:
            log.warn("lease lost: the locks of {ips} are gone", ips=", ".join(sorted(self.records)))
        self.records.clear()
        self._announced = None

    # -- presence: members/<hostname> on the lease, so balancing counts live daemons only --

    def announce(self, lease: int, node_ip: str | None) -> bool:
        """Write our presence key on ``lease`` unless done (True: it was not, e.g. a new lease)."""
        if lease == self._announced:
            return False
        self._announced = lease
        self._put_presence(lease, self.presence_value() if self.presence_value else node_ip or "")
        return True

    def refresh_presence(self) -> None:
        """Write our members value again if it changed (e.g. what we are a healthy candidate for)."""
        lease = self._session.lease
        if self.presence_value is None or lease is None or lease != self._announced or self.stopping:
            return
        value = self.presence_value()
        if value != self._announced_value:
            self._put_presence(lease, value)

    def _put_presence(self, lease: int, value: str) -> None:
        self._announced_value = value
        if self._presence_writing:
            self._presence_next = (lease, value)  # replaces any older waiting value
            return
        self._presence_writing = True

        def failed(failure):
            if self._announced == lease:
                self._announced = self._announced_value = None  # try again on the next ack
            log.warn("could not announce presence: {e}", e=describe(failure, self._locks.endpoint))

        def done(_):
            self._presence_writing = False
            waiting, self._presence_next = self._presence_next, None
            if waiting is not None and waiting[0] == self._announced and not self.stopping:
                self._put_presence(*waiting)

        self._locks.announce(self._presence_key, value, lease).addErrback(failed).addBoth(done)

    def withdraw_presence(self) -> defer.Deferred:
        lease = self._session.lease
        if lease is None:
            return defer.succeed(None)
        return self._locks.withdraw(self._presence_key, lease).addTimeout(STOP_TIMEOUT, self._reactor)

    # -- acting on a plan ------------------------------------------------------

    def drive(self, plan) -> None:
        """Release, contest now, contest after the grace period (networkd.vips.planner.FloatingPlan)."""
        for ip in plan.release:
            self.release(ip, plan.reasons.get(ip, ""))
        now = self._reactor.seconds()
        wanted = set(plan.campaign_now)
        dealt_grace = max(CAMPAIGN_GRACE, DEALT_GRACE_TTLS * getattr(self._session, "ttl", 0))
        for ip in plan.campaign_later:
            if now >= self.later.setdefault(ip, now + (dealt_grace if ip in plan.dealt else CAMPAIGN_GRACE)):
                wanted.add(ip)
        for ip in list(self.later):
            if ip not in plan.campaign_later:
                del self.later[ip]
        for ip in self._throttle.drop_waiting(wanted.__contains__):  # not sent yet, no longer wanted
            self._campaigning.discard(ip)
        for ip in plan.campaign_now:
            self._campaign(ip)
        for ip in plan.campaign_later:
            if ip in wanted:
                self._campaign(ip)

    def beaten(self, ip: str) -> bool:
        """We lost a contest for ``ip`` to a lock our snapshot does not show yet: asking again would lose
        again (20 nodes x 200 VIPs sent ~30,000 such requests while their watches lagged)."""
        beaten = self._beaten.get(ip)
        if beaten is None:
            return False
        if beaten[0] > self._snapshot_revision and self._reactor.seconds() - beaten[1] < BEATEN_FOR:
            return True
        del self._beaten[ip]
        return False

    def _campaign(self, ip: str) -> None:
        """Ask for ``ip``'s lock, when one of the few request slots is free (networkd.vips.contests)."""
        if ip in self._campaigning or ip in self.records or self._session.lease is None or self.beaten(ip):
            return
        self._campaigning.add(ip)
        self._throttle.submit(ip, lambda: self._send_campaign(ip))

    def _send_campaign(self, ip: str):
        lease = self._session.lease
        if ip not in self._campaigning or ip in self.records or lease is None or self.stopping or self.beaten(ip):
            self._campaigning.discard(ip)
            return None
        key = self._keys.vip_lock(ip)

        def done(answer):
            created, there = answer
            self._campaigning.discard(ip)
            if not created:
                if there is not None:
                    self._beaten[ip] = (there.mod_revision, self._reactor.seconds())
                return
            incarnation = getattr(there, "create_revision", 0) if there is not None else 0
            now = self._reactor.seconds()
            expired = self._expired.get(ip)
            usable_at = expired + EXPIRY_GRACE if expired is not None else 0.0
            self.records[ip] = LockRecord(lease, now, created=incarnation, usable_at=usable_at)
            if usable_at > now:
                log.info("VIP {ip}: its previous holder's lease expired {s:.2f}s ago; the address goes on "
                         "in {w:.2f}s", ip=ip, s=now - expired, w=usable_at - now)
                self._reactor.callLater(usable_at - now, self._changed)  # a pass then puts it on
            self._changed_record(ip)
            self.later.pop(ip, None)
            self.errors.pop(ip, None)
            log.info("took the lock of VIP {ip} on lease {lease:x}", ip=ip, lease=lease)
            if self.stopping:
                self._locks.release(key, lease, incarnation).addErrback(
                    lambda f: log.warn("could not release VIP {ip} on the way out: {e}", ip=ip, e=describe(f)))
            self._changed()

        def failed(failure):
            self._campaigning.discard(ip)
            reason = describe(failure, self._locks.endpoint)
            self.errors[ip] = f"lock: {reason}"
            self._contest_failures.add(ip, reason)  # one line per reason per second, not one per VIP

        return self._locks.contest(key, self.hostname, lease).addCallbacks(done, failed)

    def _verify(self, ip: str) -> None:
        """Queue a read-back of ``ip``'s lock (rate-limited per IP); one read serves all queued."""
        now = self._reactor.seconds()
        if self._session.lease is None or now - self._verified_at.get(ip, -1e9) < VERIFY_AFTER:
            return
        self._verified_at[ip] = now
        self._to_verify.add(ip)
        if self._verify_call is None:
            self._verify_call = self._reactor.callLater(0, self._verify_queued)

    def _verify_queued(self) -> None:
        """Is each queued lock on our current lease?  One key read, or one range read for many."""
        self._verify_call = None
        ips, self._to_verify = sorted(self._to_verify), set()
        lease, asked = self._session.lease, self._news
        if lease is None or not ips:
            return
        if len(ips) == 1:
            read = self._locks.read(self._keys.vip_lock(ips[0])).addCallback(lambda kv: {ips[0]: kv})
        else:
            read = self._locks.read_prefix(self._keys.vip_locks).addCallback(
                lambda result: {ip: kv for kv in result[1] for ip in [self._lock_ip(kv.key)] if ip in ips})

        def got(found):
            if lease != self._session.lease or self.stopping:
                return
            for ip in ips:
                if self._news_of.get(ip, 0) <= asked:  # else we took or let go of it meanwhile: stale
                    self._read_back(ip, found.get(ip), lease)
            self._changed()

        def failed(failure):
            log.warn("could not read the locks of VIPs {ips} back: {e}", ips=", ".join(ips),
                     e=describe(failure, self._locks.endpoint))

        read.addCallbacks(got, failed)

    def _lock_ip(self, key: bytes) -> str | None:
        name = key.decode(errors="replace")[len(self._keys.vip_locks):]
        return name[: -len(".lock")] if name.endswith(".lock") and "/" not in name else None

    def _read_back(self, ip: str, kv, lease: int) -> None:
        record = self.records.get(ip)
        if kv is not None and kv.lease == lease and kv.value.decode(errors="replace") == self.hostname:
            if record is None:
                log.info("the lock of VIP {ip} is on our lease {lease:x}: holding it", ip=ip, lease=lease)
                record = self.records[ip] = LockRecord(lease, self._reactor.seconds())
                self.errors.pop(ip, None)  # e.g. a request cancelled after etcd applied it: ours after all
            record.created = getattr(kv, "create_revision", 0) or record.created  # etcd's word is the newest
            record.confirmed = True
            record.revision = max(record.revision, kv.mod_revision)
        elif record is not None and not record.confirmed and not record.releasing:
            log.warn("lost the lock of VIP {ip}: {why}", ip=ip,
                     why="it is gone" if kv is None else "it is on another lease")
            self._forget(ip)

    def release(self, ip: str, reason: str) -> None:
        """Host first, then the lock (guarded by our lease).

        Once begun, a release is finished, never undone: a delete that failed
        may still have been applied (a timeout, a lost answer), and the next
        holder may already carry the address.  So the record stays
        "releasing" (nothing goes back on the host) and the delete is tried
        again until it succeeds or the lease is gone.
        """
        record = self.records.get(ip)
        if record is None or record.releasing:
            return
        record.releasing, record.reason = True, reason
        self._changed_record(ip)
        log.info("releasing VIP {ip}: {why}", ip=ip, why=reason)
        defer.Deferred.fromCoroutine(self._release(ip, record))

    async def _release(self, ip: str, record: LockRecord) -> None:
        try:
            await self._clear_host(ip)
            await self._locks.release(self._keys.vip_lock(ip), record.lease, record.created)
        except Exception as e:
            self.errors[ip] = f"release: {describe(e, self._locks.endpoint)}"
            log.warn("could not release VIP {ip}: {e}; trying again", ip=ip, e=self.errors[ip])
            if self.records.get(ip) is record and not self.stopping:
                self._reactor.callLater(RELEASE_RETRY, self._retry_release, ip, record)
            return
        if self.records.get(ip) is record:
            self._forget(ip)
        self.errors.pop(ip, None)
        self._changed()

    def _retry_release(self, ip: str, record: LockRecord) -> None:
        if self.records.get(ip) is record and record.lease == self._session.lease and not self.stopping:
            defer.Deferred.fromCoroutine(self._release(ip, record))

    async def release_all(self) -> list[str]:
        """On the way out (the host is already clear): delete every lock still on our lease."""
        self.stopping = True
        self._contest_failures.flush()  # the failures not yet summed up, before the way-out lines
        lease = self._session.lease
        held = sorted(ip for ip, r in self.records.items() if r.lease == lease)
        releases = [self._locks.release(self._keys.vip_lock(ip), lease, self.records[ip].created)
                    .addTimeout(STOP_TIMEOUT, self._reactor) for ip in held]
        for ip, (ok, result) in zip(held, await defer.DeferredList(releases, consumeErrors=True)):
            if not ok:
                log.warn("could not release VIP {ip} on the way out: {e}; it goes with our lease",
                         ip=ip, e=describe(result, self._locks.endpoint))
        self.records.clear()
        return held
