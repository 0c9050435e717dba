"""The only code that changes interfaces: VIP addresses over rtnetlink.

Addresses are ``<ip>/32`` on one interface, matched exactly ([BUG 18]).

Requests are synchronous on purpose.  The kernel handles an rtnetlink
request inside the ``send`` that carries it, so when ``send`` returns every
request in it has been handled, and any error is already queued: a whole
batch of adds, renewals and removals costs one system call (up to 2,048
requests), no acknowledgements are asked for (only failures are answered),
and nothing is ever queued in this process.  That matters for safety: a
lifetime computed by the caller right before ``apply`` is the lifetime the
kernel starts, not one that waited behind other work (see
networkd.vips.addresses).  The caller is told how long the exchange took.

A second socket listens for address changes and link changes.  Our own
adds and renewals come back as RTM_NEWADDR notifications; a socket filter
drops those (and only those) in the kernel, so holding many VIPs costs no
wake-ups, while an address someone else adds or changes is seen at once.  pyroute2 is
not used here: its requests go through an asyncio queue (the lifetime
would be stale by the time the kernel sees it) and its generic parser
costs far more per message than these few fields (README, "Design choices": netlink).
"""

from __future__ import annotations

import errno
import select
import socket
import time
from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger

from networkd.vips import rtnl

log = Logger()

SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # error acks without a copy of the request
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SO_ATTACH_FILTER = 26
RECEIVE_BUFFER = 4 << 20
SEND_BUFFER = 1 << 20
CHUNK = 2048  # requests per datagram (120 KiB): a whole batch is handled in one system call
REPLY_WAIT = 0.2  # seconds to wait for a reply that, by the protocol, is already there


class InterfaceMissing(Exception):
    """The VIP interface does not exist (yet)."""


def _socket(groups: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SEND_BUFFER)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    try:
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
    except OSError:
        pass
    sock.bind((0, groups))
    sock.setblocking(False)
    return sock


