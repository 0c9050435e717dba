"""DnsService: the DNS part of networkd as a Twisted service (views.DnsPart).

It owns the listeners and feeds the resolver: the zone is kept up to date
key by key from the domains snapshots, the webrouter VIPs and the hosts file
(networkd.dns.zonefeed), new forwarding zones come whole with every
domain_servers snapshot.  Upstreams come from the resolv.conf
guardian through ``set_upstreams``.

The sockets are bound in privilegedStartService; a bind failure is raised
(the daemon does not start) so that resolv.conf never points at a dead
server ([BUG 30]).  Sockets passed by systemd (networkd.socket, ``inherited``)
bound to the listen address are served instead of binding: they outlive a
restart, so no query is lost meanwhile.  Passed or bound here, the
sockets are read only once every watched prefix has its first etcd
snapshot (or failed to get one; at most HOLD_MAX seconds), so the queries
that waited get the node's names, not the empty zone of a daemon just
started (whose forwarder would send a node name upstream).
"""

from __future__ import annotations

import socket

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from networkd.backoff import every
from networkd.dns.hostsfile import FileChangeWatcher, parse_hosts
from networkd.dns.cache import STALE_MAX
from networkd.dns.clients import ClientFilter
from networkd.dns.links import MAX_FORWARDS
from networkd.dns.resolver import Resolver
from networkd.dns.tcp import DnsTcpFactory
from networkd.dns.udp import DnsUdpListener
from networkd.dns.upstreams import (
    ForwardZones, format_server, parse_forward_zones, without_self,
)
from networkd.dns.zone import webrouter_ips
from networkd.dns.zonefeed import ZoneFeed
from networkd.systemd import activation
from networkd.views import DnsConfigView

log = Logger()

HOSTS_RECHECK = 30.0  # seconds between looks at a hosts file inotify watches


HOLD_MAX = 10.0  # seconds at most that queries wait for the first etcd snapshots


class DnsBindError(Exception):
    """The DNS listeners could not be opened."""


