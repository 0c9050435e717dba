"""In-process nodes for the tests, built by networkd/app.py's own code.

``BuiltNode(endpoint, etcd_root, hostname, *args)`` parses a command line
(``--etcd endpoint --etcd-root etcd_root --hostname hostname *args``) with
the daemon's Options and builds the service tree with ``networkd.app.build``:
the same parts, in the same order, with the same arguments as the daemon,
on the test's reactor.  What a test may change is only what ``build`` and
``add_api`` take: a separate client for the watchers, a recorded VIP host,
stand-ins shown by the API.  The API is added only on ``start_api``.

Services are started and stopped here rather than through the root, whose
``startService`` installs signal handlers: ``start()`` starts every part in
the order the root would, ``start(*services)`` only those; ``stop()`` stops
what was started, newest first, one after the other (as the root does), and
closes the clients.
"""

from __future__ import annotations

from twisted.internet import defer, reactor

from networkd.app import add_api, api_parts, build, make_client
from networkd.etcd.client import EtcdClient
from networkd.options import Options, parse_endpoints


def node_options(endpoint: str, etcd_root: str, hostname: str, *args: str) -> Options:
    options = Options()
    # In-process nodes run in the host's namespace: no probes to their made-up container IPs (``*args`` may override).
    options.parseOptions(["--etcd", endpoint, "--etcd-root", etcd_root, "--hostname", hostname,
                          "--vip-probe", "off", *args])
    return options


class BuiltNode:
    def __init__(self, endpoint: str, etcd_root: str, hostname: str, *args: str, call_timeout: float | None = None,
                 watch_endpoint: str | None = None, vip_host: dict | None = None):
        self.options = node_options(endpoint, etcd_root, hostname, *args)
        self.client = make_client(self.options)
        if call_timeout is not None:
            self.client.call_timeout = call_timeout
        # Snapshots over another connection than the lease and the writes (a cut proxy stops only those).
        self.reader = None
        if watch_endpoint is not None:
            self.reader = EtcdClient(parse_endpoints(watch_endpoint), call_timeout=self.client.call_timeout)
        self.root = build(self.options, reactor, self.client, watch_client=self.reader, vip_host=vip_host, api=False)
        self.started: list = []

    # -- the parts, as the root holds them ------------------------------------------

    @property
    def keys(self):
        return self.root.keys

    @property
    def watchers(self) -> dict:
        return self.root.watchers

    @property
    def session(self):
        return self.root.session

    @property
    def dns(self):
        return self.root.dns

    @property
    def vips(self):
        return self.root.vips

    @property
    def leader(self):
        return self.root.leader

    @property
    def leader_tasks(self):
        return self.root.leader_tasks

    @property
    def api(self):
        return self.root.api

    def parts(self, **shown):
        """The ApiParts the API would be given (``shown``: stand-ins, e.g. ``dns=FakeDns()``)."""
        return api_parts(self.root, **shown)

    # -- start and stop -------------------------------------------------------------

    def start(self, *services) -> "BuiltNode":
        for svc in services or list(self.root):
            svc.startService()
            self.started.append(svc)
        return self

    def start_api(self, **shown) -> None:
        """The API as networkd/app.py adds it (last), showing the stand-ins ``shown`` (dns=, vips=)."""
        add_api(self.root, self.options, **shown)
        self.start(self.root.api)

    async def restart_api(self, **shown) -> None:
        """The API stopped and added again: what it shows is fixed when it is built."""
        old = self.root.api
        await old.stopService()
        self.started.remove(old)
        old.disownServiceParent()
        self.start_api(**shown)

    async def stop(self) -> None:
        started, self.started = self.started, []
        for svc in reversed(started):
            if svc.running:
                await defer.maybeDeferred(svc.stopService)
        await self.client.close()
        if self.reader is not None:
            await self.reader.close()
