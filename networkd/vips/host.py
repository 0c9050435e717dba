"""The host side of VIPs: addresses on the interface, gratuitous ARP, DNAT rules.

The reconciler decides *what* should be on the host; this module puts it
there and reads it back.  Addresses go through the address keeper
(networkd.vips.addresses: lifetimes from the lease deadline, justified at
send time), rules through the firewall driver (networkd.vips.firewall, off
the reactor).  Order matters on the way out: address and rules first, so
the lock may go after.
"""

from __future__ import annotations

from typing import Callable, Iterable

from twisted.internet import defer
from twisted.logger import Logger

from networkd.vips import firewall as fw
from networkd.vips.firewall.nfevents import NatChanges
from networkd.vips.addresses import AddressKeeper, Justification
from networkd.vips.arp import Announcer
from networkd.vips.netlink import InterfaceMissing, Netlink
from networkd.vips.planner import DnatRule
from networkd.vips.readback import ReadBackBudget

log = Logger()

ADDRESS_CHECK = 1.0  # read-back of addresses (less often while one costs more than AUDIT_BUDGET of a CPU)
ADDRESS_RECHECK = 10.0  # the same when addresses added by others arrive as events: only anti-entropy
EVENT_AUDIT_DELAY = 0.05  # an address someone else added is read back this soon (coalescing a burst)
AUDIT_BUDGET = 0.002
FIREWALL_CHECK = 5.0  # read-back of iptables, likewise within AUDIT_BUDGET
FIREWALL_RECHECK = 60.0  # the same where nf_tables announces every change to the nat table
FIREWALL_EVENT_DELAY = 0.1  # a nat table change is read back this soon (coalescing a burst)
FIREWALL_BURST = 0.05  # seconds of iptables read-back that may be spent at once (our own writes are changes too)
ANNOUNCE_WINDOW = 1.0  # seconds over which every held VIP is announced again (link up, etcd back)


