"""DNS over UDP: our own socket on the reactor, the hot path in its reads.

Not listenUDP: one read answers up to BATCH datagrams.  On Linux they come
in batches of up to 64 with one recvmmsg; each answer is written over its
query (the ID and the client's address are already there) and the batch
goes out with one sendmmsg (``mmsg``): the system calls were most of the
cost.  Elsewhere it is one recvfrom and one sendto per query.  Both ways
admit a client by the same ``ClientFilter.verdicts`` and answer it from
``HotAnswers.lookup`` when they can, else through ``Resolver.resolve``.
"""

from __future__ import annotations

import socket
import sys

from twisted.internet import defer
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from networkd.dns import mmsg, wire
from networkd.dns.eventloop import ReadRegistration
from networkd.dns.resolver import Resolver

log = Logger()

UDP_RCVBUF = 4 << 20
# Under a flood, one read at most this often (seconds), so that each takes many datagrams.
COALESCE = 0.001
# Python's socket module lacks SO_RCVBUFFORCE (Linux: 33), which lets root
# exceed net.core.rmem_max.
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33 if sys.platform.startswith("linux") else None)


def set_receive_buffer(sock: socket.socket, size: int = UDP_RCVBUF) -> int:
    """Ask for ``size`` bytes of receive buffer: what absorbs a burst, or a
    flood while the reactor is busy, instead of dropping real queries with
    the garbage.  Without CAP_NET_ADMIN the kernel caps it at
    net.core.rmem_max (often 208 KB): said once, with the fix.  The size
    the kernel reports (twice what it grants, for its bookkeeping) is
    returned."""
    for option in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
        if option is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, size)
            break
        except OSError:
            continue
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if granted < size:
        log.warn("DNS UDP receive buffer is {granted} bytes, not the {size} asked for: floods and bursts will "
                 "drop queries sooner; raise net.core.rmem_max (sysctl) to at least {size}",
                 granted=granted, size=size)
    return granted


