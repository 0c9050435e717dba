"""What ``/v1/status`` and ``/healthz`` say, computed from the parts' own state.

Read-only: nothing here changes a part; everything comes from the
ApiParts the API was given (networkd/api/parts.py).  etcd's state comes from the prefix
watchers (are their snapshots live?) and the lease session; when nothing
watches etcd (``--no-dns --no-vips``) a cheap read, cached for a moment,
tells whether etcd answers.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger

from networkd.api.parts import ApiParts
from networkd.api.peerstatus import peer_status

log = Logger()


@dataclass
class ProbeResult:
    ok: bool
    error: str | None
    at: float


class EtcdProbe:
    """Is etcd answering?  One small read, at most every ``cache`` seconds."""

    def __init__(self, client, key: bytes, reactor, timeout: float = 1.0, cache: float = 0.5):
        self._client = client
        self._key = key
        self._reactor = reactor
        self._timeout = timeout
        self._cache = cache
        self.last: ProbeResult | None = None
        self._running: defer.Deferred | None = None
        self._waiters: list[defer.Deferred] = []

    def check(self) -> defer.Deferred:
        now = self._reactor.seconds()
        if self.last is not None and now - self.last.at < self._cache:
            return defer.succeed(self.last)
        waiter = defer.Deferred()
        self._waiters.append(waiter)
        if self._running is None:
            self._running = self._client.get(self._key)
            self._running.addTimeout(self._timeout, self._reactor)
            self._running.addCallbacks(lambda _: self._finish(True, None), self._probe_failed)
        return waiter

    def _probe_failed(self, failure):
        if failure.check(defer.TimeoutError, defer.CancelledError):
            error = f"no answer within {self._timeout:g}s"
        else:
            error = failure.getErrorMessage()
        self._finish(False, error)

    def _finish(self, ok: bool, error: str | None) -> None:
        self._running = None
        self.last = ProbeResult(ok, error, self._reactor.seconds())
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self.last)


def _age(now: float, then: float | None) -> float | None:
    return None if then is None else round(max(0.0, now - then), 3)


def etcd_status(parts: ApiParts, probe: ProbeResult | None) -> dict:
    """``{"endpoint", "connected", "last_error", "failovers", "prefixes": [...]}``."""
    now = parts.reactor.seconds()
    prefixes = []
    for prefix in sorted(parts.watchers):
        s = parts.watchers[prefix].status
        prefixes.append({
            "prefix": prefix,
            "connected": s.connected,
            "revision": s.revision,
            "synced_age": _age(now, s.synced_at),
            "lost_for": _age(now, s.lost_at),
            "last_error": s.last_error,
            "reconnects": s.reconnects,
            "relists": s.relists,
        })
    if prefixes:
        connected = all(p["connected"] for p in prefixes)
        last_error = next((p["last_error"] for p in prefixes if p["last_error"]), None)
    else:
        connected = bool(probe and probe.ok)
        last_error = probe.error if probe else None
    return {
        "endpoint": str(parts.client.endpoint),
        "connected": connected,
        "last_error": last_error,
        "failovers": parts.client.failovers,
        "prefixes": prefixes,
    }


def session_status(parts: ApiParts) -> dict | None:
    session = parts.session
    if session is None:
        return None
    return {
        "lease": f"{session.lease:x}" if session.lease is not None else None,
        "ttl": session.ttl,
        "keepalive_age": None if session.ack_age() is None else round(session.ack_age(), 3),
        "last_error": session.last_error,
    }


def invalid_keys(parts: ApiParts) -> list[dict]:
    found = []
    for part_name, part in (("dns", parts.dns), ("vips", parts.vips), ("leader", parts.leader_tasks)):
        if part is None:
            continue
        for key, error in dict(getattr(part, "invalid_keys", {}) or {}).items():
            found.append({"part": part_name, "key": key, "error": str(error)})
    return sorted(found, key=lambda item: (item["key"], item["part"]))


def dns_upstreams(parts: ApiParts) -> list[str]:
    if parts.dns is None:
        return []
    dump = getattr(parts.dns, "config_dump", None)  # the zone unsorted (config_view sorts every name)
    return list(dump()[1].nameservers if dump is not None else parts.dns.config_view().nameservers)


def full_status(parts: ApiParts, probe: ProbeResult | None) -> dict:
    """The body of ``GET /v1/status`` (see the README for the shape)."""
    dns = None
    if parts.dns is not None:
        dns = {"listen": str(parts.dns_listen), "listening": bool(parts.dns.listening())}
    guardian = parts.resolv_conf
    vips = None if parts.vips is None else {"held": int(parts.vips.held_count())}
    return {
        "hostname": parts.hostname,
        "node_ip": parts.node_ip,
        "etcd": etcd_status(parts, probe),
        "session": session_status(parts),
        "invalid_keys": invalid_keys(parts),
        "upstreams": dns_upstreams(parts),
        "dns": dns,
        "resolv_conf": None if guardian is None else guardian.status.as_dict(),
        "vips": vips,
        "peers": None if parts.vips is None or getattr(parts.vips, "failsafe", None) is None
        else peer_status(parts.vips.failsafe),
        "leader": leader_status(parts),
    }


def leader_status(parts: ApiParts) -> dict | None:
    """Who leads, whether we do, and what our leader tasks last wrote (None: no leader task here)."""
    election, tasks = parts.leader, parts.leader_tasks
    if election is None:
        return None
    status = election.status()
    if tasks is not None:
        status["tasks"] = list(tasks.tasks)
        status["published"] = dict(sorted(tasks.published.items()))
    return status


def health_problems(parts: ApiParts, probe: ProbeResult | None) -> list[str]:
    """Why this node is unhealthy; empty when DNS listens and etcd snapshots are live."""
    now = parts.reactor.seconds()
    problems = []
    for prefix in sorted(parts.watchers):
        s = parts.watchers[prefix].status
        if not s.connected:
            since = f" for {now - s.lost_at:.1f}s" if s.lost_at is not None else ""
            problems.append(f"etcd watch of {prefix} is down{since}: {s.last_error or 'not connected yet'}")
    if not parts.watchers and probe is not None and not probe.ok:
        problems.append(f"etcd {parts.client.endpoint} does not answer: {probe.error}")
    session = parts.session
    if session is not None:
        age = session.ack_age()
        if age is None:
            problems.append(f"etcd lease not granted yet: {session.last_error or 'waiting'}")
        elif age > session.ttl:
            problems.append(f"etcd lease keep-alive not acknowledged for {age:.1f}s (TTL {session.ttl}s)")
    if parts.dns is not None and not parts.dns.listening():
        problems.append(f"DNS server is not listening on {parts.dns_listen}")
    return problems
