"""Gratuitous ARP: tell the LAN at once that a VIP moved here.

Frames go out of a raw AF_PACKET socket on the reactor thread (a send is a
few microseconds, so the first packet leaves within a millisecond of the
address being added).  Both forms are sent, because switches and hosts
differ in which they honour: an ARP request for the VIP from the VIP
(``arping -U``) and an ARP reply (``arping -A``).  Repeated after 1 s and
3 s.  A failure is logged, never fatal ([BUG 19]).

``announce_round`` announces many VIPs once more, spread over a short window
(a tenth of them at a time), when the link comes up or etcd answers again
after an outage: switches and routers that missed frames meanwhile learn
where the VIPs are, and a thousand VIPs do not go out in one burst.

With ``refresh_every`` (``--garp-interval``) every held VIP is announced
again periodically, so switches and routers that missed the first frames
converge without waiting for their ARP cache to expire.  Each VIP keeps a
phase (a hash of its address) within the interval: a thousand VIPs
acquired together are not re-announced together.  VIPs use as few phases as
``REFRESH_PER_STEP`` allows, each one reactor wake-up an interval: a node's
hundred VIPs cost four wake-ups a minute, not a hundred (one timer per VIP
was 1.7 wake-ups a second at rest; each costs ~0.2 ms of CPU on a VM).
"""

from __future__ import annotations

import math
import socket
import struct
import zlib

from twisted.logger import Logger

log = Logger()

ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6
REPEATS = (1.0, 3.0)
ROUND_STEPS = 10  # an announcement round sends its VIPs in this many steps over its window
REFRESH_SLOTS = 20  # phases of the refresh interval at most
REFRESH_PER_STEP = 32  # VIPs a phase takes before another phase is used


def gratuitous_frames(mac: bytes, ip: str) -> tuple[bytes, bytes]:
    """(request, reply) Ethernet frames announcing ``ip`` at ``mac``."""
    spa = socket.inet_aton(ip)
    frames = []
    for op, tha in ((1, b"\x00" * 6), (2, BROADCAST)):
        arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, mac, spa, tha, spa)
        frames.append(BROADCAST + mac + struct.pack("!H", ETH_P_ARP) + arp)
    return frames[0], frames[1]


