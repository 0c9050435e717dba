"""Changes to the IPv4 nat table, as nf_tables announces them (iptables-nft hosts).

Reading our chains back costs an ``iptables-save`` and a parse; doing it every
few seconds "in case someone flushed them" was most of an idle node's firewall
cost.  On an nf_tables kernel every committed change (ours, iptables-nft's,
nft's, a firewall manager's) is multicast to the NFNLGRP_NFTABLES group, so we
listen and read back only after the nat table changed, plus a slow periodic
pass for anything missed.  Legacy iptables announces nothing: there, the
periodic read-back stays frequent (networkd.vips.host).
"""

from __future__ import annotations

import socket
import struct
from typing import Callable

from twisted.logger import Logger

from networkd.vips import rtnl
from networkd.vips.netlink import drain

log = Logger()

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFPROTO_IPV4 = 2
# NFT_MSG_NEW/DELTABLE, NEW/DELCHAIN, NEW/DELRULE, NEW/DELSET, NEW/DELSETELEM: each names its
# table in attribute 1 (NFTA_TABLE_NAME, NFTA_CHAIN_TABLE, NFTA_RULE_TABLE, NFTA_SET_TABLE, ...).
TABLE_MESSAGES = frozenset({0, 2, 3, 5, 6, 8, 9, 11, 12, 14})
TABLE_ATTR = 1
_NFGENMSG = struct.Struct("=BBH")


def touches_nat(message: rtnl.Message) -> bool:
    """Whether one nf_tables notification changes the IPv4 table ``nat`` (where our chains live)."""
    if message.type >> 8 != NFNL_SUBSYS_NFTABLES or message.type & 0xFF not in TABLE_MESSAGES:
        return False
    if len(message.body) < _NFGENMSG.size:
        return False
    family = message.body[0]
    if family != NFPROTO_IPV4:
        return False
    for kind, payload in rtnl.attributes(message.body, _NFGENMSG.size):
        if kind == TABLE_ATTR:
            return payload.split(b"\0", 1)[0] == b"nat"
    return False


class NatChanges:
    """Calls ``changed()`` (at most once per datagram burst read) when the nat table changed; the
    reactor watches the socket.  ``open()`` raises OSError where nf_tables cannot be listened to."""

    def __init__(self, reactor, changed: Callable[[], None]):
        self._reactor = reactor
        self._changed = changed
        self._sock: socket.socket | None = None
        self._seen = False  # a read found a change to the nat table

    def open(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        try:
            sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._reactor.addReader(self)

    def close(self) -> None:
        if self._sock is not None:
            self._reactor.removeReader(self)
            self._sock.close()
            self._sock = None

    def fileno(self) -> int:
        return self._sock.fileno() if self._sock is not None else -1

    def logPrefix(self) -> str:
        return "nf_tables events"

    def doRead(self) -> None:
        self._seen = False
        drain(self._sock, self._datagram, self._lost)
        if self._seen:
            self._changed()

    def _datagram(self, data: bytes) -> None:
        self._seen = self._seen or any(touches_nat(m) for m in rtnl.messages(data))

    def _lost(self) -> None:
        self._seen = True  # notifications were dropped: they may have been about our chains

    def connectionLost(self, reason) -> None:
        pass
