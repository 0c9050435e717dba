"""VIP addresses on the interface, each add or renewal justified the moment it is sent.

The reconciler says which addresses it wants (level-triggered, a whole set);
this module owns what reaches the kernel.  Nothing is queued: a pass reads
the wanted set and asks ``justify()`` for the lease deadline and whether
each address may be held *now*, packs every removal, add and renewal, and
hands them to the kernel in one synchronous exchange (networkd.vips.netlink).
A reactor stall, a starved CPU or a frozen process only delays the pass;
the decision and the lifetime are taken when it runs, never before.

The safety rule: the kernel's expiry of a held address (the dead man's
switch) never lies after ``deadline`` (the lease deadline minus the fencing
margin), so a node that stops running still loses the address before etcd
can give the lock away.

* Lifetimes are whole seconds, ``floor(deadline - now - SEND_SLACK)``,
  read from the clock right before the exchange.  The kernel starts the
  lifetime while handling the request, inside the same system call, so the
  expiry is at most ``end of exchange + lifetime``.  That bound is checked
  after every exchange; one that overran (the exchange took longer than the
  slack: rtnl lock contention, preemption) is renewed again or removed at
  once.
* All held addresses share one kernel expiry: whenever any address is
  added or renewed, every held address is put again, with the same
  lifetime, in the same system call.  The kernel removes expired addresses
  from a timer that runs on every address change and otherwise at the
  earliest expiry, but never sooner than a second after its previous run:
  an address expiring within a second after another (or after a change)
  would outlive its lifetime by up to a second, more than the fencing
  margin.  With one shared expiry the run that removes the first removes
  all; the timer's rounding (up to 0.25 s) is what the margin covers
  (docs/design.md, "Kernel expiry").  An exchange whose requests reached
  the kernel more than ``ALIGNED`` apart counts as an overrun.
* Renewals happen only when an address would otherwise lapse within
  ``renew_ahead`` (about one keep-alive interval), and only if they extend
  it: one renewal per address per keep-alive at most, in one batch.  When
  keep-alives are late, one more renewal a second before the deadline keeps
  the address until just before it (not up to a second less).
* Removals come first in every exchange; ``removed(ip)`` fires once the
  kernel confirmed.
* ``audit()`` reads the interface back: addresses that vanished (expired or
  removed by someone else) are put back if still justified, managed VIPs
  nobody holds are removed, and an address whose kernel lifetime reaches
  past the deadline is an error and is removed at once (past the failsafe's
  deadline, for a VIP whose promises still cover it during a retake).
"""

from __future__ import annotations

import errno
import math
from dataclasses import dataclass
from typing import Callable, Iterable

from twisted.internet import defer
from twisted.logger import Logger

from networkd.vips import rtnl

log = Logger()

SEND_SLACK = 0.05  # seconds between reading the clock and the kernel starting a lifetime
FIX_ROUNDS = 3  # re-sends of an overrun lifetime before the address is removed instead
RETRY_AFTER = 1.0  # seconds before a failed add or removal is tried again
MIN_GAIN = 0.25  # seconds a renewal must add to an address's life to be worth a request
TOP_UP_GAIN = 0.1  # ... when the address would otherwise lapse within a second
TOP_UP_EARLY = 0.02  # the last renewal before the deadline comes this much early (timer slack)
MIN_WAKE = 0.01  # a pass never schedules the next one sooner than this
ALIGNED = 0.015  # seconds: the kernel's expiry check takes addresses up to 20 ms before their expiry


@dataclass(frozen=True)
class Justification:
    """What the reconciler allows at this instant."""

    deadline: float | None  # kernel expiries must end by then; None: hold nothing
    may_hold: Callable[[str], bool]
    # A later end an address already placed may keep (the audit's check): the failsafe's deadline for a VIP
    # its promises still cover while its lock is retaken (networkd.vips.fencing); None: ``deadline``.
    covered: Callable[[str], float | None] = lambda ip: None


