"""The query path: UDP and TCP protocols, the hot path, and the resolver
chain zone -> cache -> forwarder.

Hot path (UDP): a query whose bytes after the ID (when it has no EDNS
options) or whose key (flags + raw question + EDNS summary, which ignores a
cookie; wire.question_key) is in ``hot_local`` or ``hot_cached`` is answered
by the pre-packed bytes after its ID: no parsing, no logging, no objects.
On Linux the listener reads up to 64 queries with one recvmmsg, writes each
answer over its query (ID and client address stay where they are) and sends
them with one sendmmsg: the system calls were most of the cost.  Everything
else goes to ``Resolver.resolve``, which fills those tables.  ``hot_local``
is emptied with each new zone.  A ``hot_cached`` answer carries the time
its TTLs next change (its age ticks over); its first hit after that patches
them again (``Resolver.reage``: a few bytes, no parsing), so cached TTLs keep
counting down without sending every cached name through the slow path.
Entry layout: (bytes after the ID, stats counter, good-until time or 0 for
never, cache entry or None).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from networkd.dns import mmsg, wire
from networkd.dns.cache import Cache, Entry, render
from networkd.dns.forward import Forwarder, UpstreamFailed
from networkd.dns.upstreams import ForwardZones
from networkd.dns.zone import EMPTY_ZONE, Zone
from networkd.views import DnsStats

log = Logger()

HOT_LIMIT = 50_000  # entries per hot table before it is emptied
UDP_RCVBUF = 4 << 20
# Python's socket module lacks SO_RCVBUFFORCE (Linux: 33), which lets root
# exceed net.core.rmem_max.
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33 if sys.platform.startswith("linux") else None)
TCP_IDLE_TIMEOUT = 10.0
TCP_MAX_CONNECTIONS = 256
TCP_MAX_PENDING = 32  # unanswered queries per TCP connection
ZONE_TRANSFERS = (251, 252)  # IXFR, AXFR: not something a forwarder relays
LOOPBACK6 = bytes(15) + b"\x01"
_TTL = struct.Struct(">I")
MAX_FORWARDS = 1000  # questions in flight to upstreams at once (dnsmasq: --dns-forward-max 150)


class ClientFilter:
    """Loopback, plus the --dns-allow networks; memoised per address."""

    def __init__(self, allow=()):
        self.allow = tuple(allow)
        self.known: dict = {}

    def __call__(self, host: str) -> bool:
        verdict = self.known.get(host)
        if verdict is None:
            verdict = self._decide(host)
            if len(self.known) > 10_000:
                self.known.clear()
            self.known[host] = verdict
        return verdict

    def _decide(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped:
            address = address.ipv4_mapped
        if address.is_loopback:
            return True
        return any(address.version == net.version and address in net for net in self.allow)


class Resolver:
    """Answers one query message: local zone, then cache, then upstreams."""

    def __init__(self, reactor, *, cache_size: int, stats: DnsStats | None = None,
                 client_filter: ClientFilter | None = None, budget: float = 1.6):
        self.reactor = reactor
        self.stats = stats or DnsStats()
        self.zone: Zone = EMPTY_ZONE
        self.forward_zones = ForwardZones({})
        self.upstreams: list = []
        self.cache = Cache(cache_size, reactor)
        self.forwarder = Forwarder(reactor, self.stats, budget=budget)
        self.allowed = client_filter or ClientFilter()
        self.hot_local: dict = {}
        self.hot_cached: dict = {}
        self._inflight: dict = {}
        self.max_forwards = MAX_FORWARDS

    # -- data ------------------------------------------------------------------

    def set_zone(self, zone: Zone) -> None:
        self.zone = zone
        self.hot_local.clear()

    def set_forward_zones(self, zones: ForwardZones) -> None:
        if zones != self.forward_zones:
            self.forward_zones = zones
            self.flush()

    def set_upstreams(self, servers: list) -> bool:
        """Replace the upstream list; the cache is flushed if it changed."""
        servers = list(servers)
        if servers == self.upstreams:
            return False
        self.upstreams = servers
        self.flush()
        return True

    def flush(self) -> None:
        self.cache.clear()
        self.hot_cached.clear()

    def reage(self, key: bytes, hit: tuple, now: float):
        """A hot cached answer whose TTLs are a second behind: patched to
        ``now``; None (and dropped) when it is about to expire."""
        entry = hit[3]
        if entry.expires_at - now <= 2:
            self.hot_cached.pop(key, None)
            return None
        body = bytearray(hit[0])
        age = int(now - entry.stored_at)
        for offset, ttl in entry.answer.ttl_offsets:
            _TTL.pack_into(body, offset - 2, max(0, ttl - age))
        hit = (bytes(body), hit[1], entry.stored_at + age + 1, entry)
        self.hot_cached[key] = hit
        return hit

    # -- counting --------------------------------------------------------------

    def count(self, rcode: int, source: str) -> None:
        key = (wire.RCODE_NAMES.get(rcode, str(rcode)), source)
        queries = self.stats.queries
        queries[key] = queries.get(key, 0) + 1

    # -- the slow path ---------------------------------------------------------

    def resolve(self, data: bytes, client: str, udp: bool):
        """bytes to send, None to drop, or a Deferred firing with one of those."""
        data = bytes(data)
        allowed = self.allowed(client)
        try:
            query = wire.parse_query(data)
        except wire.QueryError as e:
            if e.rcode is None or not allowed:
                return None
            self.count(e.rcode, "error")
            return wire.error_response(data, e.rcode)
        if not allowed:
            self.count(wire.REFUSED, "refused")
            return wire.error_response(query, wire.REFUSED)
        if query.edns and query.edns_version != 0:
            self.count(wire.BADVERS, "error")
            return wire.error_response(query, wire.BADVERS)
        if query.qtype in ZONE_TRANSFERS:
            self.count(wire.NOTIMP, "error")
            return wire.error_response(query, wire.NOTIMP)

        name = wire.wire_to_text(query.qname)
        if name is not None and query.qclass in (wire.CLASS_IN, wire.TYPE_ANY):
            found = self.zone.lookup(name)
            if found is not None:
                response = self.zone.answer(query, *found)
                self.count(wire.NOERROR, "local")
                if udp:
                    self._remember(self.hot_local, data, response, (wire.RCODE_NAMES[0], "local"), 0, None)
                return self._fit(response, query, udp)

        key = (query.qname.lower(), query.qtype, query.qclass, query.do)
        entry = self.cache.get(key)
        if entry is not None:
            self.stats.cache_hits += 1
            return self._from_cache(entry, query, data, udp)
        self.stats.cache_misses += 1

        servers = None
        if name is not None:
            servers = self.forward_zones.servers_for(name)
        if servers is None:
            servers = self.upstreams
        waiting = self._inflight.get(key)
        if waiting is None:
            if len(self._inflight) >= self.max_forwards:
                # Upstreams are not keeping up: fail fast rather than pile up sockets.
                self.count(wire.SERVFAIL, "error")
                return self._fit(wire.error_response(query, wire.SERVFAIL), query, udp)
            waiting = self._inflight[key] = []
            exchange = self.forwarder.query(query.question, query.do, servers)
            exchange.addBoth(self._forwarded, key)
        result = defer.Deferred()
        waiting.append((result, query, udp))
        return result

    def _forwarded(self, outcome, key) -> None:
        waiters = self._inflight.pop(key, [])
        if isinstance(outcome, defer.Failure):
            if not outcome.check(UpstreamFailed):
                log.failure("forwarding failed unexpectedly", outcome)
            else:
                log.debug("upstream failure: {why}", why=outcome.getErrorMessage())
            self.cache.put_failure(key)
            for result, query, udp in waiters:
                self.count(wire.SERVFAIL, "forward")
                result.callback(wire.error_response(query, wire.SERVFAIL))
            return
        entry = self.cache.put_answer(key, outcome)
        now = self.reactor.seconds()
        for result, query, udp in waiters:
            try:
                response = render(entry or Entry(outcome, outcome.rcode, now, now), query, now)
                response = self._fit(response, query, udp)
                self.count(outcome.rcode, "forward")
            except Exception:
                log.failure("cannot answer {name!r} from an upstream answer", name=query.qname)
                response = wire.error_response(query, wire.SERVFAIL)
                self.count(wire.SERVFAIL, "error")
            result.callback(response)

    def _from_cache(self, entry, query: wire.Query, data: bytes, udp: bool) -> bytes:
        if entry.failure:
            self.count(wire.SERVFAIL, "cache")
            return wire.error_response(query, wire.SERVFAIL)
        now = self.reactor.seconds()
        response = render(entry, query, now)
        self.count(entry.rcode, "cache")
        if udp and entry.expires_at - now > 2:
            # Good until its age, and so its TTLs, next change.
            good_until = entry.stored_at + int(now - entry.stored_at) + 1
            self._remember(self.hot_cached, data, response, (wire.RCODE_NAMES.get(entry.rcode, "?"), "cache"),
                           good_until, entry)
        return self._fit(response, query, udp)

    def _remember(self, table: dict, data: bytes, response: bytes, counter, *extra) -> None:
        """Keep the packed answer for the hot path (small answers, clean names only)."""
        if len(response) > wire.PLAIN_UDP_SIZE:
            return
        key = wire.question_key(data)
        if key is None or b"\x00" in data[12:data.find(b"\x00", 12)]:
            return
        if len(table) >= HOT_LIMIT:
            table.clear()
        entry = (response[2:], counter, *extra)
        table[key] = entry
        if wire.has_fixed_bytes(data):
            table[data[2:]] = entry

    @staticmethod
    def _fit(response: bytes, query: wire.Query, udp: bool) -> bytes:
        if udp and len(response) > query.max_udp:
            return wire.truncated(response, 12 + len(query.question), query.do if query.edns else None)
        return response


@implementer(IReadDescriptor)
class DnsUdpListener:
    """UDP: our own socket on the reactor, the hot path in ``doRead``.

    Not listenUDP: one ``doRead`` answers up to BATCH datagrams, in batches
    of recvmmsg/sendmmsg where the platform has them (``mmsg``), else one
    recvfrom/sendto each.  Together with skipping Twisted's per-wake-up
    logging context, that is what puts us ahead of dnsmasq.
    """

    BATCH = 256
    MAX_QUERY = 8192

    def __init__(self, resolver: Resolver, reactor, host: str, port: int, *, batched: bool | None = None):
        """``batched``: read and answer with recvmmsg/sendmmsg (default: where
        the platform has them), else one recvfrom and sendto per query."""
        self.resolver = resolver
        self.reactor = reactor
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.bind((host, port))
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        for option in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
            if option is None:
                continue
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, option, UDP_RCVBUF)
                break
            except OSError:
                continue
        self.port = self.sock.getsockname()[1]
        self._sendto = self.sock.sendto
        self._known = resolver.allowed.known
        self._hot_local = resolver.hot_local
        self._hot_cached = resolver.hot_cached
        self._queries = resolver.stats.queries
        self._open = True
        if batched is None:
            batched = mmsg.available()
        self._batch = mmsg.DatagramBatch(self.sock) if batched else None
        if self._batch is not None:
            self.doRead = self._read_batches
        # On Twisted's asyncio reactor, register with the asyncio loop itself:
        # the reactor's addReader wraps every wake-up in a logging context,
        # which costs more than answering a query.
        self._loop = getattr(reactor, "_asyncioEventloop", None)
        if self._loop is not None:
            self._loop.add_reader(self.sock.fileno(), self._read_guarded)
        else:
            reactor.addReader(self)

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "dns-udp"

    def connectionLost(self, reason) -> None:
        self.stopListening()

    def stopListening(self) -> None:
        if self._open:
            self._open = False
            if self._loop is not None:
                self._loop.remove_reader(self.sock.fileno())
            else:
                self.reactor.removeReader(self)
            self.sock.close()

    def _read_guarded(self) -> None:
        try:
            self.doRead()
        except Exception:
            log.failure("DNS UDP read failed")

    def doRead(self) -> None:
        """Up to BATCH datagrams; hot hits answered inline (same logic as
        datagramReceived, unrolled because this loop is the whole budget)."""
        recvfrom = self.sock.recvfrom
        sendto = self._sendto
        known = self._known
        local = self._hot_local
        cached = self._hot_cached
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
            if known.get(addr[0]) is True:
                rest = data[2:]
                hit = local.get(rest) or cached.get(rest)
                if hit is not None and not (hit[2] and now >= hit[2]):
                    try:
                        sendto(data[:2] + hit[0], addr)
                    except OSError:
                        pass
                    queries[hit[1]] = queries.get(hit[1], 0) + 1
                    continue
            slow(data, addr)
            if not self._open:
                return

    def _read_batches(self) -> None:
        """Hot path with recvmmsg/sendmmsg: each answer is written over its
        query in place (the ID and the client address are already there) and
        a batch goes out with one call.  Only an answer that cannot be had
        now (forwarded, dropped) splits the batch."""
        batch = self._batch
        data, names, size, namesize = batch.data, batch.names, batch.size, batch.namesize
        v4 = self.sock.family == socket.AF_INET
        local, cached, queries = self._hot_local, self._hot_cached, self._queries
        set_length, send, answer = batch.set_reply_length, batch.send, self.answer
        clock, reage = self.reactor.seconds, self.resolver.reage
        for _ in range(self.BATCH // batch.slots):
            n = batch.receive()
            if not n:
                return
            start = 0
            now = clock()
            for i, length in enumerate(batch.lengths(n)):
                offset = i * size
                if length > 12 and (names[i * namesize + 4] == 127 if v4 else
                                    names[i * namesize + 8:i * namesize + 24] == LOOPBACK6):
                    rest = bytes(data[offset + 2:offset + length])
                    hit = local.get(rest) or cached.get(rest)
                    if hit is not None and hit[2] and now >= hit[2]:
                        hit = reage(rest, hit, now)
                    if hit is not None:
                        body = hit[0]
                        data[offset + 2:offset + 2 + len(body)] = body
                        set_length(i, 2 + len(body))
                        queries[hit[1]] = queries.get(hit[1], 0) + 1
                        continue
                addr = self._address(i)
                result = answer(bytes(data[offset:offset + length]), addr) if length >= 0 else None
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
        if self.sock.family == socket.AF_INET:
            return socket.inet_ntop(socket.AF_INET, name[4:8]), port
        flowinfo = int.from_bytes(name[4:8], "big")
        return socket.inet_ntop(socket.AF_INET6, name[8:24]), port, flowinfo, int.from_bytes(name[24:28], sys.byteorder)

    def datagramReceived(self, data: bytes, addr) -> None:
        self._reply(self.answer(data, addr), addr)

    def answer(self, data: bytes, addr):
        """The answer to one datagram: bytes, None (nothing to send) or a
        Deferred firing with one of those; never raises."""
        try:
            if self._known.get(addr[0]) is True:
                key = data[2:]
                hit = self._hot_local.get(key) or self._hot_cached.get(key)
                if hit is None:
                    key = wire.question_key(data)
                    if key is not None:
                        hit = self._hot_local.get(key) or self._hot_cached.get(key)
                if hit is not None and hit[2]:
                    now = self.reactor.seconds()
                    if now >= hit[2]:
                        hit = self.resolver.reage(key, hit, now)
                if hit is not None:
                    queries = self._queries
                    queries[hit[1]] = queries.get(hit[1], 0) + 1
                    return data[:2] + hit[0]
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


class DnsTcpProtocol(protocol.Protocol, TimeoutMixin):
    """TCP: length-prefixed messages, pipelining, idle timeout."""

    def __init__(self, factory):
        self.factory = factory
        self.buffer = b""
        self.pending = 0
        self.counted = False

    def connectionMade(self):
        if self.factory.connections >= self.factory.max_connections:
            self.transport.abortConnection()
            return
        self.factory.connections += 1
        self.counted = True
        self.setTimeout(self.factory.idle_timeout)

    def connectionLost(self, reason=None):
        if self.counted:
            self.factory.connections -= 1
            self.counted = False
        self.setTimeout(None)

    def dataReceived(self, data):
        self.buffer += data
        while len(self.buffer) >= 2:
            length = struct.unpack_from(">H", self.buffer)[0]
            if len(self.buffer) < 2 + length:
                break
            message, self.buffer = self.buffer[2:2 + length], self.buffer[2 + length:]
            self.resetTimeout()
            if self.pending >= TCP_MAX_PENDING:
                self.transport.loseConnection()
                return
            self._handle(message)

    def _handle(self, message: bytes) -> None:
        peer = self.transport.getPeer()
        try:
            result = self.factory.resolver.resolve(message, peer.host, udp=False)
        except Exception:
            log.failure("DNS query over TCP from {addr} failed", addr=peer.host)
            self.transport.loseConnection()
            return
        if result is None:
            self.transport.loseConnection()
        elif isinstance(result, defer.Deferred):
            self.pending += 1
            result.addCallback(self._answer_later)
            result.addErrback(lambda f: log.failure("DNS answer over TCP failed", f))
        else:
            self._write(result)

    def _answer_later(self, response):
        self.pending -= 1
        if response is not None and self.connected:
            self._write(response)

    def _write(self, response: bytes) -> None:
        self.transport.write(struct.pack(">H", len(response)) + response)

    def timeoutConnection(self):
        self.transport.loseConnection()


class DnsTcpFactory(protocol.Factory):
    noisy = False

    def __init__(self, resolver: Resolver, reactor, max_connections: int = TCP_MAX_CONNECTIONS,
                 idle_timeout: float = TCP_IDLE_TIMEOUT):
        self.resolver = resolver
        self.reactor = reactor
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.connections = 0

    def buildProtocol(self, addr):
        proto = DnsTcpProtocol(self)
        proto.callLater = self.reactor.callLater
        return proto
