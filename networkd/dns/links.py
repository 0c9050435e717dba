"""The links of the resolver's chain behind the local zone: answers the
cache holds, and the forwarder (``networkd.dns.resolver`` asks them in
order), with what every link shares: the query as it sees it (``Ask``), the
counters, the fit of an answer to UDP."""

from __future__ import annotations

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

MAX_FORWARDS = 1000  # questions in flight to upstreams at once (dnsmasq: --dns-forward-max 150)
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
    while one refresh at a time runs in the background (``refresh``)."""

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
        response = render(entry, query, now)
        count(self.stats, entry.rcode, "cache")
        if ask.udp:
            self.hot.remember_cached(ask.data, response, entry, now)
        return fit(response, query, ask.udp)

    def _stale(self, ask: Ask, entry: Entry) -> bytes:
        now = self.reactor.seconds()
        if now >= entry.stale_until:
            self.refresh(ask)
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
        self._ask_upstream(ask)
        return result

    def refresh(self, ask: Ask) -> None:
        """Ask again in the background for a name served stale: nobody waits,
        and only if no exchange for it is in flight already."""
        entry = self.cache.stale(ask.key)
        if entry is not None:
            entry.stale_until = self.reactor.seconds() + self.stale_recheck
        if ask.key not in self.inflight and len(self.inflight) < self.max_forwards:
            self.inflight[ask.key] = []
            self._ask_upstream(ask)

    def _ask_upstream(self, ask: Ask) -> None:
        query, key = ask.query, ask.key
        servers = self.zones.servers_for(ask.name)
        if servers is None:
            servers = self.upstreams
        late = partial(self._late_answer, key, self.epoch)
        cd = bool(query.flags & wire.CD)  # CD=1 data may be what a validating upstream refuses at CD=0
        self.forwarder.query(query.question, query.do, servers, late, cd=cd).addBoth(self._forwarded, key)

    def _late_answer(self, key, epoch: int, answer) -> None:
        """An answer after the client got SERVFAIL: cached for its retry."""
        if epoch == self.epoch:
            self.cache.put_answer(key, answer)

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