class DnsService(service.Service):
    name = "dns"

    def __init__(self, reactor, *, listen, ttl: int = 60, cache_size: int = 10000, allow=(),
                 node_ip: str | None = None, hosts_file: str | None = None,
                 domains=None, domain_servers=None, vips=None,
                 domains_prefix: str = "", domain_servers_prefix: str = "",
                 poll_interval: float = 1.0, budget: float = 1.6, forward_reverse=(),
                 stale_max: float = STALE_MAX, inherited=(), forward_max: int = MAX_FORWARDS):
        self.reactor = reactor
        self.listen = listen
        self._inherited = list(inherited)
        self._inherited_udp = activation.take(self._inherited, socket.SOCK_DGRAM, listen.host, listen.port)
        self._inherited_tcp = activation.take(self._inherited, socket.SOCK_STREAM, listen.host, listen.port)
        # True when networkd.socket holds our listeners: they stay across a restart.
        self.socket_activated = self._inherited_udp is not None or self._inherited_tcp is not None
        self.ttl = ttl
        self.node_ip = node_ip
        self.resolver = Resolver(reactor, cache_size=cache_size, client_filter=ClientFilter(allow), budget=budget,
                                 forward_reverse=forward_reverse, stale_max=stale_max, forward_max=forward_max)
        self.stats = self.resolver.stats
        self.invalid_keys: dict = {}
        self._zone_invalid: dict = {}
        self._server_invalid: dict = {}
        self._watchers = (domains, domain_servers, vips)
        self._domains_prefix = domains_prefix
        self._servers_prefix = domain_servers_prefix
        self._feed = ZoneFeed(reactor, ttl=ttl, node_ip=node_ip, key_prefix=domains_prefix,
                              on_change=self._zone_changed, on_built=self._check_hold)
        self.resolver.set_zone(self._feed.zone)
        self._hosts: list = []
        self._hosts_file = FileChangeWatcher(hosts_file, reactor=reactor, on_event=self._look_at_hosts) if hosts_file else None
        self._hosts_call = None
        self._poll_interval = poll_interval
        self._udp_port = None
        self._tcp_port = None
        self._bind_error: Exception | None = None
        self._waiting: list = []
        self._loops: list = []
        self._hold_loop = None
        self._subscribed = False
        self._holding = False  # passed sockets not read until the first snapshots are in
        self._hold_started = None

    # -- DnsPart ---------------------------------------------------------------

    def when_listening(self) -> defer.Deferred:
        if self.listening():
            return defer.succeed(self.listen)
        if self._bind_error is not None:
            return defer.fail(self._bind_error)
        d = defer.Deferred()
        self._waiting.append(d)
        return d

    def listening(self) -> bool:
        return self._udp_port is not None and self._tcp_port is not None

    def set_upstreams(self, servers) -> None:
        """Upstreams in resolv.conf order; the resolv.conf guardian is their one
        source (it also runs, read-only, under --no-resolv-conf).  Ours is skipped."""
        self._apply_upstreams(list(servers))

    def config_view(self) -> DnsConfigView:
        zone = self.resolver.zone
        return DnsConfigView(
            exact=tuple(sorted((name, record.ips) for name, record in zone.exact.items())),
            wildcards=tuple(sorted((base, ip) for base, record in zone.wildcards.items() for ip in record.ips)),
            servers=tuple(sorted(
                (zone_name, format_server(server))
                for zone_name, servers in self.resolver.forward_zones.zones.items() for server in servers
            )),
            nameservers=tuple(format_server(server) for server in self.resolver.upstreams),
        )

    def config_dump(self) -> tuple:
        """(generation, view) for ``GET /v1/dns/config``: the view is taken now, unsorted, its
        exact names a copy of the zone's table (name -> Record; a dict copy is ~0.1 ms at 40,000
        names); the generation is equal for as long as the view would be."""
        zone, forward = self.resolver.zone, self.resolver.forward_zones
        upstreams = tuple(self.resolver.upstreams)
        view = DnsConfigView(
            exact=dict(zone.exact),
            wildcards=tuple((base, ip) for base, record in zone.wildcards.items() for ip in record.ips),
            servers=tuple((name, format_server(server)) for name, servers in forward.zones.items()
                          for server in servers),
            nameservers=tuple(format_server(server) for server in upstreams),
        )
        # The objects themselves, not their ids: they stay alive, so an id cannot be reused.
        return (zone, zone.generation, forward, upstreams), view

    # -- lifecycle -------------------------------------------------------------

    def privilegedStartService(self):
        """twistd calls this before the reactor runs: a bind failure ends the
        process with one clear line and exit status 1 (no traceback)."""
        super().privilegedStartService()
        try:
            self._bind()
        except DnsBindError as e:
            raise SystemExit(f"networkd: error: {e}") from None

    def startService(self):
        if not self.listening():
            self._bind()
        super().startService()
        self._read_hosts()
        self._feed.set_hosts(self._hosts)
        domains, domain_servers, vips = self._watchers
        if not self._subscribed:
            self._subscribed = True
            if vips is not None:
                vips.subscribe(self._on_vips)
            if domains is not None:
                domains.subscribe(self._on_domains)
            if domain_servers is not None:
                domain_servers.subscribe(self._on_domain_servers)
        self._loops = []
        self._schedule_hosts_look()
        if self._holding:
            self._hold_started = self.reactor.seconds()
            self._hold_loop = every(self.reactor, 0.02, self._check_hold, "DNS first-snapshot wait")
            self._loops.append(self._hold_loop)
            self._check_hold()  # nothing watched, or snapshots already in: read at once
        log.info("DNS listening on {listen} (UDP and TCP), upstreams {ups}",
                 listen=str(self.listen), ups=self.config_view().nameservers or "none")

    def stopService(self):
        super().stopService()
        self._feed.stop()
        if self._hosts_call is not None and self._hosts_call.active():
            self._hosts_call.cancel()
        self._hosts_call = None
        if self._hosts_file is not None:
            self._hosts_file.close()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        stopping = []
        for port in (self._udp_port, self._tcp_port):
            if port is not None:
                stopping.append(defer.maybeDeferred(port.stopListening))
        self._udp_port = self._tcp_port = None
        return defer.DeferredList(stopping)

    def _bind(self) -> None:
        host, port = self.listen.host, self.listen.port
        self._report_inherited()
        udp, tcp = self._inherited_udp, self._inherited_tcp
        self._inherited_udp = self._inherited_tcp = None
        try:
            self._udp_port = DnsUdpListener(self.resolver, self.reactor, host, port, sock=udp)
            factory = DnsTcpFactory(self.resolver, self.reactor)
            if tcp is not None:
                # systemd passes blocking sockets: a blocking accept would hang the
                # reactor.  adoptStreamPort serves a dup of the fd: ours is closed at once.
                tcp.setblocking(False)
                self._tcp_port = self.reactor.adoptStreamPort(tcp.fileno(), tcp.family, factory)
                tcp.close()
            else:
                self._tcp_port = self.reactor.listenTCP(port, factory, interface=host, backlog=128)
            # Not read before the first snapshots: a query for a node name would
            # otherwise go upstream and come back NXDOMAIN, which clients cache.
            self._holding = True
            self._udp_port.stopReading()
            self._tcp_port.stopReading()
        except Exception as e:
            if self._udp_port is not None:
                self._udp_port.stopListening()
                self._udp_port = None
            self._bind_error = DnsBindError(f"DNS cannot listen on {self.listen}: {e}")
            log.critical("{error}; networkd does not start without its DNS server", error=str(self._bind_error))
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.errback(self._bind_error)
            raise self._bind_error from e
        self._bind_error = None
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(self.listen)

    def _check_hold(self) -> None:
        """Read the sockets once every watched prefix has its first
        snapshot or has failed to get one, or after HOLD_MAX seconds, and
        the first domains snapshot is in the zone whole (it is applied in
        slices, and it always ends: HOLD_MAX is for etcd, not for that)."""
        if not self._holding or not self.listening() or self._hold_started is None:
            return  # (None: startService has not begun the wait; it asks at once when it does)
        waited = self.reactor.seconds() - self._hold_started
        pending = [w for w in self._watchers if w is not None and w.snapshot is None and w.status.lost_at is None]
        if pending and waited < HOLD_MAX:
            return
        domains = self._watchers[0]
        if domains is not None and domains.snapshot is not None and not self._feed.built:
            return  # the zone is being filled: on_built asks again
        self._holding = False
        if not self._feed.built:
            self._feed.first_at_once()  # read from now on: no slices of a first snapshot to be seen
        self._hold_loop.stop()  # start-up only: no 50 wake-ups a second for the daemon's whole life
        self._udp_port.startReading()
        self._tcp_port.startReading()
        log.info("DNS: reading queries after {t:.2f}s ({why}); those sent meanwhile waited in the sockets",
                 t=waited, why="waited too long for etcd" if pending else "first etcd snapshots in")

    def _report_inherited(self) -> None:
        for kind, sock in (("UDP", self._inherited_udp), ("TCP", self._inherited_tcp)):
            if sock is not None:
                log.info("DNS: serving the {kind} socket passed by systemd on {listen} (socket activation)",
                         kind=kind, listen=str(self.listen))
            else:
                log.info("DNS: binding {kind} {listen} itself (no socket passed for it)",
                         kind=kind, listen=str(self.listen))
        for sock in self._inherited:
            log.warn("DNS: ignoring the passed socket {what}: not --dns-listen {listen}",
                     what=activation.describe(sock), listen=str(self.listen))
            sock.close()
        self._inherited = []

    # -- inputs ----------------------------------------------------------------

    def _on_domains(self, snapshot) -> None:
        self._feed.domains(snapshot)

    def _on_vips(self, snapshot) -> None:
        """Only the webrouter IPs matter here: other VIP changes leave the zone
        (and the hot answers built from it) alone."""
        self._feed.set_webrouters(webrouter_ips(snapshot.values, self.node_ip))

    def _on_domain_servers(self, snapshot) -> None:
        zones, invalid = parse_forward_zones(snapshot.values, self._servers_prefix)
        self._report_invalid(self._server_invalid, invalid)
        self._server_invalid = invalid
        self._update_invalid()
        listen = (self.listen.host, self.listen.port)
        cleaned = {}
        for zone, servers in zones.zones.items():
            kept = tuple(without_self(list(servers), *listen))
            if kept:
                cleaned[zone] = kept
        self.resolver.set_forward_zones(ForwardZones(cleaned))

    def _schedule_hosts_look(self) -> None:
        """The next look at the hosts file: soon while inotify could miss a change (its directory is
        missing, no inotify), else every HOSTS_RECHECK s for what it misses (a bind-mounted file
        written through its other mount); changes it sees are looked at as they come (its ``on_event``).
        A look every second woke the reactor 60 times a minute at rest."""
        if self._hosts_file is None or not self.running:
            return
        blind = self._hosts_file.blind
        delay = self._poll_interval if blind else max(self._poll_interval, HOSTS_RECHECK)
        self._hosts_call = self.reactor.callLater(delay, self._hosts_look, not blind)

    def _hosts_look(self, compare: bool) -> None:
        self._hosts_call = None
        self._look_at_hosts(compare)
        self._schedule_hosts_look()

    def _look_at_hosts(self, compare: bool = False) -> None:
        """A timed look, or inotify saw a change in the hosts file's directory: serve it if it changed."""
        try:
            if self._hosts_file is not None and self._hosts_file.changed(compare):
                self._read_hosts(checked=True)
                self._feed.set_hosts(self._hosts)
        except Exception:
            log.failure("DNS hosts-file check failed")

    def _read_hosts(self, checked: bool = False) -> None:
        if self._hosts_file is None:
            return
        if not checked:
            self._hosts_file.changed()
        text = self._hosts_file.read()
        if text is None:
            log.warn("DNS: cannot read hosts file {path}; serving no names from it", path=self._hosts_file.path)
            self._hosts = []
        else:
            self._hosts = parse_hosts(text)

    def _apply_upstreams(self, servers) -> None:
        servers = without_self(servers, self.listen.host, self.listen.port)
        if self.resolver.set_upstreams(servers):
            log.info("DNS upstreams: {ups}", ups=", ".join(format_server(s) for s in servers) or "none")

    def _zone_changed(self, added, added_wildcards) -> None:
        self._zone_invalid = self._feed.invalid
        self._update_invalid()
        self.resolver.zone_changed(added, added_wildcards)

    def _update_invalid(self) -> None:
        self.invalid_keys = {**self._zone_invalid, **self._server_invalid}

    @staticmethod
    def _report_invalid(old: dict, new: dict) -> None:
        for key, reason in sorted(new.items()):
            if old.get(key) != reason:
                log.warn("DNS: ignoring {key}: {reason}", key=key, reason=reason)