@implementer(IReadDescriptor)
class DnsUdpListener:
    BATCH = 256
    MAX_QUERY = 8192

    def __init__(self, resolver: Resolver, reactor, host: str, port: int, *, batched: bool | None = None,
                 sock: socket.socket | None = None):
        """``batched``: read and answer with recvmmsg/sendmmsg (default: where
        the platform has them), else one recvfrom and sendto per query.
        ``sock``: an already bound socket to serve (socket activation)
        instead of binding ``host:port``."""
        self.resolver = resolver
        self.reactor = reactor
        if sock is None:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.bind((host, port))
            except OSError:
                sock.close()
                raise
        self.sock = sock
        self.sock.setblocking(False)
        self.receive_buffer = set_receive_buffer(self.sock)
        self.port = self.sock.getsockname()[1]
        self._sendto = self.sock.sendto
        self._admitted = resolver.clients.verdicts  # address -> bool, decided on first sight
        self._lookup = resolver.hot.lookup
        self._queries = resolver.stats.queries
        self._dropped = resolver.stats.dropped
        self._family = self.sock.family
        self._open = True
        if batched is None:
            batched = mmsg.available()
        self._batch = mmsg.DatagramBatch(self.sock) if batched else None
        if self._batch is not None:
            self.doRead = self._read_batches
        self._last_read = float("-inf")  # when the last coalesced read began
        self._resume_call = None  # the timer that ends a pause between reads
        self._reading = ReadRegistration(reactor, self, "DNS UDP", read=self._read_coalesced)
        self._reading.start()

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "dns-udp"

    def connectionLost(self, reason) -> None:
        self.stopListening()

    def stopReading(self) -> None:
        """Leave queries queued in the socket (tests and benchmarks then call doRead)."""
        self._cancel_resume()
        self._reading.stop()

    def startReading(self) -> None:
        if self._open:
            self._reading.start()

    def stopListening(self) -> None:
        if self._open:
            self._open = False
            self._cancel_resume()
            self._reading.stop()
            self.sock.close()

    # -- coalescing ------------------------------------------------------------

    def _read_coalesced(self) -> None:
        """What the event loop calls when the socket is readable.

        Under a flood of small datagrams the socket is readable again a few
        µs after each read: every wake-up then took one or two datagrams, and
        the wake-ups (4,000 a second at 12,000 datagrams a second) cost more
        than the datagrams, half a core; on a busy host the scheduler makes a
        process that uses more CPU wait longer, and every query waited
        (issue 12 item 7).  So a wake-up within COALESCE of the last read's
        start takes the reader off the loop for the rest of it, and the read
        after takes everything queued, in batches.  A query that finds the
        server idle is read at once; one in a flood waits 1 ms at most."""
        now = self.reactor.seconds()
        wait = self._last_read + COALESCE - now
        if wait > 0:
            self._reading.stop()
            self._resume_call = self.reactor.callLater(wait, self._resume)
            return
        self._last_read = now
        self.doRead()

    def _resume(self) -> None:
        self._resume_call = None
        if self._open:
            self._reading.start()  # readable already: the loop calls _read_coalesced next turn

    def _cancel_resume(self) -> None:
        if self._resume_call is not None and self._resume_call.active():
            self._resume_call.cancel()
        self._resume_call = None

    # -- the hot path ----------------------------------------------------------
    # A hit is a HotEntry, already aged by lookup(): ``body`` is the answer
    # after its ID, ``counter`` its key in DnsStats.queries.

    def doRead(self) -> None:
        """Up to BATCH datagrams, one recvfrom and one sendto each; a hot hit
        is answered inline (``answer`` unrolled: this loop is the whole budget)."""
        recvfrom = self.sock.recvfrom
        sendto = self._sendto
        admitted = self._admitted
        lookup = self._lookup
        queries = self._queries
        slow = self.datagramReceived
        size = self.MAX_QUERY
        now = self.reactor.seconds()
        for _ in range(self.BATCH):
            try:
                data, addr = recvfrom(size)
            except BlockingIOError:
                return
            except OSError:
                if not self._open:
                    return
                continue
            if admitted[addr[0]]:
                hit = lookup(data[2:], now)
                if hit is not None:
                    try:
                        sendto(data[:2] + hit.body, addr)
                    except OSError:
                        pass
                    queries[hit.counter] = queries.get(hit.counter, 0) + 1
                    continue
            slow(data, addr)
            if not self._open:
                return

    def _read_batches(self) -> None:
        """recvmmsg/sendmmsg: each answer is written over its query in place
        and a batch goes out with one call.  Only an answer that cannot be had
        now (forwarded, dropped) splits the batch."""
        batch = self._batch
        data, raw, size = batch.data, batch.raw, batch.size
        admitted, lookup, queries = self._admitted, self._lookup, self._queries
        set_length, send, answer = batch.set_reply_length, batch.send, self.answer
        clock = self.reactor.seconds
        for _ in range(self.BATCH // batch.slots):
            n = batch.receive()
            if not n:
                return
            start = 0
            now = clock()
            for i, (length, sender) in enumerate(zip(batch.lengths(n), batch.senders(n))):
                offset = i * size
                if length > 12 and admitted[sender]:
                    hit = lookup(raw[offset + 2:offset + length], now)
                    if hit is not None:
                        body = hit.body
                        data[offset + 2:offset + 2 + len(body)] = body
                        set_length(i, 2 + len(body))
                        queries[hit.counter] = queries.get(hit.counter, 0) + 1
                        continue
                if length < 0:  # larger than a slot: garbage (a query fits in 4 KB)
                    self._dropped["oversize"] = self._dropped.get("oversize", 0) + 1
                    if start < i:
                        send(start, i)
                    start = i + 1
                    continue
                addr = self._address(i)
                result = answer(raw[offset:offset + length], addr)
                if type(result) is bytes and len(result) <= size:
                    data[offset:offset + len(result)] = result
                    set_length(i, len(result))
                    continue
                if start < i:
                    send(start, i)
                start = i + 1
                self._reply(result, addr)
                if not self._open:
                    return
            if start < n:
                send(start, n)

    def _address(self, i: int):
        name = self._batch.names[i * self._batch.namesize:(i + 1) * self._batch.namesize]
        port = int.from_bytes(name[2:4], "big")
        if self._family == socket.AF_INET:
            return socket.inet_ntop(socket.AF_INET, name[4:8]), port
        flowinfo = int.from_bytes(name[4:8], "big")
        return socket.inet_ntop(socket.AF_INET6, name[8:24]), port, flowinfo, int.from_bytes(name[24:28], sys.byteorder)

    # -- one datagram at a time ------------------------------------------------

    def datagramReceived(self, data: bytes, addr) -> None:
        self._reply(self.answer(data, addr), addr)

    def answer(self, data: bytes, addr):
        """The answer to one datagram: bytes, None (nothing to send) or a
        Deferred firing with one of those; never raises."""
        try:
            if self._admitted[addr[0]]:
                now = self.reactor.seconds()
                hit = self._lookup(data[2:], now)
                if hit is None:
                    key = wire.question_key(data)
                    if key is not None:
                        hit = self._lookup(key, now)
                if hit is not None:
                    self._queries[hit.counter] = self._queries.get(hit.counter, 0) + 1
                    return data[:2] + hit.body
            return self.resolver.resolve(data, addr[0], udp=True)
        except Exception:
            log.failure("DNS query from {addr} failed", addr=addr[0])
            return None

    def _reply(self, result, addr) -> None:
        if result is None:
            return
        if isinstance(result, defer.Deferred):
            result.addCallback(self._send, addr)
            result.addErrback(lambda f: log.failure("DNS answer to {addr} failed", f, addr=addr[0]))
        else:
            self._send(result, addr)

    def _send(self, response, addr) -> None:
        if response is None or not self._open:
            return
        try:
            self._sendto(response, addr)
        except OSError:
            pass  # send buffer full or the client went away: a lost datagram
