"""One upstream query on the wire: a UDP socket of its own, or a TCP
connection after a truncated answer.  The exchange (``networkd.dns.forward``)
decides what an answer or a failure means; an attempt only reports them."""

from __future__ import annotations

import socket
import struct

from twisted.internet import protocol
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from networkd.dns.eventloop import ReadRegistration

log = Logger()


@implementer(IReadDescriptor)
class UdpAttempt:
    """One query over UDP: its own socket, connected to the server; a
    re-send to the same server goes out on it again (``resend``), with the
    same ID, rather than on a new socket.

    A plain socket read from the event loop itself (``ReadRegistration``)
    rather than listenUDP, which logs two lines per socket, or addReader,
    which wraps every read in a logging context: a silent upstream under a
    flood of uncached names keeps --dns-forward-max of these open.  ``close``
    drops the link back to the exchange, so a finished exchange is freed by
    reference counting, not left to the cycle collector (whose full passes
    over thousands of such objects stalled every query, issue 12 item 7).
    """

    def __init__(self, exchange, server, qid: int, packet: bytes):
        self.exchange = exchange
        self.reactor = exchange.reactor
        self.server = server
        self.qid = qid
        self.packet = packet
        self.started = self.sent_at = self.reactor.seconds()
        self.done = False
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.setblocking(False)
            self.sock.connect(server)
            self.sock.send(packet)
        except OSError:
            self.sock.close()
            raise
        self._reading = ReadRegistration(self.reactor, self, "DNS upstream", read=self._read)
        self._reading.start()

    def resend(self) -> None:
        """Ask again on the same socket (raises OSError as the first send would)."""
        self.sent_at = self.reactor.seconds()
        self.sock.send(self.packet)

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "dns-upstream"

    def _read(self) -> None:
        """doRead from the event loop: a read that fails unexpectedly is logged
        and ends the attempt, as the reactor's addReader would (connectionLost)."""
        try:
            self.doRead()
        except Exception:
            log.failure("DNS upstream read failed")
            self.close()

    def doRead(self):
        for _ in range(16):
            if self.done:
                return
            try:
                data = self.sock.recv(65535)
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                self.exchange.failed(self, "port unreachable")
                return
            except OSError as e:
                self.exchange.failed(self, e.strerror or str(e))
                return
            self.exchange.reply(self, data)

    def connectionLost(self, reason):
        self.close()

    def close(self):
        if not self.done:
            self.done = True
            self._reading.stop()
            self._reading = self.exchange = None
            self.sock.close()


class TcpAttempt(protocol.Protocol):
    """One query over TCP after a truncated UDP answer."""

    def __init__(self, exchange, server, qid: int, packet: bytes):
        self.exchange = exchange
        self.server = server
        self.qid = qid
        self.packet = packet
        self.started = exchange.reactor.seconds()
        self.buffer = b""
        self.done = False
        self.connector = None

    def connectionMade(self):
        self.transport.write(struct.pack(">H", len(self.packet)) + self.packet)

    def dataReceived(self, data):
        self.buffer += data
        if len(self.buffer) >= 2:
            length = struct.unpack_from(">H", self.buffer)[0]
            if len(self.buffer) >= 2 + length and not self.done:
                self.exchange.reply(self, self.buffer[2:2 + length], tcp=True)

    def connectionLost(self, reason=None):
        if not self.done:
            self.exchange.failed(self, "TCP connection closed")

    def close(self):
        self.done = True
        if self.transport is not None:
            self.transport.loseConnection()
        elif self.connector is not None:
            self.connector.disconnect()


class TcpFactory(protocol.ClientFactory):
    noisy = False

    def __init__(self, attempt):
        self.attempt = attempt

    def buildProtocol(self, addr):
        return self.attempt

    def clientConnectionFailed(self, connector, reason):
        if not self.attempt.done:
            self.attempt.exchange.failed(self.attempt, "TCP connect failed")
