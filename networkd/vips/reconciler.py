"""VipManager: make the host and the locks match the snapshots, safely.

Three snapshots come in whole (VIP configs, deployd pod groups, the lock
prefix); the planner says what to contest, keep and release; this module
turns that into etcd lock calls and host changes, level-triggered.

Safety first, in this order of precedence:

* Fencing: when no keep-alive was acknowledged for ``TTL - margin``
  (margin = max(0.5 s, TTL/4)) every held address and its DNAT rules go,
  before etcd can expire our lease and hand the lock to another node.
  Checked every 100 ms and before every address is added, so a process
  resumed after SIGSTOP drops first and announces nothing.
* Dead man's switch: addresses carry a kernel lifetime ending before that
  deadline, renewed as acknowledged keep-alives move it; a killed or frozen
  daemon loses them without running any code.  Every add and renewal is
  justified at the instant it is sent, never earlier
  (networkd.vips.addresses).
* Release (config gone, container gone, node excluded, rebalancing,
  SIGTERM): rules and address first, then the lock, guarded by our lease.
* Startup: our chains are rebuilt from scratch and configured VIP
  addresses we do not hold are removed before we contest anything.

The port-scoped keys this node serves are also published as app keys on
the lease (networkd.vips.appkeys), withdrawn first on the way out.
"""

from __future__ import annotations

from typing import Callable

from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger

from networkd.backoff import every
from networkd.etcd.lock import LeaseLocks
from networkd.vips import firewall as fw
from networkd.vips.addresses import AddressKeeper, Justification
from networkd.vips.appkeys import AppKeys
from networkd.vips.arp import Announcer
from networkd.vips.model import Container, InvalidValue, VipConfig, parse_pod_group, parse_vips
from networkd.vips.netlink import InterfaceMissing, Netlink
from networkd.vips.planner import (
    MEMBERS, ContainerIndex, DnatRule, app_endpoints, dnat_rules, local_container, lock_holders, plan_floating,
    port_scoped_rules,
)

log = Logger()

FENCE_CHECK = 0.1  # seconds between fencing checks
TICK = 0.5  # seconds between checks for a level-triggered pass (see _tick)
ANTI_ENTROPY = 5.0  # a full pass at least this often even when nothing changed
ADDRESS_CHECK = 1.0  # anti-entropy of addresses (less often while a read-back costs more than 0.2 % of a CPU)
RENEW_AHEAD = 1.5  # an address with less life left than this (at most a keep-alive interval + 0.5 s) is renewed
AUDIT_BUDGET = 0.002  # of the CPU the address read-back may use
FIREWALL_CHECK = 5.0  # anti-entropy of iptables
CAMPAIGN_GRACE = 1.0  # a node that is not the least loaded waits this long for a free VIP
STOP_TIMEOUT = 1.0
VERIFY_AFTER = 1.0  # a lock not seen in the snapshot this long after we took it is read back  # each etcd call on the way out


def fencing_margin(ttl: float) -> float:
    return max(0.5, ttl / 4)


