"""``GET /metrics``: Prometheus text, read from the parts' plain counters at scrape time.

The DNS hot path only bumps integers in DnsStats; turning them into metric
families happens here, once per scrape.  An own registry, not the global
default one, so nothing else in the process leaks into it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from networkd.api.parts import ApiParts
from networkd.api.rowfamily import RowFamily, OneFamily
from networkd.api.vipstatus import floating_active
from networkd.views import UPSTREAM_BUCKETS

__all__ = ["CONTENT_TYPE_LATEST", "NetworkdCollector", "make_registry", "metrics_renderer", "render_metrics"]

PIECE = 500  # samples written between two yields (networkd/api/slices.py)
ROW_PIECE = 200  # per-VIP lines written between two yields (~0.3 ms)
_OPENMETRICS_ONLY = ("_created", "_gsum", "_gcount")  # samples generate_latest moves to the end


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))


class NetworkdCollector:
    def __init__(self, parts: ApiParts):
        self._parts = parts

    def collect(self):
        parts = self._parts
        yield from self._dns(parts.dns)
        yield from self._etcd(parts)
        yield from self._reactor(getattr(parts.reactor, "turn_meter", None))
        held = GaugeMetricFamily("networkd_vips_held", "VIPs this node holds (address up, DNAT installed).")
        held.add_metric([], float(parts.vips.held_count()) if parts.vips is not None else 0.0)
        yield held
        if parts.vips is not None:
            yield from self._vip_safety(parts.vips)
        guardian = parts.resolv_conf
        if guardian is not None:
            yield CounterMetricFamily("networkd_resolv_conf_writes", "Rewrites of resolv.conf.",
                                      value=guardian.status.writes)
            yield CounterMetricFamily("networkd_resolv_conf_undone", "Times another writer undid our resolv.conf line.",
                                      value=guardian.status.undone)
        invalid = GaugeMetricFamily("networkd_invalid_keys", "etcd keys ignored because their value is invalid.",
                                    labels=["part"])
        for name, part in (("dns", parts.dns), ("vips", parts.vips)):
            if part is not None:
                invalid.add_metric([name], float(len(part.invalid_keys or {})))
        yield invalid

    def _vip_active(self, vips):
        """One sample per floating VIP this node knows: 1 while it carries it.  Summed over the
        nodes it says how many carry each VIP (packaging/monitoring: unheld, two holders)."""
        yield RowFamily("networkd_vip_active", "1 while this node carries the floating VIP.", "gauge",
                        ["vip", "app", "proc"],
                        [((ip, app, proc), 1.0 if on else 0.0) for ip, app, proc, on in floating_active(vips)])

    def _vip_health(self, vips):
        """Probe results and verdicts, transitions by event and kind of reason, seconds without a holder."""
        health, transitions = getattr(vips, "health", None), getattr(vips, "transitions", None)
        if health is not None and health.prober is not None:
            results = CounterMetricFamily("networkd_vip_probes", "Probes of local containers, by result.",
                                          labels=["result"])
            for result, count in sorted(health.prober.results.items()):
                results.add_metric([result], count)
            yield results
            verdicts = ((ip, health.local(ip)) for ip in sorted(health.targets))
            yield RowFamily("networkd_vip_healthy", "This node's probe verdict per VIP (1 healthy, "
                            "0 unhealthy; absent while undecided).", "gauge", ["vip"],
                            [((ip,), 1.0 if verdict else 0.0) for ip, verdict in verdicts if verdict is not None])
        if transitions is not None:
            history = transitions.history
            counts = CounterMetricFamily("networkd_vip_transitions", "VIP transitions on this node.",
                                         labels=["event", "reason"])
            for (event, kind), count in sorted(history.counts.items()):
                counts.add_metric([event, kind], count)
            yield counts
            yield from self._vip_holders(history)

    def _vip_holders(self, history):
        """Per floating VIP, as this node saw the locks (so also for VIPs held elsewhere)."""
        holders = sorted(history.holders.items())
        yield RowFamily("networkd_vip_holder", "1 for the node holding each floating VIP "
                        "(holder=\"\" while none does).", "gauge", ["vip", "holder"],
                        [((ip, name or ""), 1.0) for ip, (name, _) in holders])
        yield RowFamily("networkd_vip_holder_since_timestamp_seconds", "Since when each floating VIP's "
                        "holder (or lack of one) is what it is (at most since this daemon started).", "gauge",
                        ["vip"], [((ip,), wall) for ip, (_, wall) in holders])
        changes = history.holder_changes
        yield RowFamily("networkd_vip_holder_changes", "Changes of each floating VIP's holder (to "
                        "and from none included).", "counter", ["vip"],
                        [((ip,), changes.get(ip, 0)) for ip in sorted(set(history.holders) | set(changes))])
        yield RowFamily("networkd_vip_unheld_seconds", "Seconds each floating VIP had no holder "
                        "(as this node saw the locks).", "counter", ["vip"],
                        [((ip,), seconds) for ip, seconds in sorted(history.unheld_seconds().items())])

    def _vip_safety(self, vips):
        yield from self._vip_active(vips)
        yield from self._vip_health(vips)
        counters = vips.safety_counters()
        for name, help_text in (
            ("fencings", "Times this node dropped its VIPs for late keep-alives."),
            ("address_requests", "Address adds, renewals and removals sent to the kernel."),
            ("netlink_overruns", "Netlink exchanges slow enough that lifetimes had to be set again."),
            ("lifetime_violations", "Addresses found living past the lease deadline (removed at once)."),
            ("failsafe_entered", "Times every peer promised and this node kept its VIPs while etcd was away."),
            ("failsafe_ended", "Times such a failsafe ended (etcd back, locks retaken, or fenced)."),
            ("promises_refused", "Promise requests of ours a peer refused (it reaches etcd, or contests the VIP)."),
            ("peer_messages_refused", "Peer messages refused: unsigned, wrong MAC, stale or replayed."),
        ):
            if name not in counters:
                continue
            yield CounterMetricFamily(f"networkd_vip_{name}", help_text, value=counters[name])

    def _dns(self, dns):
        queries = CounterMetricFamily("networkd_dns_queries", "DNS queries answered, by rcode and source.",
                                      labels=["rcode", "source"])
        hits = CounterMetricFamily("networkd_dns_cache_hits", "DNS answers served from the cache.")
        misses = CounterMetricFamily("networkd_dns_cache_misses", "DNS cache lookups that missed.")
        dropped = CounterMetricFamily("networkd_dns_dropped", "DNS datagrams dropped unanswered, by reason "
                                      "(short, response, oversize, refused).", labels=["reason"])
        latency = HistogramMetricFamily("networkd_dns_upstream_latency_seconds",
                                        "Time for an upstream nameserver to answer a forwarded query.")
        if dns is not None:
            stats = dns.stats
            for (rcode, source), count in sorted(dict(stats.queries).items()):
                queries.add_metric([str(rcode), str(source)], count)
            hits.add_metric([], stats.cache_hits)
            for reason, count in sorted(dict(stats.dropped).items()):
                dropped.add_metric([reason], count)
            misses.add_metric([], stats.cache_misses)
            buckets = [(_bound(bound), count) for bound, count in zip(UPSTREAM_BUCKETS, stats.upstream_latency_buckets)]
            latency.add_metric([], buckets, stats.upstream_latency_sum)
        yield queries
        yield hits
        yield misses
        yield dropped
        if dns is not None:
            yield latency

    def _reactor(self, meter):
        if meter is None:
            return
        turns = HistogramMetricFamily("networkd_reactor_turn_seconds", "How long the reactor's turns took (wall "
                                      "time; every DNS query waits for the turn in progress).")
        turns.add_metric([], [(_bound(bound), count) for bound, count in meter.cumulative()], meter.total)
        yield turns
        yield GaugeMetricFamily("networkd_reactor_longest_turn_seconds", "The longest reactor turn since start.",
                                value=meter.longest)

    def _etcd(self, parts: ApiParts):
        connected = GaugeMetricFamily("networkd_etcd_connected", "1 while the etcd watch of a prefix is live.",
                                      labels=["prefix"])
        revision = GaugeMetricFamily("networkd_etcd_revision", "etcd revision of the last snapshot of a prefix.",
                                     labels=["prefix"])
        reconnects = CounterMetricFamily("networkd_etcd_reconnects", "Times the etcd watch of a prefix was lost.",
                                         labels=["prefix"])
        for prefix in sorted(parts.watchers):
            status = parts.watchers[prefix].status
            connected.add_metric([prefix], 1.0 if status.connected else 0.0)
            revision.add_metric([prefix], float(status.revision))
            reconnects.add_metric([prefix], status.reconnects)
        yield connected
        yield revision
        yield reconnects
        failovers = CounterMetricFamily("networkd_etcd_failovers", "Switches to another etcd endpoint.",
                                        value=parts.client.failovers)
        yield failovers
        if parts.session is not None:
            yield GaugeMetricFamily("networkd_etcd_lease_ttl_seconds", "TTL of the process lease (--lock-ttl).",
                                    value=float(parts.session.ttl))
            age = parts.session.ack_age()
            if age is not None:
                yield GaugeMetricFamily("networkd_etcd_keepalive_age_seconds",
                                        "Seconds since the last acknowledged lease keep-alive.", value=age)


def make_registry(parts: ApiParts) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NetworkdCollector(parts))
    return registry


def render_metrics(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def metrics_renderer(registry: CollectorRegistry, kept: dict | None = None):
    """``render_metrics(registry)`` as chunks, a family or ``PIECE`` samples at a time: with 1,000
    VIP configs a few families have 1,000 samples each (~30 ms of one turn written whole).  The
    bytes are generate_latest's: each family's text is its HELP and TYPE lines, then one line per
    sample in order, so a family written in parts drops the repeated two header lines.  The per-VIP
    families (``RowFamily``) write their own lines, ``ROW_PIECE`` at a time; ``kept`` (the API's,
    one per resource) keeps their names and labels from one scrape to the next."""
    chunks = []
    for family in registry.collect():
        if isinstance(family, RowFamily):  # the per-VIP families: text from their rows
            for chunk in family.write(ROW_PIECE, kept):
                chunks.append(chunk)
                yield
            continue
        samples = family.samples
        whole = len(samples) <= PIECE or any(s.name != family.name and s.name.endswith(_OPENMETRICS_ONLY)
                                             for s in samples)
        if whole:
            chunks.append(generate_latest(OneFamily(family)))
            yield
            continue
        for i in range(0, len(samples), PIECE):
            part = Metric(family.name, family.documentation, family.type, family.unit)
            part.samples = samples[i:i + PIECE]
            text = generate_latest(OneFamily(part))
            chunks.append(text if not i else text.split(b"\n", 2)[2])
            yield
    return chunks
