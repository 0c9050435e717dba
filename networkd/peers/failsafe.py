"""Keep VIPs through a whole etcd outage, only while every peer promises not to take them.

Holder side: when our keep-alives fail (or the newest acknowledged one is
older than 1.5 keep-alive intervals) while we carry VIPs, we ask every other
member seen in any members snapshot since we started (``members/<host>``,
its newest ``peer`` address; never forgotten while we run) to promise not
to campaign for those VIPs for ``promise`` seconds, and ask again every
``promise``/4 while etcd stays away (sooner when a round is not complete).
A round in which every member answered "promise" moves the failsafe
deadline to ``sent + granted * 0.99 - fencing_margin(promise)`` (sent on
our monotonic clock; the promiser counts from its receipt, later).  While
that deadline is later than the lease's, the VIP manager is not fenced and
keeps exactly the VIPs held when the failsafe began.  No other member ever
seen: every round is complete (vacuously).

Promiser side: networkd.peers.promises.  Promises live in memory only:
after a start, nothing is contested for ``promise`` seconds (the start-up
hold-off).

etcd back: the same lease acknowledged ends the failsafe; a new lease starts
the retake (our failsafe VIPs contested at once, nothing else, under the
earlier of both deadlines) which ends once each is ours again or someone
else's.  docs/design.md, "Failsafe", has the safety argument.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from twisted.internet import task
from twisted.logger import Logger

from networkd.etcd.session import fencing_margin
from networkd.peers.channel import PeerChannel, member_peer
from networkd.peers.promises import Promises
from networkd.peers.wire import Refused, Wire

log = Logger()

DRIFT = 0.99  # our clock may run up to 1 % slower than a promiser's
TROUBLE_AFTER = 1.5  # keep-alive intervals without an acknowledgement: etcd is away
KEEP_ROUNDS = 8


@dataclasses.dataclass
class Round:
    sent: float
    asked: frozenset[str]  # members
    promised: dict = dataclasses.field(default_factory=dict)  # member -> seconds granted
    refused: dict = dataclasses.field(default_factory=dict)  # member -> why


class Failsafe:
    """Off (a pass-through) without a secret; see the module docstring."""

    def __init__(self, *, reactor, clock: Callable[[], float], wall: Callable[[], float], session, locks, inputs,
                 hostname: str, promise: float, secret: bytes | None, listen: tuple[str, int] | None,
                 changed: Callable[[], None]):
        self.clock = clock
        self._reactor, self._clock, self._session, self._locks, self._inputs = reactor, clock, session, locks, inputs
        self.hostname, self.promise, self._changed = hostname, promise, changed
        # Taken off every promise, as off the lease: the kernel removes an expired address up to 0.25 s
        # late even with one shared expiry (docs/design.md, "Kernel expiry"), plus scheduling.
        self.slack = fencing_margin(promise)
        self.enabled = secret is not None and listen is not None
        self.off_reason = None if self.enabled else "no --peer-secret-file"
        self.listen = listen
        self.channel = PeerChannel(Wire(secret, hostname, wall), reactor, self._received) if self.enabled else None
        self.started_at = clock()
        self.holding: Callable[[], frozenset[str]] = frozenset  # the VIPs we carry now (set by the manager)
        self.lease_deadline: Callable[[], float | None] = lambda: None  # (set by the manager)
        self.promises = Promises(clock=clock, hostname=hostname, promise=promise, locks=locks,
                                 etcd_away=self.etcd_away, keeping=lambda: self.vips)
        self.counters = {"failsafe_entered": 0, "failsafe_ended": 0, "promises_refused": 0}
        self._holdoff_logged = False
        self._loop = None
        # Every other member seen since we started -> its peer address (None: it publishes none).  Never
        # forgotten: a member whose key expired may still be alive behind a partition (docs/design.md).
        self._members: dict[str, tuple | None] = {}
        self._values: dict[str, str] = {}  # the members values already read, not parsed again
        self._reset()

    def _reset(self) -> None:
        self.vips: frozenset[str] = frozenset()  # what we keep; empty: not in failsafe
        self.deadline: float | None = None
        self.residual: float | None = None  # a deadline still standing after the failsafe ended
        self._residual_vips: frozenset[str] = frozenset()  # the VIPs that deadline covers
        self.retaking = False
        self._lease = None
        self.rounds: dict[int, Round] = {}
        self._nonces: dict[str, tuple[int, str]] = {}
        self._round = 0
        self._entered = False
        self._refusers: set[str] = set()  # logged once per failsafe

    def published(self, node_ip: str | None) -> str | None:
        """Our peer address for the members value (an unspecified listen host: the node IP); None when off."""
        if not self.enabled:
            return None
        host, port = self.listen
        host = node_ip or host if host in ("0.0.0.0", "::") else host
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        if not self.enabled:
            log.info("failsafe off: {why}", why=self.off_reason)
            return
        self.channel.listen(*self.listen)
        log.info("failsafe on: peer channel on {a}; promises of {p:g}s; no VIP contested for the first {p:g}s",
                 a=self.channel.address, p=self.promise)
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self._reactor
        self._loop.start(self._session.bound / 2, now=False).addErrback(
            lambda f: log.failure("failsafe loop died", f))

    def stop(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self.channel.close() if self.channel is not None else None

    # -- what the VIP manager asks ------------------------------------------------

    def etcd_away(self) -> bool:
        s = self._session
        age = s.ack_age()
        return s.lease is None or s.last_error is not None or age is None or age >= TROUBLE_AFTER * s.interval

    def covering(self) -> float | None:
        """The failsafe deadline while it is in the future and we keep VIPs under it."""
        if self.vips and self.deadline is not None and self._clock() < self.deadline:
            return self.deadline
        return None

    def outage(self) -> bool:
        """Keeping VIPs under promises while etcd is away: no campaign, no release."""
        return self.covering() is not None and not self.retaking

    def kept(self, holders) -> frozenset[str]:
        """Failsafe VIPs still covered, less any the lock snapshot gives to someone else."""
        if self.covering() is None:
            return frozenset()
        return frozenset(ip for ip in self.vips if holders.get(ip) in (None, self.hostname))

    def deadline_with(self, lease_deadline: float | None) -> float | None:
        """The addresses' deadline: the lease's, moved by the failsafe (the earlier one while retaking)."""
        covering = self.covering()
        if covering is None:
            residual = self.residual if self.residual is not None and self._clock() < self.residual else None
            return lease_deadline if residual is None or lease_deadline is None else max(lease_deadline, residual)
        if lease_deadline is None:
            return covering
        return min(lease_deadline, covering) if self.retaking else max(lease_deadline, covering)

    def past_lease(self, lease_deadline: float | None) -> frozenset[str] | None:
        """While a deadline left by an ended failsafe outlives the lease's: the only VIPs it covers (those
        kept under promises; any other's address must not live past its lease).  None: no such limit."""
        standing = self.residual is not None and self.residual > max(self._clock(), lease_deadline or 0.0)
        return self._residual_vips if standing and self.covering() is None else None

    def holding_off(self) -> bool:
        """In the start-up hold-off, or bound by a promise: we would not contest a VIP released towards us
        (so we are not ready to receive; networkd.vips.readiness)."""
        return self.enabled and (self._clock() < self.started_at + self.promise or bool(self.promises.blocked()))

    def holding_off_until(self) -> float | None:
        """When the start-up hold-off and every promise binding us have ended (our clock; None: none binds us),
        so that readiness says "ready" again then, not at the next full pass."""
        if not self.enabled:
            return None
        now = self._clock()
        ends = [t for t in (self.started_at + self.promise, *self.promises.given.values()) if t > now]
        return max(ends) if ends else None

    def filter(self, plan, held: frozenset[str]):
        """The plan we may drive now (None: drive nothing)."""
        if not self.enabled:
            return plan
        if self.outage():
            return None
        now = self._clock()
        blocked = self.promises.blocked()
        if now < self.started_at + self.promise:
            if not self._holdoff_logged:
                self._holdoff_logged = True
                log.info("failsafe: contesting no VIP until {s:.1f}s after start (promises given before a restart "
                         "are forgotten)", s=self.promise)
            blocked = None
        elif self.residual is not None and self.residual > max(now, self.lease_deadline() or 0.0):
            blocked = None  # addresses may live on a promise past the lease: no new lock until it passed
        if self.retaking:
            return dataclasses.replace(plan, campaign_now=frozenset(self.vips - held), campaign_later=frozenset(),
                                       release=frozenset())
        if blocked is None:
            return dataclasses.replace(plan, campaign_now=frozenset(), campaign_later=frozenset())
        return dataclasses.replace(plan, campaign_now=plan.campaign_now - blocked,
                                   campaign_later=plan.campaign_later - blocked)

    def acked(self, lease: int) -> None:
        """etcd answered: the same lease ends the failsafe, a new one starts the retake."""
        if not self.vips:
            return
        if lease == self._lease:
            self._end(f"etcd acknowledges lease {lease:x} again")
        elif self.covering() is None:
            self._end("our lease expired on etcd, and no promise covers us")
        elif not self.retaking:
            self.retaking = True
            log.warn("failsafe: lease {old} expired on etcd; contesting {ips} again on lease {new:x} first",
                     old="-" if self._lease is None else f"{self._lease:x}", ips=", ".join(sorted(self.vips)),
                     new=lease)

    def settle(self, held: frozenset[str], holders) -> None:
        """Each pass while retaking: done once every failsafe VIP is ours on the new lease or someone else's."""
        if self.retaking and all(ip in held or holders.get(ip) not in (None, self.hostname) for ip in self.vips):
            self._end("locks held again on the new lease")

    def fenced(self) -> None:
        """The manager fenced: nothing is kept any more."""
        if self.vips:
            self._end("fenced")

    def _end(self, why: str) -> None:
        residual, vips = self.covering(), self.vips
        if self._entered:
            self.counters["failsafe_ended"] += 1
            log.info("failsafe ended for {ips}: {why}", ips=", ".join(sorted(self.vips)), why=why)
        self._reset()
        self.residual = None if why == "fenced" else residual
        self._residual_vips = vips if self.residual is not None else frozenset()
        self._changed()

    # -- holder side ------------------------------------------------------------

    def _tick(self) -> None:
        now = self._clock()
        self.promises.prune()
        self._learn()
        if self.vips and self.covering() is None and not self._in_lease():
            self._end("no promise before the lease deadline" if self.deadline is None else "promise deadline passed")
        if self.retaking or not self.etcd_away():
            return
        if not self.vips:
            holding = self.holding()
            if not holding or not self._in_lease():
                return
            self.vips, self._lease = holding, self._session.lease
            log.info("failsafe: etcd unreachable while holding {ips}; asking the peers for promises",
                     ips=", ".join(sorted(holding)))
        last = self.rounds.get(self._round)
        complete = last is not None and len(last.promised) == len(last.asked)
        if last is None or now - last.sent >= (self.promise / 4 if complete else self._session.bound / 2):
            self._send_round(now)

    def _in_lease(self) -> bool:
        deadline = self.lease_deadline()
        return self._session.lease is not None and deadline is not None and self._clock() < deadline

    def _learn(self) -> None:
        """Each tick, etcd reachable or not: remember the snapshot's members and their newest peer address."""
        values = self._inputs.member_values
        for name in self._inputs.members:
            value = values.get(name, "")
            if name != self.hostname and (name not in self._members or self._values.get(name) != value):
                self._values[name] = value
                self._members[name] = member_peer(value) or self._members.get(name)

    def _send_round(self, now: float) -> None:
        self._round += 1
        current = self.rounds[self._round] = Round(now, frozenset(self._members))
        for old in [r for r in self.rounds if r <= self._round - KEEP_ROUNDS]:
            del self.rounds[old]
        self._nonces = {n: v for n, v in self._nonces.items() if v[0] in self.rounds}
        unreachable = sorted(n for n, peer in self._members.items() if peer is None)
        if unreachable and self._round == 1:
            log.warn("failsafe: members {m} publish no peer address: they cannot promise", m=", ".join(unreachable))
        for name, peer in self._members.items():
            if peer is not None:
                nonce = self.channel.send(peer, "promise?", vips=sorted(self.vips), seconds=self.promise)
                self._nonces[nonce] = (self._round, name)
        if not current.asked:
            self._complete(current)

    def _answer(self, message: dict) -> None:
        number, member = self._nonces.get(message.get("re"), (None, None))
        current = self.rounds.get(number)
        if current is None:
            return  # from a round we no longer track, or a failsafe that ended
        if message["from"] != member:
            raise Refused(f"answer from {message['from']!r} to a request sent to {member!r}")
        if message["type"] == "refuse":
            why = str(message.get("why"))
            if member not in current.refused:
                current.refused[member] = why
                self.counters["promises_refused"] += 1
                if member not in self._refusers:
                    self._refusers.add(member)
                    log.info("failsafe: {m} refuses to promise: {why}", m=member, why=why)
            return
        granted = message.get("seconds")
        if not isinstance(granted, (int, float)) or not set(self.vips) <= set(message.get("vips") or ()):
            raise Refused("a promise that does not cover what we asked")
        current.promised[member] = min(float(granted), self.promise)
        if len(current.promised) == len(current.asked):
            self._complete(current)

    def _complete(self, current: Round) -> None:
        granted = min(current.promised.values(), default=self.promise)
        candidate = current.sent + granted * DRIFT - self.slack
        if not self.vips or (self.covering() is None and not self._in_lease()):
            return  # too late: fenced already (or about to be), nothing to revive
        if (self.deadline is None or candidate > self.deadline) and candidate > self._clock():
            self.deadline = candidate
            if not self._entered:
                self._entered = True
                self.counters["failsafe_entered"] += 1
                log.warn("failsafe: every peer promised; keeping {ips} while etcd is away",
                         ips=", ".join(sorted(self.vips)))
            self._changed()

    # -- promiser side ------------------------------------------------------------

    def _received(self, message: dict, address) -> tuple | None:
        kind = message.get("type")
        if kind in ("promise", "refuse"):
            self._answer(message)
            return None
        if kind != "promise?":
            raise Refused(f"unknown message type {kind!r}")
        return self.promises.request(message)
