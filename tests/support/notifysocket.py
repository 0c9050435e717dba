"""A fake systemd notify socket: a unix datagram socket the test owns, read by a thread."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time


class FakeNotifySocket:
    """Collects (monotonic time, {field: value}) of every datagram sent to it.

    ``abstract=True`` binds an abstract socket; ``path`` is then ``@name`` as
    systemd writes it in ``$NOTIFY_SOCKET``.
    """

    def __init__(self, abstract: bool = False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"networkd-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind(b"\0" + name.encode())
            self.path = "@" + name
        else:
            self._dir = tempfile.mkdtemp(prefix="networkd-notify-")
            self.path = os.path.join(self._dir, "notify")
            self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            at = time.monotonic()
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self.messages.append((at, fields))

    def all(self) -> list[tuple[float, dict]]:
        with self._lock:
            return list(self.messages)

    def times_of(self, field: str, value: str | None = None) -> list[float]:
        return [at for at, fields in self.all() if field in fields and (value is None or fields[field] == value)]

    def values_of(self, field: str) -> list[str]:
        return [fields[field] for _, fields in self.all() if field in fields]

    def wait_for(self, field: str, value: str | None = None, timeout: float = 15.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.times_of(field, value)
            if found:
                return found[0]
            time.sleep(0.01)
        raise AssertionError(f"no {field}={value or '*'} within {timeout}s; got {self.all()}")

    def close(self) -> None:
        self._closed = True
        self._thread.join(2)
        self.sock.close()
        if not self.path.startswith("@"):
            os.unlink(self.path)
            os.rmdir(self._dir)
