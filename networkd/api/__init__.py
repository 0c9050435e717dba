"""The HTTP API service: binds ``--api-listen`` and serves ApiResource.

It shows the parts it is given in an ApiParts (networkd/api/parts.py),
built once by networkd/app.py.

The API is not on the data path: if the address cannot be bound (an old
process still holds it), that is logged clearly and retried with backoff;
the daemon keeps doing its real work.
"""

from __future__ import annotations

from twisted.application import service
from twisted.internet import defer, error
from twisted.logger import Logger
from twisted.web import http, server

from networkd.api.parts import ApiParts
from networkd.backoff import Backoff
from networkd.options import ListenAddress

log = Logger()


class QuietSite(server.Site):
    """Access lines at debug level: health checks must not flood the log.

    Each line's date is made with the line: twisted.web keeps it cached by a
    timer that woke the reactor every second for the daemon's whole life."""

    def _updateLogDateTime(self) -> None:
        self._logDateTime = None  # (twisted.web's would re-arm itself every second)

    def log(self, request):
        line = self._logFormatter(http.datetimeToLogString(self.reactor.seconds()), request)
        log.debug("api: {line}", line=line)


class ApiService(service.Service):
    name = "http api"

    def __init__(self, parts: ApiParts, listen: ListenAddress, reactor, backoff: Backoff | None = None):
        from networkd.api.resources import ApiResource

        self._listen = listen
        self._reactor = reactor
        self._backoff = backoff or Backoff(1.0, 30.0)
        self.resource = ApiResource(parts)
        self.site = QuietSite(self.resource)
        self.site.displayTracebacks = False
        self.port = None
        self._retry = None
        self._failures = 0

    def startService(self):
        super().startService()
        self._bind()

    def _bind(self) -> None:
        self._retry = None
        if not self.running:
            return
        try:
            self.port = self._reactor.listenTCP(self._listen.port, self.site, interface=self._listen.host)
        except error.CannotListenError as e:
            self._failures += 1
            delay = self._backoff.next()
            level = log.error if self._failures == 1 else log.debug
            level("HTTP API: cannot listen on {listen}: {reason}; retrying every few seconds",
                  listen=self._listen, reason=e.socketError)
            self._retry = self._reactor.callLater(delay, self._bind)
            return
        if self._failures:
            log.info("HTTP API: bound {listen} after {n} failed attempts", listen=self._listen, n=self._failures)
        log.info("HTTP API listening on http://{listen}/", listen=self._listen)

    def stopService(self):
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)
