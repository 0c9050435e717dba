"""The sd_notify protocol: ``KEY=value`` lines in one datagram to ``$NOTIFY_SOCKET``.

PyPI was checked for a library: ``sdnotify`` has had no release since 2017,
``systemd-python`` and ``cysystemd`` build against libsystemd (a C toolchain
and headers in the RPM build), and ``systemd-watchdog`` has no public way to
send ``STOPPING=1`` or several fields in one datagram.  The protocol is a
unix datagram socket and a few lines, so they are here (sd_notify(3)).

A path starting with ``@`` is an abstract socket (a leading NUL byte).
Nothing here raises: a daemon must not fail because systemd went away; a
failed send is logged once and counted.
"""

from __future__ import annotations

import os
import socket

from twisted.logger import Logger

log = Logger()

ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def socket_address(path: str) -> str | bytes:
    """``@name`` is the abstract socket ``\\0name``; anything else a file system path."""
    if path.startswith("@"):
        return b"\0" + path[1:].encode()
    return path


def watchdog_seconds(environ, pid: int) -> float | None:
    """The watchdog interval systemd asks for (``WATCHDOG_USEC``), if it is meant for ``pid``."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and owner != str(pid):
        return None
    return int(usec) / 1e6


class Notifier:
    """Sends notifications to the service manager; a no-op without a socket."""

    def __init__(self, path: str | None, watchdog: float | None = None):
        self.path = path or None
        self.watchdog = watchdog if self.path else None
        self.sent = 0
        self.failures = 0
        self._sock = None
        if self.path:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @classmethod
    def from_environ(cls, environ=None, pid: int | None = None, unset: bool = True) -> "Notifier":
        """From ``$NOTIFY_SOCKET`` and ``$WATCHDOG_USEC``/``$WATCHDOG_PID``.

        With ``unset`` they are removed from ``environ``, as sd_notify's
        ``unset_environment`` does: the tools networkd runs (iptables-restore)
        are not the service and must not speak for it.
        """
        environ = os.environ if environ is None else environ
        notifier = cls(environ.get("NOTIFY_SOCKET"), watchdog_seconds(environ, os.getpid() if pid is None else pid))
        if unset:
            for name in ENV_VARS:
                environ.pop(name, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields) -> bool:
        """One datagram with ``KEY=value`` lines (``send(READY=1, STATUS="...")``)."""
        if self._sock is None:
            return False
        text = "".join(f"{key}={str(value).replace(chr(10), ' ')}\n" for key, value in fields.items())
        try:
            self._sock.sendto(text.encode("utf-8"), socket_address(self.path))
        except OSError as e:
            self.failures += 1
            if self.failures == 1:
                log.warn("systemd notify socket {path}: {error}", path=self.path, error=e.strerror or str(e))
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
