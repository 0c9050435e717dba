"""makeService and build: the service tree in dependency order.

Services start in the order they are added and stop in reverse, so the
etcd client comes first (closed last) and the consumers after it.  This is
the one module that touches the global reactor: everything else is handed
the reactor it uses.
"""

from __future__ import annotations

import signal
import sys
import time
from types import MappingProxyType
from typing import TYPE_CHECKING

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from networkd.etcd.client import EtcdClient, TLSFiles
from networkd.etcd.reflector import PrefixWatcher
from networkd.etcd.session import Session
from networkd.keys import Keys
from networkd.logsetup import filter_debug_logs
from networkd.timers import sleep_until_due
from networkd.turns import meter_turns

if TYPE_CHECKING:
    from networkd.api.parts import ApiParts

log = Logger()


class ReactorError(Exception):
    """Another reactor than Twisted's asyncio reactor was forced."""


def install_asyncio_reactor():
    """Install Twisted's asyncio reactor unless a reactor exists; return it."""
    from twisted.internet import asyncioreactor

    if "twisted.internet.reactor" not in sys.modules:
        asyncioreactor.install()
    from twisted.internet import reactor

    if not isinstance(reactor, asyncioreactor.AsyncioSelectorReactor):
        raise ReactorError(
            f"networkd needs Twisted's asyncio reactor (aetcd and pyroute2 are asyncio), "
            f"but {type(reactor).__name__} is installed: drop --reactor or use --reactor=asyncio"
        )
    sleep_until_due(reactor)
    return reactor


class EtcdClientService(service.Service):
    """Owns the etcd client so it is closed after every user of it stopped."""

    name = "etcd client"

    def __init__(self, client: EtcdClient):
        self.client = client

    def stopService(self):
        super().stopService()
        return self.client.close()