class Netlink:
    """Addresses on one interface, plus events about it."""

    def __init__(self, interface: str, reactor=None, clock: Callable[[], float] = time.monotonic):
        self.interface = interface
        self._reactor = reactor
        self._clock = clock
        self.index: int | None = None
        self.mac: bytes | None = None
        self.link_up: bool | None = None
        self._requests: socket.socket | None = None
        self._events: _EventReader | None = None
        self._seq = 0
        self.on_address_removed: Callable[[str, int], None] = lambda ip, lifetime_left: None
        self.on_address_added: Callable[[str], None] = lambda ip: None  # by someone else (or changed)
        self.on_link_up: Callable[[], None] = lambda: None
        self.on_events_lost: Callable[[], None] = lambda: None
        self.last_exchange = 0.0  # seconds the newest apply() took
        self.last_span = 0.0  # seconds from the first request of the newest apply() reaching the kernel to the last

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> defer.Deferred:
        self._requests = _socket()
        if self._reactor is not None:
            self._events = _EventReader(self, self.port)
            self._reactor.addReader(self._events)
        try:
            self.lookup()
        except InterfaceMissing as e:
            log.warn("{e}; VIPs wait for it", e=e)
        return defer.succeed(None)

    @property
    def port(self) -> int:
        """The netlink port id of our request socket: the kernel stamps it on what our requests cause."""
        return self._requests.getsockname()[0]

    @property
    def sees_others_adds(self) -> bool:
        """Whether addresses added by others arrive as events (the socket filter is on); if not,
        only reading the interface back finds them."""
        return self._events is not None and self._events.filtered

    def stop(self) -> defer.Deferred:
        if self._events is not None:
            self._reactor.removeReader(self._events)
            self._events.close()
            self._events = None
        if self._requests is not None:
            self._requests.close()
            self._requests = None
        return defer.succeed(None)

    # -- requests ------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq = (self._seq % 0x7FFFFFFF) + 1
        return self._seq

    def _exchange(self, packed: list[tuple[int, bytes]]) -> dict[int, int]:
        """Send ``(seq, message)`` pairs, CHUNK per datagram; return seq -> errno (0 = done).

        The requests ask for no acknowledgement: when ``send`` returns, the
        kernel has handled every one of them, and only failures were answered.
        """
        results: dict[int, int] = {}
        chunks = [packed[start:start + CHUNK] for start in range(0, len(packed), CHUNK)]
        datagrams = [b"".join(message for _, message in chunk) for chunk in chunks]  # packed before the clock starts
        first_sent = self._clock()
        for chunk, datagram in zip(chunks, datagrams):
            try:
                self._requests.send(datagram)
            except OSError as e:
                results.update((seq, e.errno or errno.EIO) for seq, _ in chunk)
                continue
            self.last_span = self._clock() - first_sent
            results.update((seq, 0) for seq, _ in chunk)
            try:
                errors = self._errors_queued()
            except OSError as e:  # ENOBUFS: answers were lost, so nothing is known of this chunk
                log.error("netlink answers were lost ({e}); trying again", e=e)
                results.update((seq, errno.EIO) for seq, _ in chunk)
                continue
            results.update((seq, code) for seq, code in errors.items() if seq in results)
        return results

    def _errors_queued(self) -> dict[int, int]:
        """seq -> errno of the error answers already in the socket (none waited for)."""
        errors = {}
        while True:
            try:
                data = self._requests.recv(1 << 16)
            except BlockingIOError:
                return errors
            for message in rtnl.messages(data):
                if message.type == rtnl.NLMSG_ERROR:
                    errors[message.seq] = rtnl.error_code(message)

    def _read(self) -> bytes | None:
        """The next datagram of replies; None if none came within REPLY_WAIT (it should be there)."""
        deadline = time.monotonic() + REPLY_WAIT
        while True:
            try:
                return self._requests.recv(1 << 16)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                select.select([self._requests], [], [], left)

    def _answers(self, seq: int):
        """The messages answering request ``seq`` (already sent), as they are read; ends when none came."""
        while True:
            data = self._read()
            if data is None:
                return
            for message in rtnl.messages(data):
                if message.seq == seq:
                    yield message

    def lookup(self) -> int:
        """The interface index (cached; link events and ENODEV clear it)."""
        if self.index is not None:
            return self.index
        seq = self._next_seq()
        self._requests.send(rtnl.get_link(seq, self.interface))
        for message in self._answers(seq):
            if message.type == rtnl.NLMSG_ERROR:
                code = rtnl.error_code(message)
                if code in (errno.ENODEV, errno.ENOENT):
                    raise InterfaceMissing(f"interface {self.interface!r} does not exist")
                raise rtnl.NetlinkError(code, f"looking up {self.interface}: {errno.errorcode.get(code, code)}")
            link = rtnl.parse_link(message)
            if link is not None:
                self.index, self.mac, self.link_up = link.index, link.mac, link.up
                return self.index
        raise rtnl.NetlinkError(errno.ETIMEDOUT, f"no answer looking up {self.interface}")

    def apply(self, removals: list[str], puts: list[tuple[str, int]]) -> dict[str, int]:
        """Remove, then add or renew (``(ip, lifetime seconds)``), in one exchange.

        Returns ip -> errno (0 done; for a removal, EADDRNOTAVAIL means it
        was already gone).  ``last_exchange`` says how long it took.
        """
        started = self._clock()
        self.last_span = 0.0
        try:
            index = self.lookup()
        except InterfaceMissing:
            self.last_exchange = self._clock() - started
            return {**{ip: errno.EADDRNOTAVAIL for ip in removals}, **{ip: errno.ENODEV for ip, _ in puts}}
        seqs: dict[int, str] = {}
        packed = []
        for ip in removals:
            seq = self._next_seq()
            seqs[seq] = ip
            packed.append((seq, rtnl.delete_address(seq, index, ip)))
        for ip, lifetime in puts:
            seq = self._next_seq()
            seqs[seq] = ip
            packed.append((seq, rtnl.put_address(seq, index, ip, max(1, int(lifetime)))))
        results = self._exchange(packed)
        self.last_exchange = self._clock() - started
        if errno.ENODEV in results.values():
            self.index = None
        return {seqs[seq]: code for seq, code in results.items()}

    def addresses(self) -> list[rtnl.Address]:
        """The IPv4 ``/32`` addresses on the interface now, with their cache info."""
        index = self.lookup()
        seq = self._next_seq()
        self._requests.send(rtnl.dump_addresses(seq))
        found = []
        for message in self._answers(seq):
            if message.type == rtnl.NLMSG_DONE:
                return found
            if message.type == rtnl.NLMSG_ERROR:
                code = rtnl.error_code(message)
                raise rtnl.NetlinkError(code, f"address dump: {errno.errorcode.get(code, code)}")
            if message.type == rtnl.RTM_NEWADDR:
                address = rtnl.parse_address(message)
                if address is not None and address.index == index and address.prefixlen == 32:
                    found.append(address)
        raise rtnl.NetlinkError(errno.ETIMEDOUT, "address dump did not finish")

    # -- events --------------------------------------------------------------

    def _event(self, message: rtnl.Message) -> None:
        if message.type == rtnl.RTM_DELADDR:
            address = rtnl.parse_address(message)
            if address is not None and address.index == self.index and address.prefixlen == 32:
                self.on_address_removed(address.ip, address.valid)  # valid: its lifetime left, 0 if it ran out
        elif message.type == rtnl.RTM_NEWADDR and self.sees_others_adds:  # not ours: the filter drops those
            address = rtnl.parse_address(message)
            if address is not None and address.index == self.index and address.prefixlen == 32:
                self.on_address_added(address.ip)
        elif message.type in (rtnl.RTM_NEWLINK, rtnl.RTM_DELLINK):
            link = rtnl.parse_link(message)
            if link is None or (link.name != self.interface and link.index != self.index):
                return
            if message.type == rtnl.RTM_DELLINK:
                self.index, self.link_up = None, False
                return
            was, self.link_up = self.link_up, link.up
            if link.name == self.interface and link.index != self.index:
                self.index = None  # recreated: look it up again
            elif link.mac:
                self.mac = link.mac
            if link.up and not was:
                self.on_link_up()


