"""One upstream query on the wire: a UDP socket of its own, or a TCP
connection after a truncated answer.  The exchange (``networkd.dns.forward``)
decides what an answer or a failure means; an attempt only reports them."""

from __future__ import annotations

import socket
import struct

from twisted.internet import protocol
from twisted.internet.interfaces import IReadDescriptor
from zope.interface import implementer


@implementer(IReadDescriptor)
class UdpAttempt:
    """One query over UDP: its own socket, connected to the server.

    A plain socket on the reactor rather than listenUDP, which logs two lines
    per socket (and we open one per upstream query).
    """

    def __init__(self, exchange, server, qid: int, packet: bytes):
        self.exchange = exchange
        self.reactor = exchange.reactor
        self.server = server
        self.qid = qid
        self.started = self.reactor.seconds()
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
        self.reactor.addReader(self)

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "dns-upstream"

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
            self.reactor.removeReader(self)
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