class Networkd(service.MultiService):
    """The root service: it owns the shared pieces and holds the parts built.

    ``watch(prefix)`` gives the one PrefixWatcher of a prefix (created on first
    use), so two components that need the same keys share one etcd watch.
    Parts are handed what they use when they are built (``add_*`` below);
    none of them looks anything up here.
    """

    def __init__(self, options, reactor, client: EtcdClient, watch_client: EtcdClient | None = None):
        super().__init__()
        self.options = options
        self.reactor = reactor
        self.client = client
        # What the prefix watchers read through: the same client in the daemon.
        self.watch_client = watch_client or client
        self.keys = Keys(options["etcd-root"])
        self.watchers: dict[str, PrefixWatcher] = {}
        self.session: Session | None = None
        # The parts (networkd.views): None while disabled or not built.
        self.dns = None
        self.resolv_conf = None
        self.vips = None
        self.leader = None  # LeaderElection, with --deployd/--swarm/--tinydns
        self.leader_tasks = None
        self.api = None
        EtcdClientService(client).setServiceParent(self)

    def setServiceParent(self, parent):
        """twistd's application: with --log-format json, its log observer is ours (networkd/logjson.py)."""
        if self.options["log-format"] == "json" and hasattr(parent, "setComponent"):
            from twisted.logger import ILogObserver

            from networkd.logjson import json_observer

            parent.setComponent(ILogObserver, json_observer())
        return super().setServiceParent(parent)

    def watch(self, prefix: str) -> PrefixWatcher:
        if prefix not in self.watchers:
            watcher = PrefixWatcher(self.watch_client, prefix, self.reactor)
            watcher.setServiceParent(self)
            self.watchers[prefix] = watcher
        return self.watchers[prefix]

    def lease_session(self) -> Session:
        if self.session is None:
            self.session = Session(self.client, self.options["lock-ttl"], self.reactor, clock=time.monotonic)
            self.session.setServiceParent(self)
            # A keep-alive got through: a watch still waiting out its backoff tries again now.
            self.session.on_ack(lambda lease: [w.retry_now() for w in list(self.watchers.values())])
        return self.session

    def resync(self) -> None:
        """Re-read every watched prefix (SIGHUP)."""
        for watcher in self.watchers.values():
            watcher.resync()

    def startService(self):
        # twistd starts its log observers before the services: filter them now.
        filter_debug_logs(self.options["verbose"])
        super().startService()
        self.reactor.callWhenRunning(self._running)

    def _running(self) -> None:
        """Our signal handlers in place, then the "started" line: a SIGTERM sent once it is logged stops
        the daemon with exit status 0 (sent before, Twisted's handler would end it with -15)."""
        self._install_signal_handlers()
        log.info(
            "networkd started: host {host}, node IP {ip}, etcd {etcd}, root {root}",
            host=self.options["hostname"], ip=self.options["node-ip"],
            etcd=",".join(str(e) for e in self.client.endpoints), root=self.options["etcd-root"],
        )

    def _install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop cleanly with exit status 0; SIGHUP re-reads etcd.

        Installed once the reactor runs, replacing Twisted's own handlers,
        which would make twistd re-raise the signal and exit with -15.
        """
        def stop(signum, _frame):
            log.info("received {name}, stopping", name=signal.Signals(signum).name)
            self.reactor.callFromThread(self._stop_reactor)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.resync))

    def _stop_reactor(self) -> None:
        if self.reactor.running:
            self.reactor.stop()

    def stopService(self):
        """Stop the children one after the other, newest first.

        Twisted's MultiService stops them all at once; a VIP manager must
        have removed its addresses before the session revokes the lease
        that a successor is waiting for, so here each waits for the next.
        """
        log.info("networkd stopping")
        service.Service.stopService(self)
        return defer.Deferred.fromCoroutine(self._stop_children())

    async def _stop_children(self) -> None:
        for child in reversed(list(self)):
            try:
                await defer.maybeDeferred(child.stopService)
            except Exception:
                log.failure("stopping {name} failed", name=getattr(child, "name", child))


def make_client(options, reactor=None) -> EtcdClient:
    """``reactor``: lease keep-alives through etcd's JSON gateway where they can (the daemon's)."""
    tls = None
    if options["etcd-ca"] or options["etcd-cert"]:
        tls = TLSFiles(options["etcd-ca"], options["etcd-cert"], options["etcd-key"])
    return EtcdClient(
        options["etcd-endpoints"], tls=tls, user=options["etcd-user"], password=options["etcd-password"],
        reactor=reactor,
    )


def makeService(options) -> Networkd:
    from networkd.systemd.notify import Notifier

    from networkd.gcfreeze import freeze_startup
    from networkd.memtrim import trim_after_startup

    reactor = install_asyncio_reactor()
    meter_turns(reactor)  # the daemon's turns, for /metrics (not the command-line tools')
    # Keep-alives through etcd's JSON gateway unless --etcd-keepalives grpc: at rest grpc's own threads
    # cost ~0.3 % of a core for 1.5 keep-alives a second (docs/benchmarks.md, "Idle CPU, fourth pass").
    gateway = options["etcd-keepalives"] == "gateway"
    root = build(options, reactor, make_client(options, reactor if gateway else None),
                 notifier=Notifier.from_environ())
    reactor.callWhenRunning(freeze_startup)  # after startService: everything start-up made
    reactor.callWhenRunning(trim_after_startup, reactor)  # what start-up dropped goes back to the kernel
    return root


def build(options, reactor, client: EtcdClient, *, watch_client: EtcdClient | None = None,
          vip_host: dict | None = None, api: bool = True, notifier=None) -> Networkd:
    """The service tree: the root and its parts, in dependency order.

    DNS server, then the resolv.conf guardian (only once DNS listens), the
    VIP manager, the leader election and tasks, and last the HTTP API.
    makeService builds the daemon with it, and the tests their in-process
    nodes (tests/support/builder.py), which may have the watchers read
    through another client (``watch_client``), give the VIP manager a
    recorded host (``vip_host``: netlink, announcer, firewall_backend,
    to_thread) and add the API themselves (``api=False``, then ``add_api``).
    """
    root = Networkd(options, reactor, client, watch_client=watch_client)
    add_dns(root, options)
    add_resolv_conf_guardian(root, options)
    add_vips(root, options, **(vip_host or {}))
    add_leader(root, options)
    if api:
        add_api(root, options)
    if notifier is not None and notifier.enabled:
        add_systemd_notify(root, options, notifier)
    return root


def add_dns(root: Networkd, options) -> None:
    """First of the parts: the guardian waits for it to listen."""
    if options["no-dns"]:
        return
    from networkd.dns.service import DnsService
    from networkd.systemd.activation import passed_sockets

    keys = root.keys
    root.dns = DnsService(
        reactor=root.reactor, listen=options["dns-listen"], ttl=options["dns-ttl"],
        cache_size=options["dns-cache-size"], allow=options["dns-allow"], node_ip=options["node-ip"],
        hosts_file=options["hosts-file"],
        domains=root.watch(keys.domains), domain_servers=root.watch(keys.domain_servers), vips=root.watch(keys.vips),
        domains_prefix=keys.domains, domain_servers_prefix=keys.domain_servers,
        forward_reverse=options["dns-forward-reverse"], stale_max=options["dns-stale-max"],
        forward_max=options["dns-forward-max"],
        inherited=passed_sockets(),  # networkd.socket's listeners (LISTEN_FDS), unset from the environment
    )
    root.dns.setServiceParent(root)


def add_resolv_conf_guardian(root: Networkd, options) -> None:
    """After DNS: it writes resolv.conf only once DNS listens, and feeds DNS its upstreams.

    Without DNS there is nothing to point resolv.conf at and nobody to feed:
    no guardian.  With --no-resolv-conf it still reads the file for the
    upstreams but never writes it.
    """
    from networkd.resolvconf import ResolvConfGuardian

    if root.dns is None:
        return
    root.resolv_conf = ResolvConfGuardian(
        options["resolv-conf"], root.dns, options["dns-listen"], root.reactor,
        systemd_path=options["systemd-resolv-conf"],
        # Socket-activated, the listeners outlive a restart: queries wait for the next daemon.
        keep_on_stop=bool(options["keep-resolv-conf"]) or getattr(root.dns, "socket_activated", False),
        keep_reason="--keep-resolv-conf" if options["keep-resolv-conf"] else "socket activation: networkd.socket stays",
        read_only=bool(options["no-resolv-conf"]),
        node_ip=options["node-ip"],
    )
    root.resolv_conf.setServiceParent(root)


def add_vips(root: Networkd, options, **host) -> None:
    """The VIP manager borrows the process lease; it is stopped before the lease is revoked.

    ``host`` replaces parts of its host side (``netlink``, ``announcer``,
    ``firewall_backend``, ``to_thread``): tests record them.
    """
    if options["no-vips"]:
        return
    from networkd.vips.health import probe_settings
    from networkd.vips.reconciler import VipManager

    parts = dict(
        reactor=root.reactor, client=root.client, keys=root.keys, watch=root.watch,
        session=root.lease_session(), hostname=options["hostname"], interface=options["interface"],
        node_ip=options["node-ip"], firewall_backend=options["firewall-backend"], probe=probe_settings(options),
        notify_script=options["notify-script"], garp_interval=options["garp-interval"],
        peer_secret=options.get("peer-secret"),
        peer_listen=None if options.get("peer-listen") is None else (options["peer-listen"].host,
                                                                     options["peer-listen"].port),
    )
    parts.update(host)
    root.vips = VipManager(**parts)
    root.vips.setServiceParent(root)


def add_leader(root: Networkd, options) -> None:
    """The election and the leader's tasks, only when a leader task is asked for.

    After the VIP manager: stopped before it, and before the session revokes
    the lease, so the leader resigns first and a successor takes over at once.
    """
    if not options["leader-tasks"]:
        return
    from networkd.etcd.lock import LeaseLocks
    from networkd.leader.election import LeaderElection
    from networkd.leader.tasks import LeaderTasks

    locks = LeaseLocks(root.client)
    root.leader = LeaderElection(
        locks=locks, watcher=root.watch(root.keys.leader), session=root.lease_session(),
        key=root.keys.leader, hostname=options["hostname"],
    )
    root.leader.setServiceParent(root)
    root.leader_tasks = LeaderTasks(
        reactor=root.reactor, election=root.leader, locks=locks, keys=root.keys, watch=root.watch,
        tasks=options["leader-tasks"], domain=options["domain"],
    )
    root.leader_tasks.setServiceParent(root)


def api_parts(root: Networkd, **shown) -> "ApiParts":
    """What the API shows: the root's parts, named once; ``shown`` puts others in their place (tests)."""
    from networkd.api.parts import ApiParts

    options = root.options
    parts = dict(
        reactor=root.reactor, client=root.client, etcd_root=options["etcd-root"], hostname=options["hostname"],
        node_ip=options["node-ip"], dns_listen=options["dns-listen"], watchers=MappingProxyType(root.watchers),
        session=root.session, dns=root.dns, vips=root.vips, resolv_conf=root.resolv_conf, leader=root.leader,
        leader_tasks=root.leader_tasks,
    )
    parts.update(shown)
    return ApiParts(**parts)


def add_api(root: Networkd, options, **shown) -> None:
    """Last, so it starts after (and stops before) everything it reports on."""
    from networkd.api import ApiService

    root.api = ApiService(api_parts(root, **shown), options["api-listen"], root.reactor)
    root.api.setServiceParent(root)


def add_systemd_notify(root: Networkd, options, notifier) -> None:
    """The very last: stopped first, so STOPPING=1 goes out when the stop begins."""
    from networkd.systemd.service import SystemdNotify

    SystemdNotify(
        notifier, root.reactor, watchers=MappingProxyType(root.watchers), dns=root.dns,
        dns_listen=options["dns-listen"], vips=root.vips, session=root.session, leader=root.leader,
    ).setServiceParent(root)
