"""TCP connect checks in flight, watched by the reactor as one descriptor (networkd.vips.probes).

A thousand checks a second must cost little: each is a non-blocking
``connect``; an answer known at once (refused, unreachable) is reported at
once, the others wait in one epoll set that the reactor reads as a single
descriptor, and each result goes straight to a callback (no Deferred,
transport or reactor registration per check).  A socket that connected is
closed with a reset: no FIN exchange, no TIME_WAIT per check.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from typing import Callable

ERRORS = {errno.ECONNREFUSED: "connection refused", errno.ETIMEDOUT: "connect timed out",
           errno.EHOSTUNREACH: "no route to host", errno.ENETUNREACH: "network unreachable"}
_NO_LINGER = struct.pack("ii", 1, 0)
_CONNECT_FLAGS = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC


def _error_text(code: int) -> str:
    return ERRORS.get(code) or os.strerror(code)


def _close(sock: socket.socket, code: int) -> None:
    """Close; a connected socket with a reset (no FIN exchange, no TIME_WAIT per probe)."""
    if code == 0:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _NO_LINGER)
        except OSError:
            pass
    sock.close()


class Connects:
    """TCP connect probes in flight, in one epoll set the reactor watches as a single reader.

    ``start`` opens a non-blocking socket and connects; an answer known at once
    (refused, unreachable) is reported at once.  The others wait in the epoll
    set until the socket is writable (connected or failed); ``doRead`` then
    reads ``SO_ERROR`` of every ready socket in one call and closes it.
    ``done(key, error)``: error None on success, else why.
    """

    def __init__(self, reactor, done: Callable[[object, str | None], None]):
        self._reactor, self._done = reactor, done
        self._epoll: select.epoll | None = None
        self._flight: dict[int, tuple[socket.socket, object]] = {}  # fd -> (socket, key)

    def fileno(self) -> int:
        return self._epoll.fileno() if self._epoll is not None else -1

    def logPrefix(self) -> str:
        return "probes"

    def start(self, key, ip: str, port: int) -> int | None:
        """Connect to ``ip:port`` for ``key``; returns the handle to cancel, None when already reported."""
        sock = socket.socket(socket.AF_INET, _CONNECT_FLAGS)
        try:
            code = sock.connect_ex((ip, port))
            if code != errno.EINPROGRESS:
                _close(sock, code)
                self._done(key, None if code == 0 else _error_text(code))
                return None
            if self._epoll is None:
                self._open()
            fd = sock.fileno()
            self._epoll.register(fd, select.EPOLLOUT | select.EPOLLONESHOT)
        except BaseException:
            sock.close()
            raise
        self._flight[fd] = (sock, key)
        return fd

    def _open(self) -> None:
        self._epoll = select.epoll()
        try:
            self._reactor.addReader(self)
        except BaseException:
            self._epoll.close()
            self._epoll = None
            raise

    def cancel(self, fd: int, why) -> None:
        entry = self._flight.pop(fd, None)
        if entry is not None:
            entry[0].close()  # also leaves the epoll set
            self._done(entry[1], why)

    def doRead(self) -> None:
        self.collect()

    def collect(self) -> None:
        """Report every check that has its answer.  Called by the reactor when one is ready, and by
        the prober right after it started a batch: a container on this node answers a connect
        within the syscall (loopback or a veth pair to a namespace), so its answer is read in the
        same turn, and the reactor need not wake again for it (~0.2 ms of CPU a wake-up on a VM)."""
        if self._epoll is None:
            return
        for fd, _ in self._epoll.poll(0):
            entry = self._flight.pop(fd, None)
            if entry is None:
                continue
            sock, key = entry
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            _close(sock, code)
            self._done(key, None if code == 0 else _error_text(code))

    def connectionLost(self, reason) -> None:
        self.close()

    def close(self) -> None:
        flight, self._flight = self._flight, {}
        for sock, _ in flight.values():
            sock.close()
        if self._epoll is not None:
            self._reactor.removeReader(self)
            self._epoll.close()
            self._epoll = None
