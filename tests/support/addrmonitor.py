"""Who holds which /32 address, event by event, across node namespaces.

``AddressMonitor`` listens to rtnetlink address events (RTMGRP_IPV4_IFADDR)
in every node namespace from one thread pinned to CPU 1, so that a test can
starve CPU 0 (daemons, etcd, busy loops) without starving the observer.
From the events it rebuilds, per node and address, the intervals during
which the node had the address, and reports the periods where two or more
nodes had the same one (``overlaps()``).

Trust, not hope:

* An initial dump (RTM_GETADDR on the same, already subscribed socket, so
  no event falls between the dump and the subscription) opens the intervals
  of addresses present before we listened.
* RTM_NEWADDR is also sent when an existing address gets a new lifetime: an
  add for an address a node already has is not a new interval.
* ENOBUFS on receive means the kernel dropped events: it is recorded in
  ``lost`` and ``check()`` fails loudly, since the intervals are then guesses.
* On exit a final dump is compared with the state rebuilt from the events;
  disagreements are recorded in ``mismatches`` (and fail ``check()``).

Timestamps are ``time.monotonic()``, chosen so that reading latency can
never make an overlap: an add counts from when we read it (it happened no
later), a removal from the last moment its socket was seen empty (it
happened no earlier).  Overlaps are therefore a lower bound, short by at
most the monitor's reading latency on its own CPU.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import threading
import time

from tests.support.vipnodes import in_netns

RTMGRP_IPV4_IFADDR = 0x10
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFA_ADDRESS, IFA_LOCAL = 1, 2
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
RCVBUF = 8 << 20
MONITOR_CPU = 1

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTATTR = struct.Struct("=HH")  # len, type


def parse_addr_messages(data: bytes):
    """Yield (nlmsg type, seq, pid, address or None, prefixlen, ifindex) per netlink message."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, seq, pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            break
        address, prefixlen, index = None, None, None
        if kind in (RTM_NEWADDR, RTM_DELADDR):
            body = data[offset + _NLMSGHDR.size: offset + length]
            family, prefixlen, _f, _scope, index = _IFADDRMSG.unpack_from(body)
            if family == socket.AF_INET:
                local = addr = None
                pos = _IFADDRMSG.size
                while pos + _RTATTR.size <= len(body):
                    alen, atype = _RTATTR.unpack_from(body, pos)
                    if alen < _RTATTR.size:
                        break
                    value = body[pos + _RTATTR.size: pos + alen]
                    if atype == IFA_LOCAL and len(value) == 4:
                        local = socket.inet_ntoa(value)
                    elif atype == IFA_ADDRESS and len(value) == 4:
                        addr = socket.inet_ntoa(value)
                    pos += (alen + 3) & ~3
                address = local or addr
        elif kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
            address = code  # the (negative) errno, for the caller
        yield kind, seq, pid, address, prefixlen, index
        offset += (length + 3) & ~3


class _Feed:
    """One namespace's subscribed netlink socket and the dump in flight on it."""

    def __init__(self, node: str, netns: str):
        self.node = node
        self.netns = netns

        def make():
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            s.bind((0, RTMGRP_IPV4_IFADDR))
            s.setblocking(False)
            return s

        self.sock = in_netns(netns, make)
        self.portid = self.sock.getsockname()[0]
        self.dump_seq: int | None = None  # dump in flight
        self.dumped: set[str] = set()  # addresses of interest the dump listed so far
        self.touched: set[str] = set()  # addresses with events while the dump was in flight
        self.final = False  # the dump in flight is the closing one
        self.empty_at = time.monotonic()  # when the socket was last seen with nothing queued
        self.done = threading.Event()

    def request_dump(self, seq: int) -> None:
        self.dump_seq = seq
        self.dumped = set()
        self.touched = set()
        self.done.clear()
        msg = _NLMSGHDR.pack(_NLMSGHDR.size + _IFADDRMSG.size, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP,
                             seq, 0) + _IFADDRMSG.pack(socket.AF_INET, 0, 0, 0, 0)
        self.sock.setblocking(True)
        try:
            self.sock.send(msg)
        finally:
            self.sock.setblocking(False)