class VipManager(service.Service):
    """Floating VIPs and port-scoped DNAT for this node (networkd.views.VipPart)."""

    name = "vips"

    def __init__(self, *, reactor, client, keys, watch: Callable, session, hostname: str,
                 interface: str, node_ip: str | None, firewall_backend: str = "auto",
                 netlink: Netlink | None = None, announcer: Announcer | None = None, to_thread=None):
        # Deadlines are on the session's clock (monotonic in the daemon): a wall-clock step
        # must never stretch one.
        self._clock = getattr(session, "clock", None) or reactor.seconds
        self._reactor = reactor
        self._keys = keys
        # Create the shared watchers now (no I/O) so they are started before us.
        self._watchers = {"configs": watch(keys.vips), "pods": watch(keys.pod_groups),
                          "locks": watch(keys.vip_locks), "apps": watch(keys.apps)}
        self._session = session
        self._locks = LeaseLocks(client)
        self.app_keys = AppKeys(self._locks, reactor, hostname)
        self.hostname = hostname
        self.interface = interface
        self.node_ip = node_ip
        self.firewall_choice = firewall_backend  # "auto" | "legacy" | "nft", or a back end object
        self._to_thread = to_thread or threads.deferToThread
        self.netlink = netlink or Netlink(interface, reactor, self._clock)
        self.arp = announcer or Announcer(reactor, interface, lambda: self.netlink.mac)
        self.interval = session.ttl / 3  # keep-alive interval
        self.keeper = AddressKeeper(
            reactor=reactor, netlink=self.netlink, clock=self._clock, justify=self._justification,
            renew_ahead=min(self.interval + 0.5, RENEW_AHEAD), on_added=self.arp.announce, on_removed=self.arp.cancel,
            managed=lambda: (c.ip for c in self.configs.values() if c.floating),
        )
        if hasattr(self.arp, "allowed"):
            self.arp.allowed = self._may_announce
        self.firewall: fw.Firewall | None = None
        self.ttl = session.ttl
        self.margin = fencing_margin(session.ttl)

        # snapshots
        self.configs: dict[str, VipConfig] = {}
        self.invalid_keys: dict[str, str] = {}
        self._pods_good: dict[str, list[Container]] = {}
        self.pod_errors: dict[str, str] = {}
        self.containers: ContainerIndex = ContainerIndex()
        self.holders: dict[str, str] = {}
        self.members: frozenset[str] = frozenset()
        self._ours_in_snapshot: set[str] = set()
        self._seen = {"configs": False, "pods": False, "locks": False}

        # what we hold and what we did to the host
        self.locks: dict[str, int] = {}  # ip -> lease we hold its lock on
        self._confirmed: set[str] = set()  # locks seen in the lock snapshot
        self._acquired_at: dict[str, float] = {}
        self._campaigning: set[str] = set()
        self._releasing: set[str] = set()
        self._later: dict[str, float] = {}  # ip -> when to contest it anyway
        self._verifying: set[str] = set()
        self._verified_at: dict[str, float] = {}
        self._active_ips: frozenset[str] = frozenset()  # floating VIPs for this host, as of the last pass
        self._next_audit = 0.0
        self._last_pass = 0.0
        self._fenced_in_last_pass = True
        self._announced_lease: int | None = None
        self.errors: dict[str, str] = {}  # VIP key -> last error
        self.fenced_since: float | None = None
        self.fencings = 0

        self.host_ready = False
        self._cleaned = False
        self.stopping = False
        self._kick_call = None
        self._loops: list = []
        self._started: defer.Deferred | None = None

    # -- views ---------------------------------------------------------------

    def held(self) -> frozenset[str]:
        """IPs whose lock we hold on the current lease."""
        lease = self._session.lease
        return frozenset(ip for ip, held_on in self.locks.items() if lease is not None and held_on == lease)

    @property
    def addresses(self) -> set[str]:
        """Addresses we put on the interface (and that are still there, as far as we know)."""
        return set(self.keeper.placed)

    def held_count(self) -> int:
        return len(self.held() & self.addresses)

    def safety_counters(self) -> dict[str, int]:
        stats = self.keeper.stats
        return {"fencings": self.fencings, "address_requests": stats["puts"] + stats["removals"],
                "netlink_overruns": stats["overruns"], "lifetime_violations": stats["violations"]}

    def fenced(self) -> bool:
        """True while we may not be sure etcd still keeps our lease alive."""
        age = self._session.ack_age()
        return self._session.lease is None or age is None or age >= self.ttl - self.margin

    def deadline(self) -> float | None:
        """When our addresses must be gone: the lease may expire on etcd ``margin`` later."""
        last_ack = self._session.last_ack
        return None if last_ack is None else last_ack + self.ttl - self.margin

    def _may_announce(self, ip: str) -> bool:
        just = self._justification()
        return just.deadline is not None and self.keeper.holds(ip) and just.may_hold(ip)

    def _justification(self) -> Justification:
        """Asked by the address keeper right before it adds or renews anything."""
        lease = self._session.lease
        if self.stopping or not self.host_ready or lease is None or self.fenced():
            return Justification(None, lambda ip: False)
        active, locks, holders, confirmed, releasing = (
            self._active_ips, self.locks, self.holders, self._confirmed, self._releasing)

        def may_hold(ip: str) -> bool:
            if locks.get(ip) != lease or ip in releasing or ip not in active:
                return False
            # The newest lock snapshot outranks our record until the next pass drops it.
            return ip not in confirmed or holders.get(ip) == self.hostname

        return Justification(self.deadline(), may_hold)

    # -- lifecycle -----------------------------------------------------------

    def startService(self):
        super().startService()
        self._started = defer.Deferred.fromCoroutine(self._start())
        self._started.addErrback(lambda f: f.trap(defer.CancelledError))
        self._started.addErrback(lambda f: log.failure("VIP manager failed to start", f))

    async def _make_backend(self):
        if not isinstance(self.firewall_choice, str):
            return self.firewall_choice
        name = await self._to_thread(fw.detect_backend, self.firewall_choice)
        try:
            return await self._to_thread(fw.make_backend, name)
        except Exception as e:
            log.error("firewall back end {name} unusable ({e}); using iptables-restore instead", name=name, e=e)
            return fw.RestoreBackend(name)

    async def _start(self) -> None:
        backend = await self._make_backend()
        self.firewall = fw.Firewall(self._reactor, backend, self._desired_rules, to_thread=self._to_thread)
        log.info("VIPs on {iface} of {host}; firewall back end {backend}, lock TTL {ttl}s, fencing after {f}s",
                 iface=self.interface, host=self.hostname, backend=backend.name, ttl=self.ttl,
                 f=self.ttl - self.margin)
        self.netlink.on_address_removed = self._address_removed
        self.netlink.on_link_up = self._link_up
        self.netlink.on_events_lost = self._check_addresses
        await self.netlink.start()
        self.firewall.reset()  # our chains from scratch, before contesting anything
        await self.firewall.sync()
        if not self.running:
            return
        self.host_ready = True
        self._session.on_ack(self._acked)
        self._session.on_lost(self._lease_lost)
        self._watchers["configs"].subscribe(self._on_configs)
        self._watchers["pods"].subscribe(self._on_pods)
        self._watchers["locks"].subscribe(self._on_locks)
        self._watchers["apps"].subscribe(self._on_apps)
        self._loops = [
            every(self._reactor, interval, tick, f"VIP {tick.__name__}")
            for interval, tick in ((FENCE_CHECK, self._fence_check), (TICK, self._tick),
                                   (ADDRESS_CHECK, self._check_addresses), (FIREWALL_CHECK, self._check_firewall))
        ]
        if self._session.lease is not None:
            self._acked(self._session.lease)
        self.kick()

    def stopService(self):
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        """Release everything: presence and app keys, then rules and addresses, then the locks."""
        self.stopping = True
        for loop in self._loops:
            if loop.running:
                loop.stop()
        if self._kick_call is not None and self._kick_call.active():
            self._kick_call.cancel()
        if self._started is not None and not self._started.called:
            self._started.cancel()
        lease = self._session.lease
        held = {ip: held_on for ip, held_on in self.locks.items() if held_on == lease}
        withdraw = [self._timed(defer.Deferred.fromCoroutine(self.app_keys.withdraw_all()))]
        if lease is not None:
            withdraw.append(self._timed(self._locks.withdraw(self._member_key(), lease)))
        self.arp.cancel_all()
        self._sync_addresses()
        if self.firewall is not None:
            await defer.DeferredList([self.firewall.sync()], consumeErrors=True)
        await defer.DeferredList(withdraw, consumeErrors=True)
        releases = [self._timed(self._locks.release(self._keys.vip_lock(ip), held_on)) for ip, held_on in held.items()]
        await defer.DeferredList(releases, consumeErrors=True)
        if held:
            log.info("released VIPs {ips}", ips=", ".join(sorted(held)))
        self.locks.clear()
        if self.firewall is not None:
            self.firewall.stop()
        await defer.DeferredList([self.netlink.stop()], consumeErrors=True)

    def _timed(self, d: defer.Deferred) -> defer.Deferred:
        return d.addTimeout(STOP_TIMEOUT, self._reactor)

    def _guarded(self, tick) -> None:
        try:
            tick()
        except Exception:
            log.failure("VIP tick {tick} failed", tick=getattr(tick, "__name__", tick))

    # -- inputs --------------------------------------------------------------

    def _on_configs(self, snapshot) -> None:
        previous = self.invalid_keys
        self.configs, self.invalid_keys = parse_vips(snapshot.values, self._keys.vips)
        for key, error in self.invalid_keys.items():
            if previous.get(key) != error:
                log.error("VIP config skipped: {error}", error=error)
        self._seen["configs"] = True
        self.kick()

    def _on_pods(self, snapshot) -> None:
        """Parse pod groups; a bad value keeps that key's last good containers ([BUG 10])."""
        errors = {}
        current = {}
        for key, raw in snapshot.values.items():
            try:
                current[key] = parse_pod_group(key, raw)
            except InvalidValue as e:
                full = self._keys.pod_groups + key
                errors[full] = f"{full}: {e}"
                if errors[full] != self.pod_errors.get(full):
                    log.error("pod group skipped: {error}", error=errors[full])
                if key in self._pods_good:
                    current[key] = self._pods_good[key]
        self._pods_good = current
        self.pod_errors = errors
        self.containers = ContainerIndex(c for cs in current.values() for c in cs)
        self._seen["pods"] = True
        self.kick()

    def _on_locks(self, snapshot) -> None:
        self.holders, self.members = lock_holders(snapshot.values)
        self._ours_in_snapshot = {ip for ip, holder in self.holders.items() if holder == self.hostname}
        self._seen["locks"] = True
        self.kick()

    def _on_apps(self, snapshot) -> None:
        self.app_keys.observe(snapshot)
        self.kick()

    def _acked(self, lease: int) -> None:
        if self.stopping:
            return
        # A full pass only when the ack changes what we may do; renewals need none.
        changed = lease != self._announced_lease or self._fenced_in_last_pass
        if lease != self._announced_lease:
            self._announce_presence(lease)
        if self.fenced_since is not None and not self.fenced():
            log.info("etcd acknowledges our lease again after {s:.1f}s; contesting VIPs again",
                     s=self._reactor.seconds() - self.fenced_since)
            self.fenced_since = None
            changed = True
        self.keeper.pass_now()  # the deadline moved: renew what needs it
        if changed:
            self.kick()

    def _lease_lost(self) -> None:
        if self.locks:
            log.warn("lease lost: the locks of {ips} are gone", ips=", ".join(sorted(self.locks)))
        self.locks.clear()
        self._confirmed.clear()
        self._announced_lease = None
        self._sync_addresses()
        self.kick()

    def _announce_presence(self, lease: int) -> None:
        self._announced_lease = lease

        def failed(failure):
            if self._announced_lease == lease:
                self._announced_lease = None  # try again on the next ack
            log.warn("could not announce presence: {e}", e=failure.getErrorMessage())

        self._locks.announce(self._member_key(), self.node_ip or "", lease).addErrback(failed)

    def _member_key(self) -> str:
        return f"{self._keys.vip_locks}{MEMBERS}{self.hostname}"

    # -- the pass ------------------------------------------------------------

    def kick(self) -> None:
        """Reconcile soon (coalesced)."""
        if self._kick_call is None or not self._kick_call.active():
            self._kick_call = self._reactor.callLater(0, self._guarded, self._reconcile)

    def _tick(self) -> None:
        """The periodic pass: when something waits on time, else a full one every ANTI_ENTROPY s.

        Every input and every etcd answer already kicks a pass; walking a
        thousand configs twice a second with nothing changed only burns CPU.
        """
        waiting = self._later or self.errors or self._unsettled()
        if waiting or self._clock() - self._last_pass >= ANTI_ENTROPY:
            self._reconcile()

    def _unsettled(self) -> bool:
        """A lock we took that the snapshot has not shown yet, or one of ours we do not know."""
        return not self._confirmed.issuperset(self.locks) or not self._ours_in_snapshot <= self.locks.keys()

    def _reconcile(self) -> None:
        if not self.host_ready or self.stopping:
            return
        self._last_pass = self._clock()
        self._fenced_in_last_pass = self.fenced()
        if self._fenced_in_last_pass:
            self._fence()
        self._forget_lost_locks()
        if all(self._seen.values()) and not self._cleaned:
            self._cleaned = True
            self._remove_leftovers()
        if all(self._seen.values()) and self._cleaned and not self.fenced():
            self._drive_locks()
        self._sync_host()
        self.app_keys.sync(self._desired_app_keys(), self._session.lease)

    def _forget_lost_locks(self) -> None:
        lease = self._session.lease
        now = self._reactor.seconds()
        for ip, held_on in list(self.locks.items()):
            holder = self.holders.get(ip)
            lost = None
            if held_on != lease:
                lost = "lease changed"
            elif holder == self.hostname:
                self._confirmed.add(ip)
            elif ip in self._confirmed:
                lost = "lock deleted" if holder is None else f"lock now held by {holder}"
            elif now - self._acquired_at.get(ip, now) > VERIFY_AFTER:
                self._verify(ip)  # not seen in the snapshot yet: ask etcd
            if lost:
                log.warn("lost the lock of VIP {ip}: {why}", ip=ip, why=lost)
                del self.locks[ip]
                self._confirmed.discard(ip)
        if lease is not None:
            for ip, holder in self.holders.items():
                if holder == self.hostname and ip not in self.locks:
                    self._verify(ip)  # ours on this lease (adopt), or a previous process's (wait)

    def _verify(self, ip: str) -> None:
        """Read the lock: is it on our current lease?  Rate-limited per IP."""
        now = self._reactor.seconds()
        lease = self._session.lease
        if lease is None or ip in self._verifying or now - self._verified_at.get(ip, -1e9) < VERIFY_AFTER:
            return
        self._verifying.add(ip)
        self._verified_at[ip] = now

        def got(kv):
            self._verifying.discard(ip)
            if lease != self._session.lease or self.stopping:
                return
            ours = kv is not None and kv.lease == lease and kv.value.decode(errors="replace") == self.hostname
            if ours:
                if ip not in self.locks:
                    log.info("the lock of VIP {ip} is on our lease {lease:x}: holding it", ip=ip, lease=lease)
                    self.locks[ip] = lease
                    self._acquired_at[ip] = now
                self._confirmed.add(ip)
            elif ip in self.locks and ip not in self._confirmed:
                log.warn("lost the lock of VIP {ip}: {why}", ip=ip,
                         why="it is gone" if kv is None else "it is on another lease")
                del self.locks[ip]
            self.kick()

        def failed(failure):
            self._verifying.discard(ip)
            log.warn("could not read the lock of VIP {ip}: {e}", ip=ip, e=failure.getErrorMessage())

        self._locks.read(self._keys.vip_lock(ip)).addCallbacks(got, failed)

    def _drive_locks(self) -> None:
        held = self.held()
        plan = plan_floating(self.configs, self.containers, self.hostname, self.holders, self.members, held)
        for ip in plan.release:
            self._release(ip, plan.reasons.get(ip, ""))
        for ip in plan.campaign_now:
            self._campaign(ip)
        now = self._reactor.seconds()
        for ip in plan.campaign_later:
            due = self._later.setdefault(ip, now + CAMPAIGN_GRACE)
            if now >= due:
                self._campaign(ip)
        for ip in list(self._later):
            if ip not in plan.campaign_later:
                del self._later[ip]

    def _campaign(self, ip: str) -> None:
        lease = self._session.lease
        if ip in self._campaigning or ip in self.locks or lease is None:
            return
        self._campaigning.add(ip)
        key = self._keys.vip_lock(ip)

        def done(created):
            self._campaigning.discard(ip)
            if created:
                self.locks[ip] = lease
                self._acquired_at[ip] = self._reactor.seconds()
                self._later.pop(ip, None)
                self.errors.pop(ip, None)
                log.info("took the lock of VIP {ip} on lease {lease:x}", ip=ip, lease=lease)
                if self.stopping:
                    self._locks.release(key, lease).addErrback(lambda f: None)
                self.kick()

        def failed(failure):
            self._campaigning.discard(ip)
            self.errors[ip] = f"lock: {failure.getErrorMessage()}"
            log.warn("could not contest VIP {ip}: {e}", ip=ip, e=failure.getErrorMessage())

        self._locks.acquire(key, self.hostname, lease).addCallbacks(done, failed)

    def _release(self, ip: str, reason: str) -> None:
        if ip in self._releasing:
            return
        lease = self.locks.get(ip)
        if lease is None:
            return
        self._releasing.add(ip)
        log.info("releasing VIP {ip}: {why}", ip=ip, why=reason)

        async def release():
            try:
                # Host first: once the lock is gone another node may add the address.
                self._sync_host()
                await self.keeper.removed(ip)
                if self.firewall is not None:
                    await self.firewall.sync()
                await self._locks.release(self._keys.vip_lock(ip), lease)
                if self.locks.get(ip) == lease:
                    del self.locks[ip]
                self._confirmed.discard(ip)
            except Exception as e:
                self.errors[ip] = f"release: {e}"
                log.warn("could not release VIP {ip}: {e}; trying again", ip=ip, e=e)
            finally:
                self._releasing.discard(ip)
                self.kick()

        defer.Deferred.fromCoroutine(release())

    # -- host ----------------------------------------------------------------

    def _active(self) -> dict[str, VipConfig]:
        """Floating VIPs that should be on this host now: held, not fenced, not leaving."""
        if self.stopping or not self.host_ready or self.fenced():
            return {}
        held = self.held()
        active = {}
        for config in self.configs.values():
            if config.floating and config.ip in held and config.ip not in self._releasing:
                if local_container(config, self.containers, self.hostname) is not None:
                    active[config.ip] = config
        return active

    def _desired_app_keys(self) -> frozenset[str]:
        """App keys of the port-scoped keys whose DNAT this node installs."""
        endpoints = app_endpoints(self.configs, self.containers, self.hostname, self.node_ip)
        return frozenset(self._keys.app_key(e.app, e.proc, e.ip, e.port) for e in endpoints)

    def _desired_rules(self) -> frozenset[DnatRule]:
        if self.stopping:
            return frozenset()
        rules = set(port_scoped_rules(self.configs, self.containers, self.hostname, self.node_ip))
        for config in self._active().values():
            container = local_container(config, self.containers, self.hostname)
            rules.update(dnat_rules(config, container, self.node_ip))
        return frozenset(rules)

    def _sync_host(self) -> None:
        self._sync_addresses()
        if self.firewall is not None and self.firewall.applied != self._desired_rules():
            self.firewall.sync()

    def _sync_addresses(self) -> None:
        """Tell the keeper what should be on the interface; it applies that now."""
        self._active_ips = frozenset(self._active())
        self.keeper.want(self._active_ips)
        self.keeper.pass_now()

    # -- safety loops ----------------------------------------------------------

    def _fence_check(self) -> None:
        if self.fenced():
            self._fence()

    def _fence(self) -> None:
        floating = {r for r in (self.firewall.applied if self.firewall else ()) if not self._port_scoped(r)}
        if not self.addresses and not floating:
            return
        if self.fenced_since is None:
            self.fenced_since = self._reactor.seconds()
            self.fencings += 1
            age = self._session.ack_age()
            log.warn("fencing: no keep-alive acknowledged for {age}; dropping VIPs {ips}",
                     age="ever" if age is None else f"{age:.2f}s", ips=", ".join(sorted(self.addresses)) or "-")
        self.arp.cancel_all()
        self._sync_host()

    def _port_scoped(self, rule: DnatRule) -> bool:
        config = self.configs.get(rule.key)
        return config is not None and not config.floating

    def _address_removed(self, ip: str) -> None:
        self.keeper.vanished(ip)

    def _link_up(self) -> None:
        log.info("{iface} is up; announcing held VIPs again", iface=self.interface)
        just = self._justification()
        for ip in list(self.addresses):
            if just.deadline is not None and just.may_hold(ip):
                self.arp.announce(ip)

    def _check_addresses(self) -> None:
        """Read the interface back (networkd.vips.addresses), within a small CPU budget."""
        if not self._seen["configs"] or self.stopping:
            return
        now = self._clock()
        if now < self._next_audit:
            return
        try:
            self.keeper.audit()
        except InterfaceMissing:
            return
        except OSError as e:
            log.warn("could not read the addresses of {iface} back: {e}", iface=self.interface, e=e)
            return
        cost = self._clock() - now
        self._next_audit = now + max(0.0, cost / AUDIT_BUDGET - ADDRESS_CHECK)

    def _remove_leftovers(self) -> None:
        """Startup: configured VIP addresses we do not hold (a crashed predecessor's) go."""
        self._check_addresses()

    def _check_firewall(self) -> None:
        if self.firewall is not None:
            self.firewall.sync(verify=True)

    # -- API -----------------------------------------------------------------

    def status(self) -> list[dict]:
        held = self.held()
        active = self._active()
        applied = self.firewall.applied if self.firewall else frozenset()
        out = []
        for key, config in sorted(self.configs.items()):
            container = local_container(config, self.containers, self.hostname)
            rules = sorted(r for r in applied if r.key == key)
            out.append({
                "key": key,
                "ip": config.ip,
                "port": config.port,
                "floating": config.floating,
                "app": config.app,
                "proc": config.proc,
                "ports": [{"proto": p.proto, "src": p.src, "dest": p.dest} for p in config.ports],
                "excluded_nodes": sorted(config.excluded_nodes),
                "excluded": config.excludes(self.hostname),
                "holder": self.holders.get(config.ip) if config.floating else None,
                "held_by_me": config.floating and config.ip in held,
                "active": config.ip in active,
                "local_container": None if container is None else {
                    "instance": container.instance, "ip": container.container_ip,
                },
                "dnat": [f"{r.ip}:{r.port}/{r.proto} -> {r.to_ip}:{r.to_port}" for r in rules],
                "last_error": self.errors.get(config.ip if config.floating else key) or (
                    f"firewall: {self.firewall.last_error}" if self.firewall and self.firewall.last_error else None),
            })
        for key, error in sorted(self.invalid_keys.items()):
            out.append({"key": key, "error": error, "last_error": error})
        return out
