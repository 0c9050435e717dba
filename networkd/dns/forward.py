"""Ask upstream servers: staggered racing, failover, TCP retry on truncation.

Each server asked gets a fresh UDP socket (random source port) connected to
it, so the kernel only delivers replies from that server, and a fresh
random ID; a re-send goes out on the same socket with the same ID.  A
reply counts only if it has our ID and echoes our question (RFC 5452).
The first server gets a head start based on its smoothed RTT; a
SERVFAIL/REFUSED/refused-port/garbage from one server starts the next at
once.  The asker has an answer or a failure within ``budget`` seconds; past
it, the attempts still open wait until LATE_LIMIT for a late answer, which
goes to the cache.  The sockets themselves are in ``networkd.dns.attempts``.
"""

from __future__ import annotations

import random
import struct

from twisted.internet import defer
from twisted.logger import Logger

from networkd.dns import wire
from networkd.dns.attempts import TcpAttempt, TcpFactory, UdpAttempt
from networkd.dns.health import ServerHealth
from networkd.dns.upstreams import format_server

log = Logger()

RETRANSMIT_AFTER = 0.4  # first re-send to a server already asked; doubles each round
MISS_AFTER = 0.3  # an attempt unanswered this long when the exchange ends is a miss
LATE_LIMIT = 5.0  # seconds after the question an answer is still taken (for the cache)
MAX_LINGERING = 64  # exchanges past their budget still waiting for a late answer


class UpstreamFailed(Exception):
    """No upstream gave a usable answer in time."""


class _Exchange:
    """One question asked of a list of servers until someone answers."""

    def __init__(self, forwarder, question: bytes, do: bool, servers: list, budget: float, late=None,
                 cd: bool = False):
        self.forwarder = forwarder
        self.late = late  # called with an answer that comes after the budget
        self.lingering = None  # the timer that ends the wait for a late answer
        self.reactor = forwarder.reactor
        self.question = question
        self.question_lower = wire.fold_question(question)
        self.do = do
        self.cd = cd  # the client's "checking disabled": the upstream must see it too
        self.servers = forwarder.health.order(servers)
        self.result = defer.Deferred()
        self.attempts: list = []
        self.udp: dict = {}  # server -> its open UdpAttempt, for re-sends
        self.finished = False
        self.next_index = 0
        self.failed_servers: set = set()
        self.tcp_servers: set = set()
        self.last_failure = "no upstream"
        self.next_call = None
        self.started = self.reactor.seconds()
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
        """Ask ``server``: again on its open socket if it has one, else on a new one."""
        try:
            attempt = self.udp.get(server)
            if attempt is not None and not attempt.done:
                attempt.resend()
                return
            qid = self.forwarder.new_id()
            attempt = UdpAttempt(self, server, qid, wire.make_query(qid, self.question_lower, self.do, self.cd))
        except OSError as e:  # e.g. out of file descriptors, no route
            self.last_failure = f"{format_server(server)}: {e.strerror or e}"
            self.failed_servers.add(server)
            return
        self.attempts.append(attempt)
        self.udp[server] = attempt

    def _send_tcp(self, server) -> None:
        qid = self.forwarder.new_id()
        attempt = TcpAttempt(self, server, qid, wire.make_query(qid, self.question_lower, self.do, self.cd))
        self.attempts.append(attempt)
        self.tcp_servers.add(server)
        remaining = max(0.1, self.deadline.getTime() - self.reactor.seconds())
        attempt.connector = self.reactor.connectTCP(server[0], server[1], TcpFactory(attempt), timeout=remaining)

    def reply(self, attempt, data: bytes, tcp: bool = False) -> None:
        if self.finished and self.lingering is None:
            return
        if len(data) < 12 or struct.unpack_from(">H", data)[0] != attempt.qid or not data[2] & 0x80:
            return  # not the answer to this attempt: keep waiting (RFC 5452)
        try:
            answer = wire.inspect_answer(data)
        except wire.WireError as e:
            return self.failed(attempt, f"malformed answer: {e}")
        if wire.fold_question(answer.question) != self.question_lower:
            return  # an answer to another question: ignore it
        # The RTT from the last send: an answer to an earlier one only makes it look faster.
        self.forwarder.health.answered(attempt.server, self.reactor.seconds() - getattr(attempt, "sent_at", attempt.started))
        self.forwarder.stats.observe_upstream(self.reactor.seconds() - attempt.started)
        if self.finished:
            return self._late_reply(attempt, answer)
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
            if all(a.done for a in self.attempts):
                self._stop_lingering()
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
            self._finish(None, f"no answer in time ({self.last_failure})", linger=True)

    def _finish(self, answer, failure: str | None, winner=None, linger: bool = False) -> None:
        self.finished = True
        for server in self._missed(winner):
            self.forwarder.health.missed(server)
        if not (linger and self._linger()):
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

    def _linger(self) -> bool:
        """Past the budget the client gets SERVFAIL, but the attempts still
        open stay open until LATE_LIMIT: a slow upstream's answer is then
        cached for the client's retry, instead of SERVFAIL on every try."""
        forwarder = self.forwarder
        if self.late is None or forwarder.lingering >= MAX_LINGERING or all(a.done for a in self.attempts):
            return False
        forwarder.lingering += 1
        wait = max(0.0, LATE_LIMIT - (self.reactor.seconds() - self.started))
        self.lingering = self.reactor.callLater(wait, self._stop_lingering)
        return True

    def _late_reply(self, attempt, answer) -> None:
        """An answer after the budget: given to ``late`` if it is one to cache."""
        attempt.close()
        if answer.rcode in (wire.SERVFAIL, wire.REFUSED) or answer.flags & wire.TC:
            if all(a.done for a in self.attempts):
                self._stop_lingering()
            return
        self._stop_lingering()
        try:
            self.late(answer)
        except Exception:
            log.failure("a late upstream answer could not be kept")

    def _stop_lingering(self) -> None:
        if self.lingering is None:
            return
        if self.lingering.active():
            self.lingering.cancel()
        self.lingering = None
        self.forwarder.lingering -= 1
        for attempt in self.attempts:
            attempt.close()

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
        self.lingering = 0  # exchanges waiting for a late answer
        self._rng = rng or random.SystemRandom()

    def new_id(self) -> int:
        return self._rng.getrandbits(16)

    def query(self, question: bytes, do: bool, servers: list, late=None, cd: bool = False) -> defer.Deferred:
        """Fires with a wire.UpstreamAnswer, or fails with UpstreamFailed;
        ``late(answer)`` gets an answer that arrives after the failure."""
        return _Exchange(self, question, do, list(servers), self.budget, late, cd).start()
