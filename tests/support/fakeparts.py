"""Stand-ins for the DNS server and the VIP manager, for tests of the parts that only look at them.

They keep to networkd.views (DnsPart, VipPart) and record what they are told,
so the resolv.conf guardian and the API can be tested for real without a DNS
server or namespaces.
"""

from __future__ import annotations

from twisted.internet import defer

from networkd.views import DnsConfigView, DnsStats


class FakeDns:
    def __init__(self, view: DnsConfigView | None = None, listening: bool = False):
        self.stats = DnsStats()
        self.invalid_keys: dict = {}
        self.view = view or DnsConfigView()
        self.upstream_calls: list[list[tuple[str, int]]] = []
        self._listening = listening
        self._waiters: list[defer.Deferred] = []
        self._failure = None

    # -- DnsPart ---------------------------------------------------------------

    def when_listening(self) -> defer.Deferred:
        if self._listening:
            return defer.succeed(None)
        if self._failure is not None:
            return defer.fail(self._failure)
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    def listening(self) -> bool:
        return self._listening

    def set_upstreams(self, servers):
        self.upstream_calls.append(list(servers))
        self.view = DnsConfigView(self.view.exact, self.view.wildcards, self.view.servers,
                                  tuple(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip, port in servers))

    def config_view(self) -> DnsConfigView:
        return self.view

    # -- test controls -----------------------------------------------------------

    @property
    def upstreams(self):
        return self.upstream_calls[-1] if self.upstream_calls else None

    def start_listening(self) -> None:
        self._listening = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def fail_to_listen(self, error: Exception) -> None:
        self._failure = error
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.errback(error)

    def stop_listening(self) -> None:
        self._listening = False


class FakeVips:
    def __init__(self, entries: list[dict] | None = None, held: int = 0):
        self.invalid_keys: dict = {}
        self.entries = entries or []
        self.held = held

    def status(self) -> list[dict]:
        return list(self.entries)

    def held_count(self) -> int:
        return self.held

    def safety_counters(self) -> dict[str, int]:
        return {"fencings": 1, "address_requests": 5, "netlink_overruns": 0, "lifetime_violations": 0}