class AddressKeeper:
    def __init__(self, *, reactor, netlink, clock: Callable[[], float], justify: Callable[[], Justification],
                 renew_ahead: float, on_added: Callable[[str, int], None] = lambda ip, life: None,
                 on_removed: Callable[[str], None] = lambda ip: None,
                 managed: Callable[[], Iterable[str]] = lambda: ()):
        self._reactor = reactor
        self._netlink = netlink
        self._clock = clock
        self._justify = justify
        self.renew_ahead = renew_ahead
        self._on_added = on_added
        self._on_removed = on_removed
        self._managed = managed
        self.wanted: frozenset[str] = frozenset()
        self.placed: dict[str, float] = {}  # ip -> upper bound of the kernel's expiry, on our clock
        self.errors: dict[str, str] = {}
        self._retry_at: dict[str, float] = {}
        self._own_removals: dict[str, int] = {}
        self._waiters: dict[str, list[defer.Deferred]] = {}
        self._call = None
        self._call_at: float | None = None
        self.stats = {"puts": 0, "removals": 0, "overruns": 0, "violations": 0}

    # -- what the reconciler uses ------------------------------------------------

    def want(self, ips: Iterable[str]) -> None:
        """The whole set of addresses that should be on the interface; applied soon."""
        ips = frozenset(ips)
        if ips != self.wanted:
            self.wanted = ips
            self.soon()

    def soon(self, delay: float = 0.0) -> None:
        """Run a pass after ``delay`` (coalesced with an earlier one)."""
        at = self._clock() + delay
        if self._call is not None and self._call.active():
            if self._call_at is not None and self._call_at <= at:
                return
            self._call.cancel()
        self._call_at = at
        self._call = self._reactor.callLater(delay, self._timer)

    def removed(self, ip: str) -> defer.Deferred:
        """Fires once ``ip`` is off the interface (or was never on it)."""
        if ip not in self.placed and ip not in self._retry_at:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.setdefault(ip, []).append(d)
        return d

    def counters(self) -> dict[str, int]:
        stats = self.stats
        return {"address_requests": stats["puts"] + stats["removals"], "netlink_overruns": stats["overruns"],
                "lifetime_violations": stats["violations"]}

    def holds(self, ip: str) -> bool:
        return ip in self.placed

    def vanished(self, ip: str, lifetime_left: int | None = None) -> None:
        """Netlink says ``ip`` left the interface; ``lifetime_left``: the kernel's count of its valid
        lifetime then (0: it ran out; None: a read-back found it missing, so our clock decides)."""
        if self._own_removals.get(ip):
            self._own_removals[ip] -= 1
            if not self._own_removals[ip]:
                del self._own_removals[ip]
            return
        expires = self.placed.get(ip)
        if expires is None:
            return
        now = self._clock()
        near_end = now >= expires - SEND_SLACK  # our bound on its expiry; the kernel takes it up to 25 ms early
        if lifetime_left == 0 and not near_end:
            # It ran out, yet our newest put gives it longer: that put came after the kernel took it,
            # and made it again (a keep-alive acknowledged just too late).  It is on the interface.
            log.info("VIP {ip}: its kernel lifetime ran out just before a late renewal put it back", ip=ip)
            return
        del self.placed[ip]
        self._on_removed(ip)
        if lifetime_left == 0 or (lifetime_left in (None, 1) and near_end):
            self._ran_out(ip, expires)
        else:
            log.warn("VIP {ip} was removed from {iface} by someone else ({left}); putting it back", ip=ip,
                     iface=getattr(self._netlink, "interface", "the interface"),
                     left="seen missing in a read-back" if lifetime_left is None
                     else f"{lifetime_left}s of its lifetime left")
        self.soon()

    def _ran_out(self, ip: str, expires: float) -> None:
        """Say whether the kernel's expiry was the dead man's switch doing its job (keep-alives late:
        the lease deadline allowed no renewal) or a renewal that should have come and did not."""
        just = self._justify()
        if just.deadline is None or not just.may_hold(ip):
            log.info("VIP {ip}: its kernel lifetime ran out while fenced or leaving: expected", ip=ip)
        elif just.deadline - expires < 1 + SEND_SLACK + TOP_UP_EARLY + ALIGNED:
            log.info("VIP {ip}: its kernel lifetime ran out {d:.2f}s before the lease deadline: expected, "
                     "keep-alives are late and the kernel fences first", ip=ip, d=max(0.0, just.deadline - expires))
        else:
            log.warn("VIP {ip}: its kernel lifetime ran out though the lease allows {d:.2f}s more: not renewed "
                     "in time (reactor held up?); putting it back", ip=ip, d=just.deadline - expires)

    def pass_now(self, ahead: float = 0.0) -> None:
        """Run a pass at once (it schedules the next one itself).

        ``ahead``: renewals due within that many seconds are done in this pass.  The keep-alive
        pass gives one keep-alive interval, so a renewal falls to it rather than to a timer pass of
        its own before the next acknowledgement (each pass plans every address); if no keep-alive is
        acknowledged, the timers still fire as before (networkd.vips.reconciler.renewal_lead).
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = self._call_at = None
        self._guarded_pass(ahead)

    # -- the pass -----------------------------------------------------------------

    def _timer(self) -> None:
        self._call = self._call_at = None
        self._guarded_pass()

    def _guarded_pass(self, ahead: float = 0.0) -> None:
        try:
            self._pass(ahead)
        except Exception:
            log.failure("VIP address pass failed")
            self.soon(RETRY_AFTER)

    def _pass(self, ahead: float = 0.0) -> None:
        force: set[str] = set()
        announce = []
        for _ in range(FIX_ROUNDS + 1):
            now = self._clock()
            just = self._justify()
            allowed = self._allowed(now, just)
            removals, puts, wake = self._plan(now, just, allowed, force, ahead)
            if not removals and not puts:
                break
            added, force = self._exchange(removals, puts, just.deadline)
            announce += added
            if not force:
                # The same justification, asked within the same reactor turn: nothing it reads moved.
                now = self._clock()
                removals, puts, wake = self._plan(now, just, allowed, force)
                if removals or puts:
                    wake = now
                break
            self.stats["overruns"] += 1
            log.warn("netlink exchange took {took:.3f}s (requests {span:.3f}s apart): the kernel may keep {n} "
                     "VIP(s) past the lease deadline; renewing them again", took=self._netlink.last_exchange,
                     span=self._netlink.last_span, n=len(force))
        else:
            self._force_remove(force)  # exchanges keep overrunning: hold nothing rather than risk it
            wake = self._clock()
        self._announce(announce)
        if wake is not None:
            self.soon(max(MIN_WAKE, wake - self._clock()))

    def _allowed(self, now: float, just: Justification) -> frozenset[str] | set[str]:
        """The wanted addresses that may be on the interface at ``now``."""
        if just.deadline is None or now >= just.deadline:
            return frozenset()
        return {ip for ip in self.wanted if just.may_hold(ip)}

    def _plan(self, now: float, just: Justification, allowed, force: set[str], ahead: float = 0.0):
        """(removals, puts, when the next pass is needed) for this instant."""
        deadline = just.deadline if just.deadline is not None and now < just.deadline else None
        placed, retry_at = self.placed, self._retry_at
        removals = [ip for ip in placed if ip not in allowed and retry_at.get(ip, 0.0) <= now] \
            if not placed.keys() <= allowed else []
        puts: list[tuple[str, int]] = []
        wake = min(retry_at.values(), default=None)
        if deadline is None:
            return removals, puts, wake
        life = math.floor(deadline - now - SEND_SLACK)
        wake = min(wake or deadline, deadline) if placed else wake  # fence on time by ourselves
        # When no newer keep-alive came, one renewal a second before the deadline, with a lifetime
        # of exactly 1 s, lets the address live until just before it instead of lapsing up to a
        # second early (lifetimes are whole seconds).
        top_up = deadline - SEND_SLACK - 1 - TOP_UP_EARLY
        expiries = set(placed.values()) if not force and not retry_at and allowed == placed.keys() else ()
        if len(expiries) == 1:
            # At rest every held address shares one expiry (see the module's docstring): one decision
            # for all of them, the same one the loop below would take for each.
            renew, when = self._decide(next(iter(expiries)), now, life, deadline, top_up, ahead)
            if renew:
                puts = [(ip, life) for ip in allowed]
            elif when is not None:
                wake = min(wake or math.inf, when)
            return removals, puts, wake
        for ip in allowed:
            expires = placed.get(ip)
            if ip in force:
                if life >= 1:
                    puts.append((ip, life))
                else:
                    removals.append(ip)
                continue
            if expires is None:
                if life >= 1 and retry_at.get(ip, 0.0) <= now:
                    puts.append((ip, life))
                continue
            renew, when = self._decide(expires, now, life, deadline, top_up, ahead)
            if renew:
                puts.append((ip, life))
            elif when is not None:
                wake = min(wake or math.inf, when)
        if puts:  # one expiry for every held address (see the module's docstring)
            queued = {ip for ip, _ in puts}
            puts += [(ip, life) for ip in allowed if ip in placed and ip not in queued]
        return removals, puts, wake

    def _decide(self, expires: float, now: float, life: int, deadline: float, top_up: float, ahead: float):
        """(renew now, else when a renewal may be worth a pass) for an address expiring at ``expires``."""
        gain = now + life - expires if life >= 1 else 0.0
        due_now = expires - now <= self.renew_ahead + ahead
        if (due_now and gain >= MIN_GAIN) or (
                gain >= TOP_UP_GAIN and expires - now < 1.0 and (due_now or now >= top_up - 1e-9)):
            return True, None  # (the top-up: when it is time for it, whatever the renewal lead)
        due = expires - self.renew_ahead
        if due > now and due + math.floor(deadline - due - SEND_SLACK) >= expires + MIN_GAIN:
            return False, due
        if now < top_up < expires and top_up + 1 - expires >= TOP_UP_GAIN:
            return False, top_up  # keep-alives late: live on until the deadline
        return False, None  # only a newer keep-alive can help

    def _exchange(self, removals, puts, deadline: float | None):
        """Send one batch; returns (new addresses, addresses whose expiry may overrun the deadline)."""
        results = self._netlink.apply(removals, puts)
        finished = self._clock()
        self.stats["removals"] += len(removals)
        self.stats["puts"] += len(puts)
        for ip in removals:
            code = results.get(ip, errno.EIO)
            if code in (0, errno.EADDRNOTAVAIL, errno.ENOENT, errno.ENODEV):
                self._gone(ip, code == 0)
            else:
                self._failed(ip, "removal", code, finished)
        overrun, added = set(), []
        spread = self._netlink.last_span > ALIGNED  # the expiries may lie apart
        for ip, life in puts:
            code = results.get(ip, errno.EIO)
            if code != 0:
                self._failed(ip, "address", code, finished)
                if ip in self.placed:
                    overrun.add(ip)  # a renewal failed: its old, earlier expiry stands apart
                continue
            new = ip not in self.placed
            self.placed[ip] = finished + life
            self._retry_at.pop(ip, None)
            self.errors.pop(ip, None)
            if deadline is None or finished + life > deadline or spread:
                overrun.add(ip)
            if new:
                added.append((ip, life))
        return added, overrun

    def _gone(self, ip: str, by_us: bool) -> None:
        self._on_removed(ip)
        self.placed.pop(ip, None)
        self._retry_at.pop(ip, None)
        self.errors.pop(ip, None)
        if by_us:
            self._own_removals[ip] = self._own_removals.get(ip, 0) + 1
        log.info("VIP {ip} removed from the interface{note}", ip=ip, note="" if by_us else " (already gone)")
        for waiter in self._waiters.pop(ip, []):
            waiter.callback(None)

    def _announce(self, added) -> None:
        """New addresses to ``on_added(ip, lifetime)`` (it announces them), only while still justified."""
        if not added:
            return
        just = self._justify()
        now = self._clock()
        for ip, life in added:
            if just.deadline is not None and now < just.deadline and just.may_hold(ip) and ip in self.placed:
                self._on_added(ip, life)

    def _force_remove(self, ips) -> None:
        ips = list(ips)
        results = self._netlink.apply(ips, [])
        for ip in ips:
            code = results.get(ip, errno.EIO)
            if code in (0, errno.EADDRNOTAVAIL, errno.ENOENT, errno.ENODEV):
                self._gone(ip, code == 0)
            else:
                self._failed(ip, "removal", code, self._clock())

    def _failed(self, ip: str, what: str, code: int, now: float) -> None:
        message = f"{what}: {errno.errorcode.get(code, code)} ({code})"
        if self.errors.get(ip) != message:
            log.warn("VIP {ip}: {what} failed: {e}; trying again", ip=ip, what=what, e=message)
        self.errors[ip] = message
        self._retry_at[ip] = now + RETRY_AFTER
        self.soon(RETRY_AFTER)

    # -- reading the interface back ------------------------------------------------

    def audit(self) -> None:
        """Compare the interface with what we placed; enforce the lifetime rule."""
        started = self._clock()
        present = {a.ip: a for a in self._netlink.addresses()}
        just = self._justify()
        managed = set(self._managed())
        stale = []
        for ip in [ip for ip in self.placed if ip not in present]:
            self._own_removals.pop(ip, None)
            self.vanished(ip)
        for ip, address in present.items():
            expires = self.placed.get(ip)
            if expires is None:
                if ip in managed and ip not in self._retry_at:
                    log.warn("VIP {ip} is on the interface but not held here; removing it", ip=ip)
                    stale.append(ip)
                continue
            # The kernel counts whole seconds: its expiry is later than this, by under a second.
            at_least = started + address.valid - 1
            permanent = address.valid == rtnl.FOREVER or bool(address.flags & rtnl.IFA_F_PERMANENT)
            limit = just.deadline if just.deadline is None else max(just.deadline, just.covered(ip) or 0.0)
            if permanent or (limit is not None and at_least > limit + SEND_SLACK) \
                    or at_least > expires + SEND_SLACK:
                self.stats["violations"] += 1
                log.error("VIP {ip}: the kernel keeps it until at least {left}s from now, past the lease "
                          "deadline ({d:.2f}s from now): removing it", ip=ip,
                          left="forever" if permanent else address.valid - 1,
                          d=(just.deadline - started) if just.deadline is not None else float("nan"))
                stale.append(ip)
        if stale:
            self._force_remove(stale)
            self.soon()
