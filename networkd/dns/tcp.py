"""DNS over TCP: length-prefixed messages, pipelining, an idle timeout and a
cap on connections.  Every message goes through ``Resolver.resolve``.

Pipelined queries (RFC 7766) are answered as their answers come, in any
order.  While TCP_MAX_PENDING of a connection's queries wait for upstreams,
it is not read any further (back-pressure through TCP's own window) until
answers go out; nothing is dropped and the connection stays open.

At the cap on connections a new client is still served: the connection idle
longest (preferring those with no query waiting for an upstream) is closed
to make room, rather than the new one refused (idle clients would otherwise
lock out everyone else for the idle timeout)."""

from __future__ import annotations

import struct

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin

from networkd.dns.resolver import Resolver

log = Logger()

TCP_IDLE_TIMEOUT = 10.0
TCP_MAX_CONNECTIONS = 256
TCP_MAX_PENDING = 32  # queries of one connection waiting for upstreams before it is read no more


class DnsTcpProtocol(protocol.Protocol, TimeoutMixin):
    """TCP: length-prefixed messages, pipelining, idle timeout."""

    def __init__(self, factory):
        self.factory = factory
        self.buffer = b""
        self.pending = 0
        self.counted = False
        self.paused = False
        self.closing = False
        self.serving = False
        self.last_active = 0.0  # reactor time of the last query read or answer written

    def connectionMade(self):
        self.factory.admit(self)
        self.counted = True
        self.last_active = self.factory.reactor.seconds()
        self.setTimeout(self.factory.idle_timeout)

    def connectionLost(self, reason=None):
        if self.counted:
            self.factory.forget(self)
            self.counted = False
        self.setTimeout(None)

    def make_room(self) -> None:
        """Closed to let a new client in: no longer counted from now on."""
        self.factory.forget(self)
        self.counted = False
        self.setTimeout(None)
        self._close()

    def dataReceived(self, data):
        self.buffer += data
        self._serve()

    def _serve(self) -> None:
        """Answer the buffered messages while few enough wait for upstreams;
        at the limit, stop reading the socket until answers go out."""
        if self.serving:
            return  # an answer that came at once, inside the loop below: it goes on
        self.serving = True
        try:
            while self.pending < TCP_MAX_PENDING and not self.closing and len(self.buffer) >= 2:
                length = struct.unpack_from(">H", self.buffer)[0]
                if len(self.buffer) < 2 + length:
                    break
                message, self.buffer = self.buffer[2:2 + length], self.buffer[2 + length:]
                self._active()
                self._handle(message)
        finally:
            self.serving = False
        self._pause(self.pending >= TCP_MAX_PENDING and not self.closing)

    def _pause(self, paused: bool) -> None:
        if paused != self.paused and self.transport is not None:
            self.paused = paused
            if paused:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def _close(self) -> None:
        self.closing = True
        self.transport.loseConnection()

    def _handle(self, message: bytes) -> None:
        peer = self.transport.getPeer()
        try:
            result = self.factory.resolver.resolve(message, peer.host, udp=False)
        except Exception:
            log.failure("DNS query over TCP from {addr} failed", addr=peer.host)
            self._close()
            return
        if result is None:
            self._close()
        elif isinstance(result, defer.Deferred):
            self.pending += 1
            result.addErrback(self._no_answer)
            result.addCallback(self._answer_later)
            result.addErrback(lambda f: log.failure("DNS answer over TCP failed", f))
        else:
            self._write(result)

    def _no_answer(self, failure) -> None:
        """A query that cannot be answered still frees its place, or enough of
        them would stop the connection being read at all."""
        log.failure("DNS answer over TCP failed", failure)
        return None

    def _answer_later(self, response):
        self.pending -= 1
        if not self.connected or self.closing:
            return
        if response is not None:
            self._write(response)
        self._serve()  # under the limit again: read on

    def _active(self) -> None:
        self.last_active = self.factory.reactor.seconds()
        self.resetTimeout()

    def _write(self, response: bytes) -> None:
        self._active()
        self.transport.write(struct.pack(">H", len(response)) + response)

    def timeoutConnection(self):
        self._close()


class DnsTcpFactory(protocol.Factory):
    noisy = False

    def __init__(self, resolver: Resolver, reactor, max_connections: int = TCP_MAX_CONNECTIONS,
                 idle_timeout: float = TCP_IDLE_TIMEOUT):
        self.resolver = resolver
        self.reactor = reactor
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.open: dict = {}  # the counted connections, oldest first (a dict keeps order)

    @property
    def connections(self) -> int:
        return len(self.open)

    def admit(self, proto: DnsTcpProtocol) -> None:
        """Count a new connection; at the cap, close the idlest one first."""
        while self.open and len(self.open) >= self.max_connections:
            idlest = min(self.open, key=lambda p: (p.pending > 0, p.last_active))
            idlest.make_room()
        self.open[proto] = None

    def forget(self, proto: DnsTcpProtocol) -> None:
        self.open.pop(proto, None)

    def buildProtocol(self, addr):
        proto = DnsTcpProtocol(self)
        proto.callLater = self.reactor.callLater
        return proto
