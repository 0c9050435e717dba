"""The only code that changes interfaces: VIP addresses via pyroute2.

Addresses are ``<ip>/32`` on one interface, matched exactly ([BUG 18]).
They are added with a kernel lifetime (``valid_lft``/``preferred_lft``) so
that a killed or frozen daemon loses them by itself: the dead man's switch.
A second netlink socket listens for address and link events, so an address
removed by someone else, or a link coming up, is noticed at once.

pyroute2's async API is asyncio; each call runs as an asyncio task and is
handed back as a Deferred (the bridge stays inside this module).
"""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Callable

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_LINK
from twisted.internet.defer import Deferred
from twisted.logger import Logger

log = Logger()

IFF_UP = 0x1
IFF_RUNNING = 0x40
FOREVER = 0xFFFFFFFF


class InterfaceMissing(Exception):
    """The VIP interface does not exist (yet)."""


def _deferred(coro) -> Deferred:
    return Deferred.fromFuture(asyncio.ensure_future(coro))


class Netlink:
    """Addresses on one interface, plus events about it."""

    def __init__(self, interface: str):
        self.interface = interface
        self.index: int | None = None
        self.mac: bytes | None = None
        self._ipr: AsyncIPRoute | None = None
        self._lock: asyncio.Lock | None = None
        self._events_task: asyncio.Task | None = None
        self._link_up: bool | None = None
        self.on_address_removed: Callable[[str], None] = lambda ip: None
        self.on_address_added: Callable[[str], None] = lambda ip: None
        self.on_link_up: Callable[[], None] = lambda: None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> Deferred:
        return _deferred(self._start())

    async def _start(self) -> None:
        self._ipr = AsyncIPRoute()
        self._lock = asyncio.Lock()
        self._events_task = asyncio.ensure_future(self._events())
        try:
            await self._lookup()
        except InterfaceMissing as e:
            log.warn("{e}; VIPs wait for it", e=e)

    def stop(self) -> Deferred:
        async def stop():
            if self._events_task is not None:
                self._events_task.cancel()
                try:
                    await self._events_task
                except BaseException:
                    pass
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None

        return _deferred(stop())

    async def _lookup(self) -> int:
        """The interface index (cached; link events and ENODEV clear it)."""
        if self.index is not None:
            return self.index
        found = await self._ipr.link_lookup(ifname=self.interface)
        if not found:
            self.index = None
            raise InterfaceMissing(f"interface {self.interface!r} does not exist")
        if found[0] != self.index:
            self.index = found[0]
            for msg in await self._ipr.link("get", index=self.index):
                mac = msg.get("IFLA_ADDRESS")
                self.mac = bytes.fromhex(mac.replace(":", "")) if mac else None
                self._link_up = bool(msg["flags"] & IFF_UP) and bool(msg["flags"] & IFF_RUNNING)
        return self.index

    # -- addresses -----------------------------------------------------------

    def addresses(self) -> Deferred:
        """Fires with the set of IPv4 ``/32`` addresses on the interface."""

        async def dump():
            async with self._lock:
                index = await self._lookup()
                found = set()
                async for msg in await self._ipr.addr("dump", index=index, family=socket.AF_INET):
                    if msg["prefixlen"] == 32 and msg["index"] == index:
                        found.add(msg.get("IFA_ADDRESS"))
                return found

        return _deferred(dump())

    def put(self, ip: str, lifetime: int, then: Callable[[], None] | None = None) -> Deferred:
        """Add or refresh ``ip/32`` with ``lifetime`` seconds (kernel removes it after).

        ``then()`` runs the moment the kernel acknowledged, before any other
        callback: gratuitous ARP must leave within milliseconds.
        """

        async def put():
            async with self._lock:
                index = await self._lookup()
                life = FOREVER if lifetime is None else max(1, int(lifetime))
                try:
                    await self._ipr.addr(
                        "replace", index=index, address=ip, prefixlen=32,
                        IFA_CACHEINFO={"ifa_valid": life, "ifa_preferred": life, "cstamp": 0, "tstamp": 0},
                    )
                except NetlinkError as e:
                    if e.code == errno.ENODEV:
                        self.index = None
                    raise
                if then is not None:
                    try:
                        then()
                    except Exception:
                        log.failure("after adding {ip}", ip=ip)

        return _deferred(put())

    def remove(self, ip: str) -> Deferred:
        """Remove ``ip/32``; fires True if it was there, False if already gone."""

        async def remove():
            async with self._lock:
                try:
                    index = await self._lookup()
                except InterfaceMissing:
                    return False
                try:
                    await self._ipr.addr("del", index=index, address=ip, prefixlen=32)
                except NetlinkError as e:
                    if e.code == errno.ENODEV:
                        self.index = None
                    if e.code in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ENODEV):
                        return False
                    raise
                return True

        return _deferred(remove())

    # -- events --------------------------------------------------------------

    async def _events(self) -> None:
        while True:
            try:
                async with AsyncIPRoute() as events:
                    await events.bind(groups=RTMGRP_IPV4_IFADDR | RTMGRP_LINK)
                    while True:
                        async for msg in events.get():
                            self._event(msg)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warn("netlink event socket failed: {e}; reopening", e=e)
                await asyncio.sleep(1.0)

    def _event(self, msg) -> None:
        try:
            kind = msg.get("event")
            if kind in ("RTM_NEWADDR", "RTM_DELADDR"):
                if msg.get("index") != self.index or msg.get("prefixlen") != 32:
                    return
                ip = msg.get("IFA_ADDRESS")
                (self.on_address_removed if kind == "RTM_DELADDR" else self.on_address_added)(ip)
            elif kind in ("RTM_NEWLINK", "RTM_DELLINK"):
                if msg.get("IFLA_IFNAME") != self.interface and msg.get("index") != self.index:
                    return
                if kind == "RTM_DELLINK":
                    self.index = None
                    self._link_up = False
                    return
                up = bool(msg["flags"] & IFF_UP) and bool(msg["flags"] & IFF_RUNNING)
                was, self._link_up = self._link_up, up
                if msg.get("IFLA_IFNAME") == self.interface and msg.get("index") != self.index:
                    self.index = None  # recreated: look it up again
                if up and not was:
                    self.on_link_up()
        except Exception:
            log.failure("netlink event handler failed")
