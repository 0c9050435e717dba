"""VipManager: make the host and the locks match the snapshots, safely.

A pass, top to bottom: snapshots in (vips.inputs) → the planner says what to contest, keep and
release (vips.planner) → the locks (vips.locks) → the host (vips.host: addresses and DNAT rules)
→ app keys (vips.appkeys).

Safety first (docs/design.md, "VIP safety"): fencing at the lease deadline, kernel lifetimes,
adds and renewals justified when sent, host before lock, leftovers removed before contesting.
"""

from __future__ import annotations

from typing import Callable

from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger

from networkd.api.vipstatus import vip_entries
from networkd.backoff import every
from networkd.etcd.lock import LeaseLocks
from networkd.etcd.session import fencing_margin
from networkd.peers.failsafe import Failsafe
from networkd.vips.appkeys import AppKeys
from networkd.vips.arp import Announcer
from networkd.vips.fencing import Fencing
from networkd.vips.health import VipHealth
from networkd.vips.host import VipHost
from networkd.vips.inputs import VipInputs
from networkd.vips.locks import STOP_TIMEOUT, LockKeeper
from networkd.vips.netlink import Netlink
from networkd.vips.notify import Notifier, Transitions
from networkd.vips.planner import DnatRule, app_endpoints
from networkd.vips.readiness import Readiness
from networkd.vips.wants import HostWants

log = Logger()

TICK = 0.5  # seconds between checks while a pass waits on time (see _tick); also a fallback fencing check
ANTI_ENTROPY = 5.0  # a full pass at least this often even when nothing changed
MAX_KICK_DELAY = 0.1  # seconds a kicked pass may wait behind costly earlier ones
RENEW_AHEAD = 1.5  # the longest lead of a renewal by the keeper's own timer (see renewal_lead)


def renewal_lead(interval: float) -> float:
    """How long before an address lapses the keeper renews it by a timer pass of its own, when no
    acknowledgement came to do it: 3/4 of a keep-alive interval (at most RENEW_AHEAD).  Each
    acknowledged keep-alive renews what would lapse within that lead plus one interval (its pass is
    given ``ahead`` = one interval), so an address renewed at one acknowledgement is left alone at the
    next (TTL 3: a 2 s lifetime has 1.33 s left, over 0.5 + 0.67 s) and renewed at the one after: half
    the netlink batches of a renewal at every keep-alive, and the timer, due a quarter interval after
    that one, only runs when it is late.  (Lead interval + 0.5 s with ahead interval/2 renewed at
    every keep-alive; a lower lead alone left the renewal to the timer, a wake-up of its own.)"""
    return min(0.75 * interval, RENEW_AHEAD)


