"""makeService: build the service tree in dependency order.

Services start in the order they are added and stop in reverse, so the
etcd client comes first (closed last) and the consumers after it.  This is
the one module that touches the global reactor: everything else is handed
the reactor it uses.
"""

from __future__ import annotations

import signal
import sys

from twisted.application import service
from twisted.logger import Logger

from networkd.etcd.client import EtcdClient, TLSFiles
from networkd.etcd.reflector import PrefixWatcher
from networkd.etcd.session import Session
from networkd.keys import Keys
from networkd.logsetup import filter_debug_logs

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
    """The root service; also the place components find shared pieces.

    ``watch(prefix)`` gives the one PrefixWatcher of a prefix (created on first
    use), so two components that need the same keys share one etcd watch.
    """

    def __init__(self, options, reactor, client: EtcdClient):
        super().__init__()
        self.options = options
        self.reactor = reactor
        self.client = client
        self.keys = Keys(options["etcd-root"])
        self.watchers: dict[str, PrefixWatcher] = {}
        self.session: Session | None = None
        # The parts (networkd.views): None while disabled or not built.
        self.dns = None
        self.resolv_conf = None
        self.vips = None
        self.api = None
        EtcdClientService(client).setServiceParent(self)

    def watch(self, prefix: str) -> PrefixWatcher:
        if prefix not in self.watchers:
            watcher = PrefixWatcher(self.client, prefix, self.reactor)
            watcher.setServiceParent(self)
            self.watchers[prefix] = watcher
        return self.watchers[prefix]

    def lease_session(self) -> Session:
        if self.session is None:
            self.session = Session(self.client, self.options["lock-ttl"], self.reactor)
            self.session.setServiceParent(self)
        return self.session

    def resync(self) -> None:
        """Re-read every watched prefix (SIGHUP)."""
        for watcher in self.watchers.values():
            watcher.resync()

    def startService(self):
        # twistd starts its log observers before the services: filter them now.
        filter_debug_logs(self.options["verbose"])
        super().startService()
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.resync))
        log.info(
            "networkd started: host {host}, node IP {ip}, etcd {etcd}, root {root}",
            host=self.options["hostname"], ip=self.options["node-ip"],
            etcd=",".join(str(e) for e in self.client.endpoints), root=self.options["etcd-root"],
        )

    def stopService(self):
        log.info("networkd stopping")
        return super().stopService()


def make_client(options) -> EtcdClient:
    tls = None
    if options["etcd-ca"] or options["etcd-cert"]:
        tls = TLSFiles(options["etcd-ca"], options["etcd-cert"], options["etcd-key"])
    return EtcdClient(
        options["etcd-endpoints"], tls=tls, user=options["etcd-user"], password=options["etcd-password"]
    )


def makeService(options) -> Networkd:
    reactor = install_asyncio_reactor()
    root = Networkd(options, reactor, make_client(options))
    # The parts, in dependency order (each later issue adds its own here):
    # DNS server, then the resolv.conf guardian (only once DNS listens),
    # the VIP manager, and last the HTTP API.
    if not options["no-dns"]:
        from networkd.dns.service import DnsService

        root.dns = DnsService.from_root(root)
        root.dns.setServiceParent(root)
    return root
