"""rtnetlink messages for IPv4 addresses and links: packing and parsing, no I/O.

Only what the VIP path needs: add/replace and delete an ``<ip>/32`` with a
lifetime, dump addresses (with their cache info: remaining lifetime and
the kernel's timestamp), get a link by name, and read address and link
notifications.  The layouts are Linux's ``<linux/netlink.h>``,
``<linux/rtnetlink.h>``, ``<linux/if_addr.h>`` and ``<linux/if_link.h>``;
pyroute2 is the tests' independent reference parser.

Kept apart from the socket code so that a whole batch of requests is
packed in microseconds, right before the one ``send`` that carries it.
"""

from __future__ import annotations

import socket
import struct
import sys
from dataclasses import dataclass
from typing import Iterator

# <linux/netlink.h>
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_REPLACE = 0x100
NLM_F_DUMP = 0x300
NLM_F_CREATE = 0x400
# <linux/rtnetlink.h>
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
# <linux/if_addr.h>
IFA_ADDRESS, IFA_LOCAL, IFA_CACHEINFO = 1, 2, 6
IFA_F_PERMANENT = 0x80
# <linux/if_link.h>
IFLA_ADDRESS, IFLA_IFNAME = 1, 3
IFF_UP, IFF_RUNNING = 0x1, 0x40
FOREVER = 0xFFFFFFFF

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_ATTR = struct.Struct("=HH")  # rtattr: len, type
_CACHEINFO = struct.Struct("=IIII")  # ifa_cacheinfo: preferred, valid, cstamp, tstamp


@dataclass(frozen=True)
class Message:
    type: int
    flags: int
    seq: int
    body: bytes


@dataclass(frozen=True)
class Address:
    """One IPv4 address as the kernel reports it."""

    ip: str
    prefixlen: int
    index: int
    valid: int  # seconds left (FOREVER: permanent)
    tstamp: int  # hundredths of a second since boot, when its lifetime was last set
    flags: int


@dataclass(frozen=True)
class Link:
    index: int
    name: str | None
    mac: bytes | None
    flags: int

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP) and bool(self.flags & IFF_RUNNING)


class NetlinkError(OSError):
    """The kernel refused a request (``errno`` is its error code)."""


def _attr(kind: int, payload: bytes) -> bytes:
    length = _ATTR.size + len(payload)
    return _ATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def _message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return _HEADER.pack(_HEADER.size + len(body), kind, flags, seq, 0) + body


_PUT = struct.Struct("=IHHII" "BBBBI" "HH4s" "HH4s" "HHIIII")  # header, ifaddrmsg, local, address, cacheinfo
_DELETE = struct.Struct("=IHHII" "BBBBI" "HH4s" "HH4s")


def put_address(seq: int, index: int, ip: str, lifetime: int) -> bytes:
    """Add ``ip/32``, or replace its lifetime if present (the kernel clock starts on receipt).

    No acknowledgement is asked for: the kernel handles the request inside
    the ``send`` and answers only an error, so a batch costs one system call.
    """
    packed = socket.inet_aton(ip)
    return _PUT.pack(_PUT.size, RTM_NEWADDR, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE, seq, 0,
                     socket.AF_INET, 32, 0, 0, index, 8, IFA_LOCAL, packed, 8, IFA_ADDRESS, packed,
                     20, IFA_CACHEINFO, lifetime, lifetime, 0, 0)


def delete_address(seq: int, index: int, ip: str) -> bytes:
    packed = socket.inet_aton(ip)
    return _DELETE.pack(_DELETE.size, RTM_DELADDR, NLM_F_REQUEST, seq, 0,
                        socket.AF_INET, 32, 0, 0, index, 8, IFA_LOCAL, packed, 8, IFA_ADDRESS, packed)


def dump_addresses(seq: int) -> bytes:
    return _message(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, _IFADDR.pack(socket.AF_INET, 0, 0, 0, 0))


def get_link(seq: int, name: str) -> bytes:
    body = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _attr(IFLA_IFNAME, name.encode() + b"\0")
    return _message(RTM_GETLINK, NLM_F_REQUEST, seq, body)


