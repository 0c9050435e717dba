"""Reads straight from the asyncio loop under Twisted's asyncio reactor.

The reactor's ``addReader`` wraps every wake-up in a logging context, which
costs more than answering a query from the hot table; registering the
socket with the asyncio loop itself skips that.  Twisted exposes that loop
only as the reactor's private ``_asyncioEventloop``: it is read here and
nowhere else, and tests/test_dns_eventloop.py fails if a Twisted release
stops providing it (the listener would otherwise fall back, silently, to
the slower ``addReader``).  Under any other reactor ``addReader`` is used.
"""

from __future__ import annotations

from twisted.logger import Logger

log = Logger()


def asyncio_loop(reactor):
    """The asyncio event loop that runs ``reactor``; None unless it is
    Twisted's asyncio reactor."""
    return getattr(reactor, "_asyncioEventloop", None)


class ReadRegistration:
    """Calls ``reader.doRead()`` whenever ``reader.fileno()`` is readable,
    from ``start()`` until ``stop()``.

    ``reader`` is an IReadDescriptor.  On the asyncio loop an exception from
    ``doRead`` is logged and reading goes on; under ``addReader`` the
    reactor handles it (it logs it and calls ``connectionLost``).  ``read``,
    if given, is called instead of ``doRead`` on the asyncio loop.
    """

    def __init__(self, reactor, reader, what: str, read=None):
        self.reactor = reactor
        self.reader = reader
        self.what = what
        self._do_read = read
        self.loop = asyncio_loop(reactor)
        self._fd: int | None = None

    @property
    def active(self) -> bool:
        return self._fd is not None

    def start(self) -> None:
        if self._fd is not None:
            return
        self._fd = self.reader.fileno()
        if self.loop is not None:
            self.loop.add_reader(self._fd, self._read)
        else:
            self.reactor.addReader(self.reader)

    def stop(self) -> None:
        """Before the descriptor is closed."""
        if self._fd is None:
            return
        if self.loop is not None:
            self.loop.remove_reader(self._fd)
        else:
            self.reactor.removeReader(self.reader)
        self._fd = None

    def _read(self) -> None:
        try:
            (self._do_read or self.reader.doRead)()
        except Exception:
            log.failure("{what} read failed", what=self.what)