class Announcer:
    """Sends gratuitous ARP for VIPs on one interface."""

    def __init__(self, reactor, interface: str, mac_of=lambda: None, repeats=REPEATS, refresh_every: float = 0):
        self._reactor = reactor
        self.interface = interface
        self._mac_of = mac_of
        self._repeats = repeats
        self.refresh_every = refresh_every  # seconds between periodic announcements (0: none)
        self._pending: dict[str, list] = {}  # ip -> its repeats
        self._refreshed: dict[str, float] = {}  # ip announced periodically -> not before this time
        self._slots: list[set[str]] = [set() for _ in range(REFRESH_SLOTS)]
        self._phases = 0  # slots in use, spread evenly over the interval
        self._refresh_call = None
        self._refresh_index = 0  # the step the refresh timer fires at (step = refresh_every / REFRESH_SLOTS)
        self.allowed = lambda ip: True  # checked before every repeat: a fenced node stays quiet
        self.sent = 0
        self.failures = 0
        self._socket: socket.socket | None = None
        self._round: list[list[str]] = []  # the steps of the announcement round still to send
        self._round_call = None

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def announce(self, ip: str) -> None:
        """Send now, and schedule the repeats (replacing earlier ones for ``ip``)."""
        self.cancel(ip)
        self.send(ip)
        self._pending[ip] = [self._reactor.callLater(delay, self._repeat, ip) for delay in self._repeats]
        if self.refresh_every > 0:
            self._refreshed[ip] = self._reactor.seconds() + self.refresh_every - 1e-6
            self._rephase(ip)

    def _repeat(self, ip: str) -> None:
        if self.allowed(ip):
            self.send(ip)

    # -- periodic announcements ----------------------------------------------------

    def _rephase(self, added: str | None = None) -> None:
        """Put ``added`` in its phase's slot, or every VIP when the number of phases changes."""
        phases = min(REFRESH_SLOTS, math.ceil(len(self._refreshed) / REFRESH_PER_STEP))
        if phases != self._phases:
            self._phases = phases
            self._slots = [set() for _ in range(REFRESH_SLOTS)]
            for ip in self._refreshed:
                self._slots[self._slot_of(ip)].add(ip)
        elif added is not None:
            self._slots[self._slot_of(added)].add(added)
        if not self._refreshed:
            self._stop_refresh()
        elif self._refresh_call is None:
            self._refresh_index = int(self._reactor.seconds() / self._refresh_step())
            self._schedule_refresh()

    def _slot_of(self, ip: str) -> int:
        return (zlib.crc32(ip.encode()) % self._phases) * REFRESH_SLOTS // self._phases

    def _refresh_step(self) -> float:
        return self.refresh_every / REFRESH_SLOTS

    def _schedule_refresh(self) -> None:
        """The next step whose slot holds a VIP (empty slots are skipped: no wake-up for them)."""
        ahead = 1
        while ahead < REFRESH_SLOTS and not self._slots[(self._refresh_index + ahead) % REFRESH_SLOTS]:
            ahead += 1
        self._refresh_index += ahead
        due = self._refresh_index * self._refresh_step()  # absolute: the steps do not drift
        self._refresh_call = self._reactor.callLater(max(0.0, due - self._reactor.seconds()), self._refresh)

    def _refresh(self) -> None:
        """The periodic announcement of one phase's VIPs (each one an interval after its acquisition
        at the earliest: the repeats at +1 s and +3 s cover the start)."""
        self._refresh_call = None
        now = self._reactor.seconds()
        for ip in sorted(self._slots[self._refresh_index % REFRESH_SLOTS]):
            if now >= self._refreshed.get(ip, math.inf):
                self._repeat(ip)
        if self._refreshed:
            self._schedule_refresh()

    def _stop_refresh(self) -> None:
        if self._refresh_call is not None and self._refresh_call.active():
            self._refresh_call.cancel()
        self._refresh_call = None

    def announce_round(self, ips, window: float = 1.0) -> None:
        """Announce each of ``ips`` once more within ``window`` (a new round replaces one under way);
        ``allowed`` is asked right before each frame."""
        self._cancel_round()
        ips = sorted(ips)
        steps = min(ROUND_STEPS, len(ips))
        self._round = [ips[k::steps] for k in range(steps)]
        if self._round:
            self._round_step(window / steps)

    def _round_step(self, every: float) -> None:
        self._round_call = None
        for ip in self._round.pop(0):
            self._repeat(ip)
        if self._round:
            self._round_call = self._reactor.callLater(every, self._round_step, every)

    def _cancel_round(self) -> None:
        if self._round_call is not None and self._round_call.active():
            self._round_call.cancel()
        self._round_call, self._round = None, []

    def cancel(self, ip: str) -> None:
        for call in self._pending.pop(ip, []):
            if call.active():
                call.cancel()
        if self._refreshed.pop(ip, None) is not None:
            self._slots[self._slot_of(ip)].discard(ip)
            self._rephase()

    def cancel_all(self) -> None:
        self._cancel_round()
        for ip in list(self._pending):
            self.cancel(ip)
        self._stop_refresh()
        self.close()

    def send(self, ip: str) -> bool:
        mac = self._mac_of()
        if not mac or len(mac) != 6:
            self.failures += 1
            log.warn("gratuitous ARP for {ip}: no MAC address on {iface}", ip=ip, iface=self.interface)
            return False
        try:
            if self._socket is None:
                # Protocol 0 and no bind: binding a packet socket to a protocol waits for an
                # RCU grace period (~10 ms) in the kernel; sendto with an address does not.
                self._socket = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            for frame in gratuitous_frames(mac, ip):
                self._socket.sendto(frame, (self.interface, ETH_P_ARP))
        except OSError as e:
            self.close()
            self.failures += 1
            log.warn("gratuitous ARP for {ip} on {iface} failed: {e}", ip=ip, iface=self.interface, e=e)
            return False
        self.sent += 1
        return True
