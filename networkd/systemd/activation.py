"""systemd socket activation: the listeners networkd.socket passes in.

systemd (or a test's parent process) holds the DNS sockets and passes them
from fd 3 on with LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES.  They outlive
a restart of the daemon, so queries sent meanwhile wait in the kernel's
socket buffer (UDP) or backlog (TCP) instead of being refused.

``passed_sockets`` reads the variables once, as sd_listen_fds(unset=1)
does: it removes them from the environment so no child inherits them.
"""

from __future__ import annotations

import ipaddress
import os
import socket

from twisted.logger import Logger

log = Logger()

SD_LISTEN_FDS_START = 3
_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def passed_sockets(environ=None) -> list:
    """The sockets passed to this process (socket objects, in fd order);
    empty unless LISTEN_PID is our pid.  The variables are unset either way."""
    environ = os.environ if environ is None else environ
    pid, count = environ.get("LISTEN_PID"), environ.get("LISTEN_FDS")
    for name in _VARIABLES:
        environ.pop(name, None)
    if not pid or not count:
        return []
    try:
        if int(pid) != os.getpid():
            log.info("socket activation: LISTEN_PID {pid} is not ours; binding the listeners", pid=pid)
            return []
        count = int(count)
    except ValueError:
        log.warn("socket activation: bad LISTEN_PID/LISTEN_FDS ({pid}, {count}); ignored", pid=pid, count=count)
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            log.warn("socket activation: fd {fd} is not a socket ({e}); ignored", fd=fd, e=e)
            continue
        os.set_inheritable(fd, False)
        sockets.append(sock)
    return sockets


def _address(sock) -> tuple | None:
    try:
        address = sock.getsockname()
    except OSError:
        return None
    return (address[0], address[1]) if isinstance(address, tuple) else None


def take(sockets: list, kind: int, host: str, port: int):
    """Remove from ``sockets`` and return the one of type ``kind``
    (SOCK_DGRAM, SOCK_STREAM) bound to ``host:port``; None if none is."""
    for sock in sockets:
        if sock.type != kind or sock.family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = _address(sock)
        if address and address[1] == port and ipaddress.ip_address(address[0]) == ipaddress.ip_address(host):
            sockets.remove(sock)
            return sock
    return None


def describe(sock) -> str:
    address = _address(sock)
    kind = {socket.SOCK_DGRAM: "UDP", socket.SOCK_STREAM: "TCP"}.get(sock.type, str(sock.type))
    return f"{kind} {address[0]}:{address[1]}" if address else f"{kind} fd {sock.fileno()}"