class VipManager(Fencing, service.Service):
    """Floating VIPs and port-scoped DNAT for this node (networkd.views.VipPart)."""

    name = "vips"

    def __init__(self, *, reactor, client, keys, watch: Callable, session, hostname: str, interface: str,
                 node_ip: str | None, firewall_backend: str = "auto", netlink: Netlink | None = None, probe=None,
                 announcer: Announcer | None = None, to_thread=None, notify_script=None, garp_interval: float = 0,
                 peer_secret: bytes | None = None, peer_listen: tuple[str, int] | None = None):
        # Deadlines are on the session's clock (monotonic in the daemon): a wall-clock step never stretches one.
        self._clock = getattr(session, "clock", None) or reactor.seconds
        self._reactor, self._keys, self._session = reactor, keys, session
        self.hostname, self.interface, self.node_ip = hostname, interface, node_ip
        self.ttl, self.margin = session.ttl, fencing_margin(session.ttl)
        # Create the shared watchers now (no I/O) so they are started before us.
        self._watchers = {"configs": watch(keys.vips), "pods": watch(keys.pod_groups),
                          "locks": watch(keys.vip_locks), "apps": watch(keys.apps)}
        self._etcd = LeaseLocks(client)
        self.inputs = VipInputs(keys)
        self.wants = HostWants(self.inputs, hostname, node_ip)
        self.locks = LockKeeper(locks=self._etcd, keys=keys, hostname=hostname, session=session, reactor=reactor,
                                changed=self.kick, clear_host=self._clear_host)
        self.health = VipHealth(reactor, self.inputs, self.wants, self.locks, hostname, node_ip, probe, self.kick)
        self.failsafe = Failsafe(reactor=reactor, clock=self._clock, wall=reactor.seconds, session=session,
                                 locks=self.locks, inputs=self.inputs, hostname=hostname, promise=float(self.ttl),
                                 secret=peer_secret, listen=peer_listen, changed=self._failsafe_moved)
        self.failsafe.holding, self.failsafe.lease_deadline = lambda: self._active_ips, self._lease_deadline
        self.health.peer = self.failsafe.published(node_ip)
        self.readiness = Readiness(reactor, self._clock, self._watchers["locks"], self.inputs, self.fenced,
                                   self.locks, self.health, self.kick)  # may we receive a VIP, may they
        self.readiness.holding_off = self.failsafe.holding_off
        self.readiness.holding_off_until = self.failsafe.holding_off_until
        self.app_keys = AppKeys(self._etcd, reactor, hostname)
        self.firewall_choice = firewall_backend  # "auto" | "legacy" | "nft", or a back end object
        self.host = VipHost(reactor=reactor, interface=interface, clock=self._clock, justify=self._justification,
                            renew_ahead=renewal_lead(session.interval), managed=self.inputs.floating_ips,
                            desired_rules=self._desired_rules, to_thread=to_thread or threads.deferToThread,
                            netlink=netlink, announcer=announcer, garp_interval=garp_interval)
        self.keeper, self.netlink = self.host.keeper, self.host.netlink
        self.transitions = Transitions(self, Notifier(reactor, notify_script, hostname) if notify_script else None)
        self._active_ips: frozenset[str] = frozenset()  # floating VIPs for this host, as of the last pass
        self.fenced_since: float | None = None  # since when we hold nothing for late keep-alives
        self.fencings = 0
        self.host_ready = self.stopping = self._cleaned = False
        self._fenced_in_last_pass = True
        self._last_pass = self._pass_cost = 0.0
        self._kick_call = self._started = self._fence_call = self._tick_call = None
        self._loops: list = []

    # -- views ---------------------------------------------------------------

    invalid_keys = property(lambda self: self.inputs.invalid_keys)
    pod_errors = property(lambda self: self.inputs.pod_errors)
    firewall = property(lambda self: self.host.firewall)
    addresses = property(lambda self: self.host.addresses)
    _address_removed = property(lambda self: self.keeper.vanished)  # netlink: removed by someone, or expired

    def held_count(self) -> int:
        return len(self.locks.held() & self.addresses)

    def status(self) -> list[dict]:
        return vip_entries(self)

    def error_of(self, key: str) -> str | None:
        return self.locks.errors.get(key) or self.keeper.errors.get(key)

    def safety_counters(self) -> dict[str, int]:
        return {"fencings": self.fencings, **self.keeper.counters(), **self.failsafe.counters,
                "peer_messages_refused": self.failsafe.channel.refused if self.failsafe.channel else 0}

    # -- lifecycle -----------------------------------------------------------

    def startService(self):
        super().startService()
        self.failsafe.start()  # a peer port that cannot be bound stops the daemon, naming it
        self._started = defer.Deferred.fromCoroutine(self._start())
        self._started.addErrback(lambda f: f.trap(defer.CancelledError))
        self._started.addErrback(lambda f: log.failure("VIP manager failed to start", f))

    async def _start(self) -> None:
        backend = await self.host.start(self.firewall_choice, self.host.announce_all, self._address_removed)
        log.info("VIPs on {iface} of {host}; firewall back end {backend}, lock TTL {ttl}s, fencing after {f}s",
                 iface=self.interface, host=self.hostname, backend=backend, ttl=self.ttl, f=self.ttl - self.margin)
        if not self.running:
            return
        self.host_ready = True
        self._session.on_ack(self._acked)
        self._session.on_lost(self._lease_lost)
        self._session.on_reconnect(lambda s: self.host.announce_all(f"etcd answers again after {s:.1f}s"))
        for name, handler in (("configs", self.inputs.configs_snapshot), ("pods", self.inputs.pods_snapshot),
                              ("locks", self._on_locks), ("apps", self.app_keys.observe)):
            self._watchers[name].subscribe(lambda snapshot, handler=handler: (handler(snapshot), self.kick()))
        self._loops = [
            every(self._reactor, interval, tick, f"VIP {tick.__name__}")
            for interval, tick in ((self.host.audit_every(), self._check_addresses),
                                   (self.host.firewall_every(), self.host.verify_firewall))
        ]
        self._arm_tick()
        if self._session.lease is not None:
            self._acked(self._session.lease)
        self.kick()

    def stopService(self):
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        """Release everything: presence and app keys, then rules and addresses, then the locks."""
        self.stopping = True
        self.health.stop()
        self.failsafe.stop()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        for call in (self._kick_call, self._fence_call, self._tick_call, self.readiness.timer):
            if call is not None and call.active():
                call.cancel()
        if self._started is not None and not self._started.called:
            self._started.cancel()
        withdraw = [defer.Deferred.fromCoroutine(self.app_keys.withdraw_all()).addTimeout(STOP_TIMEOUT, self._reactor),
                    self.locks.withdraw_presence()]
        await self.host.stop()
        await defer.DeferredList(withdraw, consumeErrors=True)
        released = await self.locks.release_all()
        if released:
            log.info("released VIPs {ips}", ips=", ".join(released))
        await self.host.close()

    # -- inputs --------------------------------------------------------------

    def _on_locks(self, snapshot) -> None:
        self.inputs.locks_snapshot(snapshot)
        if self.locks.observe(self.inputs.holders, self.inputs.locks_revision, self.inputs.members,
                              self.inputs.locks_deleted):
            self.keeper.pass_now()  # a lost lock's address goes now, not after the next pass

    def _acked(self, lease: int) -> None:
        if self.stopping:
            return
        self.failsafe.acked(lease)
        # A full pass only when the ack changes what we may do; renewals need none.
        changed = self.locks.announce(lease, self.node_ip) or self._fenced_in_last_pass
        if self.fenced_since is not None and not self.fenced():
            log.info("etcd acknowledges our lease again after {s:.1f}s; contesting VIPs again",
                     s=self._reactor.seconds() - self.fenced_since)
            self.fenced_since = None
            changed = True
        self.keeper.pass_now(self._session.interval)  # the deadline moved: renew what needs it before the next
        self._arm_fence()
        if changed:
            self.kick()

    def _lease_lost(self) -> None:
        self.locks.lease_lost()
        self._sync_host()
        self.kick()

    # -- the pass ------------------------------------------------------------

    def kick(self) -> None:
        """Reconcile soon, coalesced; costly passes get at most a third of the reactor (safety
        does not wait: fencing and lost locks act through the address keeper at once)."""
        if self._kick_call is None or not self._kick_call.active():
            delay = min(MAX_KICK_DELAY, max(0.0, self._last_pass + 3 * self._pass_cost - self._clock()))
            self._kick_call = self._reactor.callLater(delay, self._guarded_reconcile)

    def _guarded_reconcile(self) -> None:
        try:
            self._reconcile()
        except Exception:  # never let one bad pass end the kicks
            log.failure("VIP pass failed")
        finally:
            self._arm_tick()

    def _waits_on_time(self) -> bool:
        """A pass would find something new by time alone: a lock not yet seen in the snapshot,
        a contest put off, an error to retry, locks being retaken after an outage, or a lock
        request under way (a failed one sets an error and kicks no pass: the tick retries it)."""
        return bool(self.locks.unsettled() or self.locks.errors or self.failsafe.retaking
                    or self.locks.in_flight())

    def _tick(self) -> None:
        """A pass when something waits on time, else every ANTI_ENTROPY s (inputs kick their own)."""
        self._tick_call = None
        try:
            self._fence()
            if self._waits_on_time() or self._clock() - self._last_pass >= ANTI_ENTROPY:
                self._reconcile()
        except Exception:
            log.failure("VIP tick failed")
        finally:
            self._arm_tick()

    def _arm_tick(self) -> None:
        """The next tick: in TICK while something waits on time, else at the next anti-entropy pass.
        Everything that makes a pass wait on time happens in a pass or kicks one, and every pass
        re-arms this, so an idle node wakes for it once every ANTI_ENTROPY s instead of twice a second."""
        if self.stopping or not self.host_ready:
            return
        delay = TICK if self._waits_on_time() else max(TICK, self._last_pass + ANTI_ENTROPY - self._clock())
        call = self._tick_call
        if call is not None and call.active():
            if call.getTime() > self._reactor.seconds() + delay:
                call.reset(delay)
            return
        self._tick_call = self._reactor.callLater(delay, self._tick)

    def _reconcile(self) -> None:
        if not self.host_ready or self.stopping:
            return
        self._last_pass = started = self._clock()
        self._fenced_in_last_pass = self.fenced()
        if self._fenced_in_last_pass:
            self._fence()
        inputs = self.inputs
        self.locks.observe(inputs.holders, inputs.locks_revision, inputs.members, inputs.locks_deleted)
        self.health.sync()
        self.readiness.sync()
        if inputs.complete and not self._cleaned:
            self._cleaned = True
            self._check_addresses()  # a crashed predecessor's addresses go before we contest
        if inputs.complete and not self.fenced() and not self.failsafe.outage():  # healthy candidates first
            plan = self.readiness.blind(self.health.plan(self.locks.held(), *self.readiness.receivers(),
                                                         floating=self.wants.floating(),
                                                         wanted=self.wants.placeable()))
            plan = self.failsafe.filter(plan, self.locks.held())
            if plan is not None:
                self.locks.drive(plan)
        self.failsafe.settle(self.locks.held(), inputs.holders)
        self._sync_host()
        endpoints = app_endpoints(inputs.configs, inputs.containers, self.hostname, self.node_ip)
        self.app_keys.sync(frozenset(self._keys.app_key(e.app, e.proc, e.ip, e.port) for e in endpoints),
                           self._session.lease)
        self._pass_cost = self._clock() - started

    # -- host ----------------------------------------------------------------

    def _desired_rules(self) -> frozenset[DnatRule]:
        """Port-scoped DNAT and the active VIPs' (memoized: networkd.vips.wants)."""
        if self.stopping:
            return frozenset()
        return self.wants.rules(frozenset() if self.fenced() else self._active_ips)

    def _sync_host(self) -> None:
        self._active_ips = self.active()
        self.host.apply(self._active_ips)

    async def _clear_host(self, ip: str) -> None:
        """Before a lock goes: its address off the interface and its rules out (``ip`` is releasing)."""
        self._sync_host()
        await self.host.cleared(ip)

    def _check_addresses(self) -> None:
        if self.inputs.seen["configs"] and not self.stopping:
            self.host.audit()
