"""The links of the resolver's chain behind the local zone: answers the
cache holds, and the forwarder (``networkd.dns.resolver`` asks them in
order), with what every link shares: the query as it sees it (``Ask``), the
counters, the fit of an answer to UDP."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import partial

from twisted.internet import defer
from twisted.logger import Logger

from networkd.dns import wire
from networkd.dns.cache import Cache, Entry, render
from networkd.dns.forward import Forwarder, UpstreamFailed
from networkd.dns.hot import HotAnswers
from networkd.dns.upstreams import ForwardZones
from networkd.views import DnsStats

log = Logger()

# Questions in flight to upstreams at once (--dns-forward-max; dnsmasq's --dns-forward-max is 150 too).
# What a flood of uncached names for a silent upstream may hold: each is a socket, two timers and
# ~40 objects for 1.6 s; at 1,000 they cost 10 % of a core and 100 ms+ garbage-collector passes.
MAX_FORWARDS = 150
PREFETCH_HITS = 3  # uses in an answer's lifetime that make it popular: refreshed before it expires
PREFETCH_WINDOW = 0.1  # ... in the last tenth of its TTL,
PREFETCH_MIN = 3.0  # ... or its last 3 s (hot answers leave the hot table 2 s before expiry)
STALE_RECHECK = 30.0  # after a failed refresh, seconds a name is served stale before it is asked again (RFC 8767)


@dataclass(slots=True)
class Ask:
    """One admitted, well-formed query, as the links see it."""

    data: bytes  # the message as received (it keys the hot answers)
    query: wire.Query
    name: str  # lower-case text, any odd byte escaped (wire.wire_to_text)
    key: tuple  # the cache key: (lower-case wire name, type, class, DO, CD)
    udp: bool


def count(stats: DnsStats, rcode: int, source: str) -> None:
    key = (wire.RCODE_NAMES.get(rcode, str(rcode)), source)
    stats.queries[key] = stats.queries.get(key, 0) + 1


def fit(response: bytes, query: wire.Query, udp: bool) -> bytes:
    """Over UDP, an answer larger than the client takes goes out truncated (TC)."""
    if udp and len(response) > query.max_udp:
        return wire.truncated(response, 12 + len(query.question), query.do if query.edns else None)
    return response


class CachedAnswers:
    """Upstream answers (and brief failures) the cache still holds; and an
    expired answer whose refresh failed, served stale (RFC 8767) at once
    while one refresh at a time runs in the background (``refresh``).

    Prefetch: an answer used PREFETCH_HITS times (cache hits, and hot hits
    once a second each, when they re-age it) is refreshed in the background
    once it enters the end of its life, so a popular name never misses."""

    def __init__(self, reactor, cache: Cache, stats: DnsStats, hot: HotAnswers, refresh):
        self.reactor = reactor
        self.cache = cache
        self.stats = stats
        self.hot = hot
        self.refresh = refresh

    def answer(self, ask: Ask):
        entry = self.cache.get(ask.key)
        if entry is None:
            stale = self.cache.stale(ask.key)
            if stale is not None and stale.stale_until:
                return self._stale(ask, stale)
            self.stats.cache_misses += 1
            return None
        self.stats.cache_hits += 1
        query = ask.query
        if entry.failure:
            count(self.stats, wire.SERVFAIL, "cache")
            return wire.error_response(query, wire.SERVFAIL)
        now = self.reactor.seconds()
        self.used(entry, now)
        response = render(entry, query, now)
        count(self.stats, entry.rcode, "cache")
        if ask.udp:
            self.hot.remember_cached(ask.data, response, entry, now)
        return fit(response, query, ask.udp)

    def used(self, entry: Entry, now: float) -> None:
        """One more use of a live answer; a popular one near its end is refreshed."""
        entry.hits += 1
        if entry.hits >= PREFETCH_HITS and not entry.prefetched:
            window = max(PREFETCH_MIN, (entry.expires_at - entry.stored_at) * PREFETCH_WINDOW)
            if entry.expires_at - now <= window:
                entry.prefetched = True
                self.refresh(entry.key)

    def _stale(self, ask: Ask, entry: Entry) -> bytes:
        now = self.reactor.seconds()
        if now >= entry.stale_until:
            self.refresh(ask.key)
        count(self.stats, entry.rcode, "stale")
        return fit(render(entry, ask.query, now, stale=True), ask.query, ask.udp)


class Forwarding:
    """The forwarding zone's servers, else the upstreams: one exchange per
    cache key in flight, shared by everyone asking; its outcome is cached."""

    def __init__(self, reactor, cache: Cache, stats: DnsStats, budget: float):
        self.reactor = reactor
        self.cache = cache
        self.stats = stats
        self.forwarder = Forwarder(reactor, stats, budget=budget)
        self.zones = ForwardZones({})
        self.upstreams: list = []
        self.inflight: dict = {}  # cache key -> [(Deferred, query, udp), ...]
        self.max_forwards = MAX_FORWARDS
        self.epoch = 0  # counts cache flushes: a late answer from before one is not kept
        self.stale_recheck = STALE_RECHECK

    def answer(self, ask: Ask):
        query, key = ask.query, ask.key
        result = defer.Deferred()
        waiting = self.inflight.get(key)
        if waiting is not None:
            waiting.append((result, query, ask.udp))
            return result
        if len(self.inflight) >= self.max_forwards:
            # Upstreams are not keeping up: fail fast rather than pile up sockets.
            count(self.stats, wire.SERVFAIL, "error")
            return fit(wire.error_response(query, wire.SERVFAIL), query, ask.udp)
        # The asker waits before the exchange starts: one that fails at once (no upstream
        # at all, every socket refused) must still answer it, with SERVFAIL.
        self.inflight[key] = [(result, query, ask.udp)]
        self._ask_upstream(key)
        return result

    def refresh(self, key) -> None:
        """Ask again in the background for a cache key (a name served stale,
        or a popular one about to expire): nobody waits, and only if no
        exchange for it is in flight already."""
        entry = self.cache.stale(key)
        if entry is not None:
            entry.stale_until = self.reactor.seconds() + self.stale_recheck
        if key not in self.inflight and len(self.inflight) < self.max_forwards:
            self.inflight[key] = []
            self._ask_upstream(key)

    def _ask_upstream(self, key) -> None:
        """One exchange for a cache key: (lower-case wire name, type, class, DO, CD)."""
        qname, qtype, qclass, do, cd = key
        servers = self.zones.servers_for(wire.wire_to_text(qname))
        if servers is None:
            servers = self.upstreams
        late = partial(self._late_answer, key, self.epoch)
        question = qname + struct.pack(">HH", qtype, qclass)
        # CD=1 data may be what a validating upstream refuses at CD=0
        self.forwarder.query(question, do, servers, late, cd=cd).addBoth(self._forwarded, key)

    def _late_answer(self, key, epoch: int, answer) -> None:
        """An answer after the client got SERVFAIL: cached for its retry."""
        if epoch == self.epoch and self.cache.put_answer(key, answer) is None:
            self.cache.drop_stale(key)

    def _forwarded(self, outcome, key) -> None:
        waiters = self.inflight.pop(key, [])
        if isinstance(outcome, defer.Failure):
            if not outcome.check(UpstreamFailed):
                log.failure("forwarding failed unexpectedly", outcome)
            else:
                log.debug("upstream failure: {why}", why=outcome.getErrorMessage())
            stale = self.cache.stale(key)
            if stale is not None:  # RFC 8767: the expired answer, rather than SERVFAIL
                return self._answer_stale(stale, waiters)
            self.cache.put_failure(key)
            for result, query, udp in waiters:
                count(self.stats, wire.SERVFAIL, "forward")
                result.callback(wire.error_response(query, wire.SERVFAIL))
            return
        entry = self.cache.put_answer(key, outcome)
        if entry is None:
            self.cache.drop_stale(key)  # never served again over this fresher answer
        now = self.reactor.seconds()
        for result, query, udp in waiters:
            try:
                response = render(entry or Entry(outcome, outcome.rcode, now, now), query, now)
                response = fit(response, query, udp)
                count(self.stats, outcome.rcode, "forward")
            except Exception:
                log.failure("cannot answer {name!r} from an upstream answer", name=query.qname)
                response = wire.error_response(query, wire.SERVFAIL)
                count(self.stats, wire.SERVFAIL, "error")
            result.callback(response)

    def _answer_stale(self, entry: Entry, waiters: list) -> None:
        now = self.reactor.seconds()
        entry.stale_until = now + self.stale_recheck  # served at once from now on, refreshed later
        for result, query, udp in waiters:
            count(self.stats, entry.rcode, "stale")
            result.callback(fit(render(entry, query, now, stale=True), query, udp))