def messages(data: bytes) -> Iterator[Message]:
    """The netlink messages in one datagram; a truncated tail is ignored."""
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, flags, seq, _ = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > len(data):
            return
        yield Message(kind, flags, seq, data[offset + _HEADER.size: offset + length])
        offset += (length + 3) & ~3


def error_code(message: Message) -> int:
    """For an NLMSG_ERROR: 0 is an acknowledgement, else a positive errno."""
    (code,) = struct.unpack_from("=i", message.body)
    return -code


def attributes(body: bytes, offset: int) -> Iterator[tuple[int, bytes]]:
    while offset + _ATTR.size <= len(body):
        length, kind = _ATTR.unpack_from(body, offset)
        if length < _ATTR.size:
            return
        yield kind & 0x3FFF, body[offset + _ATTR.size: offset + length]
        offset += (length + 3) & ~3


def parse_address(message: Message) -> Address | None:
    """An RTM_NEWADDR/RTM_DELADDR body; None if not IPv4 or malformed.  (A dump of
    a thousand addresses is parsed every few seconds: kept to plain unpacking.)"""
    body = message.body
    if len(body) < 8:
        return None
    family, prefixlen, flags, _, index = _IFADDR.unpack_from(body)
    if family != socket.AF_INET:
        return None
    ip = local = None
    valid, tstamp = FOREVER, 0
    offset, end = 8, len(body)
    while offset + 4 <= end:
        length, kind = _ATTR.unpack_from(body, offset)
        if length < 4:
            break
        kind &= 0x3FFF
        if kind == IFA_LOCAL and length == 8:
            local = socket.inet_ntoa(body[offset + 4: offset + 8])
        elif kind == IFA_ADDRESS and length == 8:
            ip = socket.inet_ntoa(body[offset + 4: offset + 8])
        elif kind == IFA_CACHEINFO and length >= 20:
            _, valid, _, tstamp = _CACHEINFO.unpack_from(body, offset + 4)
        offset += (length + 3) & ~3
    if local is None and ip is None:
        return None
    return Address(local or ip, prefixlen, index, valid, tstamp, flags)


def parse_link(message: Message) -> Link | None:
    if len(message.body) < _IFINFO.size:
        return None
    _, _, index, flags, _ = _IFINFO.unpack_from(message.body)
    name = mac = None
    for kind, payload in attributes(message.body, _IFINFO.size):
        if kind == IFLA_IFNAME:
            name = payload.split(b"\0", 1)[0].decode(errors="replace")
        elif kind == IFLA_ADDRESS:
            mac = bytes(payload)
    return Link(index, name, mac, flags)


def drop_own_filter(kind: int, portid: int) -> bytes:
    """A classic BPF program (for SO_ATTACH_FILTER) that drops messages of type ``kind`` caused by
    the netlink socket ``portid``.

    Notifications come one per datagram and carry the port id of the socket whose request caused
    them (0 for the kernel's own).  Our own adds and lifetime renewals come back as RTM_NEWADDR,
    and nothing here needs them: dropped in the kernel, they never wake the reactor, while an
    address someone else adds or changes still does.  BPF loads half-words and words in network
    order, so both are compared in the byte order the host writes them.
    """
    as_loaded_type = int.from_bytes(kind.to_bytes(2, sys.byteorder), "big")
    as_loaded_pid = int.from_bytes(portid.to_bytes(4, sys.byteorder), "big")
    ld_h_abs, ld_w_abs, jeq_k, ret_k = 0x28, 0x20, 0x15, 0x06
    insns = [
        (ld_h_abs, 0, 0, 4),  # A = nlmsg_type
        (jeq_k, 0, 3, as_loaded_type),  # A == kind ? next : keep
        (ld_w_abs, 0, 0, 12),  # A = nlmsg_pid
        (jeq_k, 0, 1, as_loaded_pid),  # A == ours ? drop : keep
        (ret_k, 0, 0, 0),  # drop
        (ret_k, 0, 0, 0xFFFFFFFF),  # keep whole
    ]
    return b"".join(struct.pack("=HBBI", *insn) for insn in insns)