class AddressMonitor:
    """Event-based record of which node had which of ``ips`` (as /32) when.

    ``namespaces``: node name -> netns name.  Use as a context manager.
    ``poll``: the longest wait on the sockets; a removal is dated back to when its socket was last
    seen empty, so a shorter wait dates it more closely (unheld gaps are an upper bound, long by up
    to about this much; overlaps are unaffected: still a lower bound).
    """

    def __init__(self, namespaces: dict[str, str], ips: set[str] | frozenset[str], poll: float = 0.05):
        self.namespaces = dict(namespaces)
        self.poll = poll
        self.ips = frozenset(ips)
        self.events: list[tuple[float, str, str, str]] = []  # (monotonic, node, ip, 'add'|'del')
        self.lost: list[tuple[float, str]] = []  # (when, node) of every ENOBUFS
        self.mismatches: list[str] = []
        self.errors: list[str] = []
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self._open: dict[tuple[str, str], float] = {}  # (node, ip) -> since
        self._intervals: list[tuple[str, str, float, float]] = []  # node, ip, start, end
        self._lock = threading.Lock()
        self._feeds: list[_Feed] = []
        self._stop = threading.Event()
        self._final = threading.Event()
        self._ready = threading.Event()
        self._seq = int(time.time()) & 0x7FFFFFFF
        self._thread = threading.Thread(target=self._run, name="address-monitor", daemon=True)
        self.cpu: set[int] | None = None

    # -- context ---------------------------------------------------------------

    def __enter__(self) -> "AddressMonitor":
        self._thread.start()
        if not self._ready.wait(15):
            self._stop.set()
            raise RuntimeError("address monitor did not start")
        if self.errors:
            self._stop.set()
            self._thread.join(5)
            self._close()
            raise RuntimeError(f"address monitor failed to start: {self.errors}")
        return self

    def __exit__(self, *exc) -> None:
        self._final.set()  # ask for the final dumps, then stop
        self._thread.join(15)
        if self._thread.is_alive():
            self.errors.append("monitor thread did not stop within 15s")
            self._stop.set()
            self._thread.join(2)
        self._close()

    def _close(self) -> None:
        for feed in self._feeds:
            feed.sock.close()

    # -- the thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            try:
                os.sched_setaffinity(threading.get_native_id(), {MONITOR_CPU})
            except OSError as e:
                self.errors.append(f"could not pin the monitor to CPU {MONITOR_CPU}: {e}")
            self.cpu = os.sched_getaffinity(threading.get_native_id())
            for node, ns in self.namespaces.items():
                self._feeds.append(_Feed(node, ns))
            self.started_at = time.monotonic()
            self._dump_all()
            if not self._wait_dumps(10):
                self.errors.append("initial dump did not complete")
            self._ready.set()
            while not self._stop.is_set():
                if self._final.is_set():
                    self._dump_all(final=True)
                    if not self._wait_dumps(10):
                        self.errors.append("final dump did not complete")
                    break
                self._poll(self.poll)
        except BaseException as e:  # noqa: BLE001 - reported by check()
            self.errors.append(f"monitor thread failed: {e!r}")
        finally:
            self.ended_at = time.monotonic()
            self._ready.set()

    def _dump_all(self, final: bool = False) -> None:
        for feed in self._feeds:
            self._seq += 1
            feed.final = final
            feed.request_dump(self._seq)

    def _wait_dumps(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not all(f.done.is_set() for f in self._feeds):
            if time.monotonic() > deadline or self._stop.is_set():
                return False
            self._poll(self.poll)
        return True

    def _poll(self, timeout: float) -> None:
        before = time.monotonic()
        ready, _, _ = select.select([f.sock for f in self._feeds], [], [], timeout)
        for feed in self._feeds:
            if feed.sock not in ready:
                feed.empty_at = before  # select saw it empty after ``before``
        for sock in ready:
            feed = next(f for f in self._feeds if f.sock is sock)
            while True:
                asked = time.monotonic()
                try:
                    data = sock.recv(1 << 20)
                except BlockingIOError:
                    feed.empty_at = asked
                    break
                except OSError as e:
                    if e.errno == errno.ENOBUFS:
                        self.lost.append((asked, feed.node))
                        continue
                    raise
                if not data:
                    break
                self._handle(feed, data, time.monotonic())

    def _handle(self, feed: _Feed, data: bytes, got: float) -> None:
        """``got``: when we read ``data``; every message in it arrived after ``feed.empty_at``."""
        for kind, seq, pid, address, prefixlen, _index in parse_addr_messages(data):
            reply = feed.dump_seq is not None and seq == feed.dump_seq and pid == feed.portid
            if kind in (NLMSG_DONE, NLMSG_ERROR) and reply:
                if kind == NLMSG_ERROR and address:
                    self.errors.append(f"{feed.node}: address dump failed with errno {-address}")
                self._dump_done(feed)
                continue
            if kind == NLMSG_OVERRUN:
                self.lost.append((got, feed.node))
                continue
            if kind not in (RTM_NEWADDR, RTM_DELADDR) or prefixlen != 32 or address not in self.ips:
                continue
            if reply:  # an entry of our dump: the address is there
                feed.dumped.add(address)
                if not feed.final:
                    self._apply(got, feed.node, address, "add")
                continue
            if feed.dump_seq is not None:
                feed.touched.add(address)
            if kind == RTM_NEWADDR:
                self._apply(got, feed.node, address, "add")  # at the latest when we read it
            else:
                self._apply(feed.empty_at, feed.node, address, "del")  # at the earliest after we saw none

    def _dump_done(self, feed: _Feed) -> None:
        if feed.final:
            with self._lock:
                rebuilt = {ip for (node, ip) in self._open if node == feed.node}
            for ip in sorted((rebuilt ^ feed.dumped) - feed.touched):
                where = "in the final dump only" if ip in feed.dumped else "in the events only"
                self.mismatches.append(f"{feed.node}: {ip} {where}")
        feed.dump_seq = None
        feed.done.set()

    def _apply(self, now: float, node: str, ip: str, what: str) -> None:
        with self._lock:
            key = (node, ip)
            if what == "add":
                if key in self._open:
                    return  # a lifetime renewal (or a dump of what we know): same interval
                self._open[key] = now
            else:
                since = self._open.pop(key, None)
                if since is None:
                    return
                now = max(now, since)  # added and removed within one read: no time at all
                self._intervals.append((node, ip, since, now))
            self.events.append((now, node, ip, what))

    # -- results ---------------------------------------------------------------

    def holders_now(self) -> dict[str, frozenset[str]]:
        """ip -> the nodes that have it now (only ips someone has)."""
        with self._lock:
            out: dict[str, set[str]] = {}
            for node, ip in self._open:
                out.setdefault(ip, set()).add(node)
        return {ip: frozenset(nodes) for ip, nodes in out.items()}

    def intervals(self) -> list[tuple[str, str, float, float]]:
        """(node, ip, start, end) of every holding; still open ones end now (or at exit)."""
        end = self.ended_at if self.ended_at is not None else time.monotonic()
        with self._lock:
            return sorted(self._intervals + [(n, ip, s, end) for (n, ip), s in self._open.items()],
                          key=lambda i: (i[2], i[0], i[1]))

    def overlaps(self, min_seconds: float = 0.0) -> list[tuple[str, tuple[str, ...], float, float]]:
        """(ip, nodes, start, end) of every period in which two or more nodes had ip.

        ``nodes``: every node that had ip at some moment of the period.
        """
        per_ip: dict[str, list[tuple[float, int, str]]] = {}
        for node, ip, start, end in self.intervals():
            if end <= start:
                # Added and removed within one read: no time at all, so no overlap of any length.  (Kept,
                # its end sorted before its start would leave the node holding the address for good.)
                continue
            per_ip.setdefault(ip, []).append((start, 1, node))
            per_ip.setdefault(ip, []).append((end, 0, node))  # ends sort before starts at equal times
        found = []
        for ip, marks in per_ip.items():
            marks.sort()
            active: set[str] = set()
            since = None
            involved: set[str] = set()
            for t, is_start, node in marks:
                if is_start:
                    active.add(node)
                else:
                    active.discard(node)
                if len(active) >= 2:
                    if since is None:
                        since, involved = t, set()
                    involved |= active
                elif since is not None:
                    if t > since and t - since >= min_seconds:
                        found.append((ip, tuple(sorted(involved)), since, t))
                    since = None
        return sorted(found, key=lambda o: o[2])

    def check(self) -> None:
        """Fail loudly when the record cannot be trusted."""
        problems = []
        if self.lost:
            nodes = sorted({n for _, n in self.lost})
            problems.append(f"{len(self.lost)} netlink receive overruns (ENOBUFS) on {nodes}: events were lost")
        if self.mismatches:
            problems.append(f"final dump disagrees with the events: {self.mismatches[:10]}")
        if self.errors:
            problems.append(f"monitor errors: {self.errors}")
        if self.cpu is not None and self.cpu != {MONITOR_CPU}:
            problems.append(f"monitor ran on CPUs {self.cpu}, not {MONITOR_CPU}")
        if problems:
            raise AssertionError("address monitor result not trustworthy: " + "; ".join(problems))
