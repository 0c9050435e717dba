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
phase of its own (a hash of its address) within the interval: a thousand
VIPs acquired together are not re-announced together.
"""

from __future__ import annotations

import socket
import struct
import zlib

from twisted.logger import Logger

log = Logger()

ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6
REPEATS = (1.0, 3.0)
ROUND_STEPS = 10  # an announcement round sends its VIPs in this many steps over its window


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
        self._pending: dict[str, list] = {}
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
            phase = (zlib.crc32(ip.encode()) % 1000) / 1000 * self.refresh_every
            self._pending[ip].append(self._reactor.callLater(self.refresh_every + phase, self._refresh, ip))

    def _repeat(self, ip: str) -> None:
        if self.allowed(ip):
            self.send(ip)

    def _refresh(self, ip: str) -> None:
        """The periodic announcement: again in ``refresh_every`` (while the VIP is ours)."""
        calls = self._pending.get(ip)
        if calls is None:
            return
        calls[:] = [c for c in calls if c.active()]
        calls.append(self._reactor.callLater(self.refresh_every, self._refresh, ip))
        self._repeat(ip)

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

    def cancel_all(self) -> None:
        self._cancel_round()
        for ip in list(self._pending):
            self.cancel(ip)
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
