"""What the parts show each other: read-only views and the small interfaces
the HTTP API and the resolv.conf guardian rely on.

The DNS server, the VIP manager and the resolv.conf guardian are built as
separate parts; they meet only through these shapes, handed over when
networkd/app.py builds them (the guardian gets the DNS part, the API an
``ApiParts``, networkd/api/parts.py; None when disabled).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from twisted.internet.defer import Deferred


@dataclass(frozen=True)
class DnsConfigView:
    """The DNS data as ``GET /v1/dns/config`` prints it (sorted by the producer).

    exact:       (name, [ip, ...])  from etcd domains and the hosts file
    wildcards:   (domain without "*.", ip)
    servers:     (zone, "ip:port") forwarding zones; IPv6 as "[ip]:port"
    nameservers: "ip:port" upstreams from resolv.conf, in file order
    """

    exact: tuple[tuple[str, tuple[str, ...]], ...] = ()
    wildcards: tuple[tuple[str, str], ...] = ()
    servers: tuple[tuple[str, str], ...] = ()
    nameservers: tuple[str, ...] = ()


@dataclass
class DnsStats:
    """Plain counters kept by the DNS hot path (no metrics library per query).

    queries[(rcode_name, source)] with source in local | cache | forward | refused | error;
    upstream_latency: list of bucket counts for UPSTREAM_BUCKETS plus sum/count.
    """

    queries: dict = field(default_factory=dict)
    # reason -> datagrams dropped unanswered: short (no full header), response (QR set),
    # oversize (larger than a read buffer), refused (malformed, from a client not admitted).
    # Counted, never logged one by one: a flood would make the log the bottleneck.
    dropped: dict = field(default_factory=dict)
    cache_hits: int = 0
    cache_misses: int = 0
    upstream_latency_buckets: list = field(default_factory=lambda: [0] * len(UPSTREAM_BUCKETS))
    upstream_latency_sum: float = 0.0
    upstream_latency_count: int = 0

    def observe_upstream(self, seconds: float) -> None:
        for i, bound in enumerate(UPSTREAM_BUCKETS):
            if seconds <= bound:
                self.upstream_latency_buckets[i] += 1
        self.upstream_latency_sum += seconds
        self.upstream_latency_count += 1


UPSTREAM_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, float("inf"))


class DnsPart(Protocol):
    stats: DnsStats
    invalid_keys: dict  # etcd key -> error text

    def when_listening(self) -> Deferred:
        """Fires once the UDP and TCP sockets are bound (errbacks if binding failed)."""

    def listening(self) -> bool: ...

    def set_upstreams(self, servers: list[tuple[str, int]]) -> None:
        """Upstream nameservers in resolv.conf order (the guardian calls this)."""

    def config_view(self) -> DnsConfigView: ...


class VipPart(Protocol):
    invalid_keys: dict  # etcd key -> error text

    def status(self) -> list[dict]:
        """One JSON-ready object per VIP key, for ``GET /v1/vips``."""

    def held_count(self) -> int: ...

    def safety_counters(self) -> dict[str, int]:
        """``fencings``, ``address_requests``, ``netlink_overruns``, ``lifetime_violations``."""