def drain(sock: socket.socket, datagram: Callable[[bytes], None], lost: Callable[[], None],
          limit: int = 256) -> None:
    """Hand what a notification socket holds to ``datagram``, at most ``limit`` datagrams a reactor
    turn; a receive overrun (ENOBUFS: the kernel dropped notifications) is told to ``lost``."""
    for _ in range(limit):
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                raise
            lost()
            continue
        datagram(data)


class _EventReader:
    """The notification socket, read by the reactor."""

    def __init__(self, netlink: Netlink, own_port: int):
        self._netlink = netlink
        self._sock = _socket(rtnl.RTMGRP_IPV4_IFADDR | rtnl.RTMGRP_LINK)
        self.filtered = False
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, _filter_program(own_port))
            self.filtered = True
        except OSError as e:
            log.info("netlink event filter not attached ({e}); renewals will wake us, and addresses "
                     "added by others are found by reading the interface back", e=e)

    def fileno(self) -> int:
        return self._sock.fileno()

    def logPrefix(self) -> str:
        return "netlink events"

    def doRead(self) -> None:
        drain(self._sock, self._datagram, self._lost)

    def _datagram(self, data: bytes) -> None:
        for message in rtnl.messages(data):
            try:
                self._netlink._event(message)
            except Exception:
                log.failure("netlink event handler failed")

    def _lost(self) -> None:
        log.warn("netlink events were lost; checking the interface")
        self._netlink.on_events_lost()

    def connectionLost(self, reason) -> None:
        pass

    def close(self) -> None:
        self._sock.close()


def _filter_program(own_port: int):
    """A ``struct sock_fprog`` for SO_ATTACH_FILTER; the bytes must outlive the call only."""
    import ctypes

    code = rtnl.drop_own_filter(rtnl.RTM_NEWADDR, own_port)
    buffer = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    program = SockFprog(len(code) // 8, ctypes.addressof(buffer))
    _filter_program.keep = buffer  # setsockopt copies it; keep it alive until then
    return bytes(ctypes.string_at(ctypes.addressof(program), ctypes.sizeof(program)))
