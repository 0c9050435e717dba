"""Ask upstream servers: staggered racing, failover, TCP retry on truncation.

Each attempt uses a fresh UDP socket (random source port) connected to the
server, so the kernel only delivers replies from that server, and a fresh
random ID; a reply counts only if it has our ID and echoes our question
(RFC 5452).  The first server gets a head start based on its smoothed RTT;
a SERVFAIL/REFUSED/refused-port/garbage from one server starts the next at
once.  The whole exchange ends within ``budget`` seconds.
"""

from __future__ import annotations

import random
import socket
import struct

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IReadDescriptor
from zope.interface import implementer

from networkd.dns import wire
from networkd.dns.health import ServerHealth
from networkd.dns.upstreams import format_server

RETRANSMIT_AFTER = 0.4  # first re-send to a server already asked; doubles each round
MISS_AFTER = 0.3  # an attempt unanswered this long when the exchange ends is a miss


class UpstreamFailed(Exception):
    """No upstream gave a usable answer in time."""


@implementer(IReadDescriptor)
class _UdpAttempt:
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


class _TcpAttempt(protocol.Protocol):
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


class _TcpFactory(protocol.ClientFactory):
    noisy = False

    def __init__(self, attempt):
        self.attempt = attempt

    def buildProtocol(self, addr):
        return self.attempt

    def clientConnectionFailed(self, connector, reason):
        if not self.attempt.done:
            self.attempt.exchange.failed(self.attempt, "TCP connect failed")


class _Exchange:
    """One question asked of a list of servers until someone answers."""

    def __init__(self, forwarder, question: bytes, do: bool, servers: list, budget: float):
        self.forwarder = forwarder
        self.reactor = forwarder.reactor
        self.question = question
        self.question_lower = wire.fold_question(question)
        self.do = do
        self.servers = forwarder.health.order(servers)
        self.result = defer.Deferred()
        self.attempts: list = []
        self.finished = False
        self.next_index = 0
        self.failed_servers: set = set()
        self.tcp_servers: set = set()
        self.last_failure = "no upstream"
        self.next_call = None
        self.deadline = self.reactor.callLater(budget, self._give_up)

    def start(self) -> defer.Deferred:
        if not self.servers:
            self._finish(None, "no upstream servers")
        else:
            self._launch_next()
        return self.result

    def _launch_next(self) -> None:
        """Start the next server in the cycle and schedule the one after."""
        self.next_call = None
        if self.finished:
            return
        candidates = [s for s in self.servers if s not in self.failed_servers and s not in self.tcp_servers]
        if not candidates:
            if not any(not a.done for a in self.attempts):
                self._finish(None, self.last_failure)
            return
        server = self.servers[self.next_index % len(self.servers)]
        self.next_index += 1
        if server not in candidates:
            return self._launch_next()
        self._send_udp(server)
        if server in self.failed_servers:
            return self._launch_next()
        rounds_done = self.next_index // len(self.servers)
        if rounds_done == 0:
            delay = self.forwarder.health.stagger(server)  # the next server gets its turn soon
        else:
            delay = RETRANSMIT_AFTER * 2 ** (rounds_done - 1)  # asking again: back off
        self.next_call = self.reactor.callLater(delay, self._launch_next)

    def _send_udp(self, server) -> None:
        qid = self.forwarder.new_id()
        try:
            attempt = _UdpAttempt(self, server, qid, wire.make_query(qid, self.question_lower, self.do))
        except OSError as e:  # e.g. out of file descriptors, no route
            self.last_failure = f"{format_server(server)}: {e.strerror or e}"
            self.failed_servers.add(server)
            return
        self.attempts.append(attempt)

    def _send_tcp(self, server) -> None:
        qid = self.forwarder.new_id()
        attempt = _TcpAttempt(self, server, qid, wire.make_query(qid, self.question_lower, self.do))
        self.attempts.append(attempt)
        self.tcp_servers.add(server)
        remaining = max(0.1, self.deadline.getTime() - self.reactor.seconds())
        attempt.connector = self.reactor.connectTCP(server[0], server[1], _TcpFactory(attempt), timeout=remaining)

    def reply(self, attempt, data: bytes, tcp: bool = False) -> None:
        if self.finished:
            return
        if len(data) < 12 or struct.unpack_from(">H", data)[0] != attempt.qid or not data[2] & 0x80:
            return  # not the answer to this attempt: keep waiting (RFC 5452)
        try:
            answer = wire.inspect_answer(data)
        except wire.WireError as e:
            return self.failed(attempt, f"malformed answer: {e}")
        if wire.fold_question(answer.question) != self.question_lower:
            return  # an answer to another question: ignore it
        self.forwarder.health.answered(attempt.server, self.reactor.seconds() - attempt.started)
        self.forwarder.stats.observe_upstream(self.reactor.seconds() - attempt.started)
        if answer.flags & wire.TC and not tcp:
            attempt.close()
            self._send_tcp(attempt.server)
            return
        if answer.rcode in (wire.SERVFAIL, wire.REFUSED):
            return self.failed(attempt, wire.RCODE_NAMES[answer.rcode])
        attempt.close()
        self._finish(answer, None, attempt.server)

    def failed(self, attempt, why: str) -> None:
        attempt.close()
        if self.finished:
            return
        self.last_failure = f"{format_server(attempt.server)}: {why}"
        self.failed_servers.add(attempt.server)
        self.tcp_servers.discard(attempt.server)
        if self.next_call is not None and self.next_call.active():
            self.next_call.cancel()
        self._launch_next()

    def _give_up(self) -> None:
        self.deadline = None
        if not self.finished:
            self._finish(None, f"no answer in time ({self.last_failure})")

    def _finish(self, answer, failure: str | None, winner=None) -> None:
        self.finished = True
        for server in self._missed(winner):
            self.forwarder.health.missed(server)
        for attempt in self.attempts:
            attempt.close()
        if self.next_call is not None and self.next_call.active():
            self.next_call.cancel()
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        if answer is not None:
            self.result.callback(answer)
        else:
            self.result.errback(UpstreamFailed(failure))


    def _missed(self, winner) -> set:
        """Servers still silent now: those asked before ``winner``, the server
        that answered (they had their head start and the next server was tried),
        and any asked MISS_AFTER ago or more.  A dead first server then misses
        on every query and goes last (DOWN_AFTER), though the next server
        answers a stagger later, long before MISS_AFTER."""
        now = self.reactor.seconds()
        first_asked: dict = {}
        for attempt in self.attempts:
            first_asked.setdefault(attempt.server, attempt.started)
        winner_asked = first_asked.get(winner, now)
        return {a.server for a in self.attempts if not a.done and a.server != winner
                and (first_asked[a.server] < winner_asked or now - a.started >= MISS_AFTER)}


class Forwarder:
    def __init__(self, reactor, stats, budget: float = 1.6, rng: random.Random | None = None):
        self.reactor = reactor
        self.stats = stats
        self.budget = budget
        self.health = ServerHealth(reactor)
        self._rng = rng or random.SystemRandom()

    def new_id(self) -> int:
        return self._rng.getrandbits(16)

    def query(self, question: bytes, do: bool, servers: list) -> defer.Deferred:
        """Fires with a wire.UpstreamAnswer, or fails with UpstreamFailed."""
        return _Exchange(self, question, do, list(servers), self.budget).start()