class VipHost:
    def __init__(self, *, reactor, interface: str, clock: Callable[[], float],
                 justify: Callable[[], Justification], renew_ahead: float, managed: Callable[[], Iterable[str]],
                 desired_rules: Callable[[], frozenset[DnatRule]], to_thread,
                 netlink: Netlink | None = None, announcer: Announcer | None = None, garp_interval: float = 0):
        self._reactor = reactor
        self.interface = interface
        self._clock = clock
        self._justify = justify
        self._desired_rules = desired_rules
        self._to_thread = to_thread
        self.netlink = netlink or Netlink(interface, reactor, clock)
        self.arp = announcer or Announcer(reactor, interface, lambda: self.netlink.mac, refresh_every=garp_interval)
        self.keeper = AddressKeeper(reactor=reactor, netlink=self.netlink, clock=clock, justify=justify,
                                    renew_ahead=renew_ahead, on_added=self._added, on_removed=self._removed,
                                    managed=managed)
        self.on_change: Callable[[str, bool], None] = lambda ip, added: None  # networkd.vips.notify
        if hasattr(self.arp, "allowed"):
            self.arp.allowed = self.may_announce
        self.firewall: fw.Firewall | None = None
        self._to_announce: dict[str, object] = {}  # ip -> the call that announces it (next reactor turn)
        self._address_budget = ReadBackBudget(clock, AUDIT_BUDGET, ADDRESS_CHECK * AUDIT_BUDGET)
        self._firewall_budget = ReadBackBudget(clock, AUDIT_BUDGET, FIREWALL_BURST)
        self._firewall_checks = 0  # read-backs of our chains under way
        self._event_audit = None  # the read-back an address added by someone else asked for
        self._nat_changes: NatChanges | None = None  # nf_tables hosts: changes to the nat table, as they happen
        self._event_verify = None  # the read-back a nat table change asked for

    @property
    def addresses(self) -> set[str]:
        """Addresses we put on the interface (and that are still there, as far as we know)."""
        return set(self.keeper.placed)

    def _added(self, ip: str, life: int) -> None:
        """On the interface, and still justified: announced on the next reactor turn, after whatever
        already arrived (a lost lock, a removal event), and only if it is still here and ours by then."""
        if ip not in self._to_announce:
            self._to_announce[ip] = self._reactor.callLater(0, self._announce, ip, life)

    def _announce(self, ip: str, life: int) -> None:
        del self._to_announce[ip]
        if not self.may_announce(ip):
            log.info("VIP {ip} is no longer ours to hold: not announced", ip=ip)
            return
        log.info("VIP {ip} is on the interface (lifetime {life}s), announced", ip=ip, life=life)
        self.arp.announce(ip)
        self.on_change(ip, True)

    def _removed(self, ip: str) -> None:
        self.arp.cancel(ip)
        call = self._to_announce.pop(ip, None)
        if call is not None and call.active():
            call.cancel()  # never announced nor reported as acquired: nothing to take back
            log.info("VIP {ip} left the interface before it was announced: not announced", ip=ip)
            return
        self.on_change(ip, False)

    def may_announce(self, ip: str) -> bool:
        just = self._justify()
        return just.deadline is not None and self.keeper.holds(ip) and just.may_hold(ip)

    # -- lifecycle -----------------------------------------------------------

    async def start(self, choice, on_link_up: Callable[[], None], on_removed: Callable[[str], None]) -> str:
        """Our chains from scratch and the netlink sockets open; returns the firewall back end's name."""
        backend = await self._make_backend(choice)
        self.firewall = fw.Firewall(self._reactor, backend, self._desired_rules, to_thread=self._to_thread)
        if backend.name == "nft":
            self._listen_to_nat_changes()
        self.netlink.on_address_removed = on_removed
        self.netlink.on_link_up = on_link_up
        self.netlink.on_events_lost = self.audit
        self.netlink.on_address_added = self._added_by_others
        await self.netlink.start()
        self.firewall.reset()  # before contesting anything
        await self.firewall.sync()
        return backend.name

    async def _make_backend(self, choice):
        if not isinstance(choice, str):
            return choice
        name = await self._to_thread(fw.detect_backend, choice)
        try:
            return await self._to_thread(fw.make_backend, name)
        except Exception as e:
            log.error("firewall back end {name} unusable ({e}); using iptables-restore instead", name=name, e=e)
            return fw.RestoreBackend(name)

    async def stop(self) -> None:
        """Everything off the host (the justification now allows nothing)."""
        self.arp.cancel_all()
        self.keeper.want(frozenset())
        self.keeper.pass_now()
        if self.firewall is not None:
            await defer.DeferredList([self.firewall.sync()], consumeErrors=True)

    async def close(self) -> None:
        for call in (self._event_audit, self._event_verify):
            if call is not None and call.active():
                call.cancel()
        if self._nat_changes is not None:
            self._nat_changes.close()
            self._nat_changes = None
        if self.firewall is not None:
            self.firewall.stop()
        await defer.DeferredList([self.netlink.stop()], consumeErrors=True)

    # -- making the host match -------------------------------------------------

    def apply(self, active: frozenset[str]) -> None:
        """These floating VIPs' addresses, and the rules ``desired_rules()`` says, now."""
        self.keeper.want(active)
        self.keeper.pass_now()
        if self.firewall is not None and self.firewall.applied != self._desired_rules():
            self.firewall.sync()

    async def cleared(self, ip: str) -> None:
        """Fires once ``ip``'s address is off the interface and the rules reflect that."""
        await self.keeper.removed(ip)
        if self.firewall is not None:
            await self.firewall.sync()

    def fence(self) -> None:
        self.arp.cancel_all()
        self.apply(frozenset())

    def floating_rules(self, is_port_scoped: Callable[[str], bool]) -> list[DnatRule]:
        return [r for r in (self.firewall.applied if self.firewall else ()) if not is_port_scoped(r.key)]

    def announce_all(self, why: str = "") -> None:
        """The link came up, or etcd answers again after an outage: tell the LAN again where our VIPs are,
        spread over ANNOUNCE_WINDOW (each still asked ``may_announce`` right before its frames)."""
        log.info("{why}; announcing held VIPs again", why=why or f"{self.interface} is up")
        self.arp.announce_round(self.addresses, ANNOUNCE_WINDOW)

    # -- reading back ------------------------------------------------------------

    def audit_every(self) -> float:
        """Seconds between periodic read-backs: a slow anti-entropy pass when the addresses others
        add wake us (networkd.vips.netlink), else the read-back is how we find them."""
        return ADDRESS_RECHECK if self.netlink.sees_others_adds else ADDRESS_CHECK

    def _added_by_others(self, ip: str) -> None:
        """Someone else added or changed a /32 on our interface: read it back soon (it may be a VIP
        we do not hold, or one of ours given a longer lifetime than the lease allows)."""
        self._event_audit = self._soon(self._event_audit, EVENT_AUDIT_DELAY, self._address_budget.due(), self.audit)

    def audit(self) -> None:
        """Addresses read back (networkd.vips.addresses), within a small CPU budget."""
        now = self._clock()
        if now < self._address_budget.due():
            return
        try:
            self.keeper.audit()
        except InterfaceMissing:
            return
        except OSError as e:
            log.warn("could not read the addresses of {iface} back: {e}", iface=self.interface, e=e)
            return
        finally:
            self._address_budget.spent(now, self._clock() - now)

    def _listen_to_nat_changes(self) -> None:
        changes = NatChanges(self._reactor, self._nat_changed)
        try:
            changes.open()
        except OSError as e:
            log.info("nf_tables changes cannot be listened to ({e}); our chains are read back every {s:.0f}s",
                     e=e, s=FIREWALL_CHECK)
            return
        self._nat_changes = changes

    def firewall_every(self) -> float:
        """Seconds between periodic read-backs of our chains: a slow anti-entropy pass where nf_tables
        tells us of every change to the nat table, else the read-back is how we find a flush."""
        return FIREWALL_RECHECK if self._nat_changes is not None else FIREWALL_CHECK

    def _nat_changed(self) -> None:
        """Someone (maybe us) changed the nat table: read our chains back soon, within the budget."""
        due = 0.0 if self._firewall_checks else self._firewall_budget.due()
        self._event_verify = self._soon(self._event_verify, FIREWALL_EVENT_DELAY, due, self.verify_firewall, True)

    def _soon(self, pending, delay: float, budget_due: float, f, *args):
        """The read-back an event asks for: ``pending`` if it has not run yet (a burst of events is one
        read-back), else ``f(*args)`` in ``delay`` seconds, or when the CPU budget allows if later."""
        if pending is not None and pending.active():
            return pending
        return self._reactor.callLater(max(delay, budget_due - self._clock()), f, *args)

    def verify_firewall(self, changed: bool = False) -> None:
        """Read our chains back and rewrite them if they drifted, within the same CPU budget
        (``changed``: the nat table changed; a read-back under way folds this one in)."""
        now = self._clock()
        if self.firewall is None:
            return
        if not changed and (self._firewall_checks or now < self._firewall_budget.due()):
            return
        self._firewall_checks += 1

        def done(_):
            self._firewall_checks -= 1
            self._firewall_budget.spent(now, self._clock() - now)

        self.firewall.sync(verify=True).addBoth(done)
