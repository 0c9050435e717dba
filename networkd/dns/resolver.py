"""The slow path: one query message in, the bytes to answer it with out.

``Resolver.resolve`` settles what holds for every query (admission, a
well-formed question, EDNS version 0, no zone transfer), then asks its
chain in order: the local zone, the cache, the forwarder.  Every link has
the one method ``answer(ask)``: the response, a Deferred firing with it,
or None for "not mine", and the next link is asked (as twisted.names'
ResolverChain moves on after a DomainError).  An authoritative "no such
name" is an answer, never None.  The forwarder is last and answers
everything.  On the way, UDP answers are packed into the hot tables
(``networkd.dns.hot``), so a repeated question never gets here.
"""

from __future__ import annotations

from twisted.logger import Logger

from networkd.dns import wire
from networkd.dns.cache import STALE_MAX, Cache
from networkd.dns.clients import ClientFilter
from networkd.dns.hot import HotAnswers
from networkd.dns.links import MAX_FORWARDS, Ask, CachedAnswers, Forwarding, count, fit
from networkd.dns.reverse import ReverseZones
from networkd.dns.upstreams import ForwardZones
from networkd.dns.zone import EMPTY_ZONE, Zone
from networkd.views import DnsStats

log = Logger()

ZONE_TRANSFERS = (251, 252)  # IXFR, AXFR: not something a forwarder relays


class LocalZone:
    """Authoritative answers from the zone in force (swapped whole), and the
    reverse names answered here (``networkd.dns.reverse``)."""

    def __init__(self, stats: DnsStats, hot: HotAnswers, reverse: ReverseZones, forwarded):
        self.stats = stats
        self.hot = hot
        self.zone: Zone = EMPTY_ZONE
        self.reverse = reverse
        self.forwarded = forwarded  # name -> a domain_servers zone claims it

    def answer(self, ask: Ask):
        if ask.query.qclass not in (wire.CLASS_IN, wire.TYPE_ANY):
            return None
        found = self.zone.lookup(ask.name)
        if found is not None:
            rcode, response = wire.NOERROR, self.zone.answer(ask.query, *found)
        elif ask.name.endswith(".arpa"):
            found = self.reverse.answer(self.zone, ask.query, ask.name, self.forwarded(ask.name))
            if found is None:
                return None
            rcode, response = found
        else:
            return None
        count(self.stats, rcode, "local")
        if ask.udp:
            self.hot.remember_local(ask.data, response, rcode)
        return fit(response, ask.query, ask.udp)


class Resolver:
    """Answers one query message: local zone, then cache, then upstreams."""

    def __init__(self, reactor, *, cache_size: int, stats: DnsStats | None = None,
                 client_filter: ClientFilter | None = None, budget: float = 1.6, forward_reverse=(),
                 stale_max: float = STALE_MAX, forward_max: int = MAX_FORWARDS):
        self.reactor = reactor
        self.stats = stats or DnsStats()
        self.clients = client_filter or ClientFilter()
        self.hot = HotAnswers(cached_limit=cache_size)
        self.cache = Cache(cache_size, reactor, on_evict=self.hot.forget, stale_max=stale_max)
        self.local = LocalZone(self.stats, self.hot, ReverseZones(forward_reverse),
                               lambda name: self.forwarding.zones.servers_for(name) is not None)
        self.forwarding = Forwarding(reactor, self.cache, self.stats, budget)
        self.forwarding.max_forwards = forward_max
        cached = CachedAnswers(reactor, self.cache, self.stats, self.hot, self.forwarding.refresh)
        self.chain = (self.local, cached, self.forwarding)

        def hot_hit(entry) -> None:  # a hot answer re-aged (once a second while it is asked)
            self.cache.touch(entry)
            cached.used(entry, reactor.seconds())

        self.hot.touch = hot_hit

    # -- data ------------------------------------------------------------------

    @property
    def zone(self) -> Zone:
        return self.local.zone

    @property
    def forward_zones(self) -> ForwardZones:
        return self.forwarding.zones

    @property
    def upstreams(self) -> list:
        return self.forwarding.upstreams

    def set_zone(self, zone: Zone) -> None:
        """Swap in a new zone.  Upstream answers to the names it adds leave the
        hot table at once (the cache stays: the zone is asked before it)."""
        old, self.local.zone = self.local.zone, zone
        self.hot.clear_local()
        if zone.exact.keys() - old.exact.keys() or zone.wildcards.keys() - old.wildcards.keys():
            self.hot.drop_cached(lambda name: zone.lookup(name) is not None)

    def zone_changed(self, added=(), added_wildcards=()) -> None:
        """The zone in force was changed in place (networkd.dns.zonefeed): the
        local hot answers go (cheap: a dict clear), and the upstream answers to
        the names it made local (exact names, names under new wildcards)."""
        self.hot.clear_local()
        if added or added_wildcards:
            self.hot.drop_names(added, tuple(added_wildcards))

    def set_forward_zones(self, zones: ForwardZones) -> None:
        if zones != self.forwarding.zones:
            self.forwarding.zones = zones
            self.hot.clear_local()  # a reverse name answered here may be forwarded now
            self.flush()

    def set_upstreams(self, servers: list) -> bool:
        """Replace the upstream list; the cache is flushed if it changed."""
        servers = list(servers)
        if servers == self.forwarding.upstreams:
            return False
        self.forwarding.upstreams = servers
        self.flush()
        return True

    def flush(self) -> None:
        self.cache.clear()
        self.forwarding.epoch += 1
        self.hot.clear_cached()

    # -- what the tests look at ------------------------------------------------

    @property
    def hot_local(self) -> dict:
        return self.hot.local

    @property
    def hot_cached(self) -> dict:
        return self.hot.cached

    @property
    def max_forwards(self) -> int:
        return self.forwarding.max_forwards

    @max_forwards.setter
    def max_forwards(self, value: int) -> None:
        self.forwarding.max_forwards = value

    @property
    def _inflight(self) -> dict:
        return self.forwarding.inflight

    # -- the slow path ---------------------------------------------------------

    def resolve(self, data: bytes, client: str, udp: bool):
        """bytes to send, None to drop, or a Deferred firing with one of those."""
        data = bytes(data)
        allowed = self.clients.admits(client)
        try:
            query = wire.parse_query(data)
        except wire.QueryError as e:
            if e.rcode is None or not allowed:
                reason = "refused" if not allowed else "short" if len(data) < 12 else "response"
                self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + 1
                return None
            count(self.stats, e.rcode, "error")
            return wire.error_response(data, e.rcode)
        if not allowed:
            count(self.stats, wire.REFUSED, "refused")
            return wire.error_response(query, wire.REFUSED)
        if query.edns and query.edns_version != 0:
            count(self.stats, wire.BADVERS, "error")
            return wire.error_response(query, wire.BADVERS)
        if query.qtype in ZONE_TRANSFERS:
            count(self.stats, wire.NOTIMP, "error")
            return wire.error_response(query, wire.NOTIMP)
        if query.qclass == wire.CLASS_CH:
            # version.bind, hostname.bind, id.server: questions about this server, which
            # an upstream cannot answer for it; refused here, at once (README, "Forwarding").
            count(self.stats, wire.REFUSED, "local")
            return wire.error_response(query, wire.REFUSED)
        ask = Ask(data, query, wire.wire_to_text(query.qname),
                  (query.qname.lower(), query.qtype, query.qclass, query.do, bool(query.flags & wire.CD)), udp)
        for link in self.chain:
            result = link.answer(ask)
            if result is not None:
                return result
        return None  # every link passed: nothing to send
