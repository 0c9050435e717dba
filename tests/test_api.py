"""The HTTP API: real HTTP requests against the real site, real etcd behind it.

The DNS server and the VIP manager are other parts (other branches); small
fakes keeping to networkd.views stand in for them.
"""

from __future__ import annotations

import http.client
import json
import socket

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, threads

from networkd.api import ApiService
from networkd.api.dnsdump import render_json, render_text
from networkd.backoff import Backoff
from networkd.options import ListenAddress
from networkd.views import DnsConfigView
from tests.support.builder import BuiltNode
from tests.support.fakeparts import FakeDns, FakeVips
from tests.support.logcapture import LogCapture
from tests.support.ports import free_port
from tests.support.waiting import eventually

# A fixed DNS content, given unsorted: the dump must sort it.
VIEW = DnsConfigView(
    exact=(
        ("etcd.lain", ("10.131.0.72",)),
        ("deployd.lain", ("10.131.0.10",)),
        ("localhost", ("::1",)),
        ("multi.lain", ("10.0.0.2", "10.0.0.1")),
        ("empty.lain", ()),
    ),
    wildcards=(("lain.local", "10.131.0.101"), ("lain.local", "10.131.0.100"), ("apps.lain", "10.0.0.9")),
    servers=(("lain", "10.131.0.20:53"), ("example", "[fd00::1]:5353"), ("lain", "10.131.0.19:53")),
    nameservers=("10.0.0.3:53", "10.0.0.2:53", "[fd00::53]:53"),
)

EXPECTED_DUMP = b"""# exact domains
deployd.lain [10.131.0.10]
empty.lain []
etcd.lain [10.131.0.72]
localhost [::1]
multi.lain [10.0.0.2 10.0.0.1]

# wildcard domains
address=/apps.lain/10.0.0.9
address=/lain.local/10.131.0.100
address=/lain.local/10.131.0.101

# domain servers (tinydns)
server=/example/[fd00::1]:5353
server=/lain/10.131.0.19:53
server=/lain/10.131.0.20:53

# name servers (synchronized with /etc/resolv.conf)
nameserver 10.0.0.3:53
nameserver 10.0.0.2:53
nameserver [fd00::53]:53
"""

EMPTY_DUMP = (
    b"# exact domains\n\n# wildcard domains\n\n# domain servers (tinydns)\n"
    b"\n# name servers (synchronized with /etc/resolv.conf)\n"
)

# -- documented JSON shapes (README "HTTP API") ------------------------------------
OPT_STR = (str, type(None))
OPT_NUM = (int, float, type(None))
DNS_CONFIG_SHAPE = {
    "exact": [{"name": str, "ips": [str]}],
    "wildcards": [{"domain": str, "ip": str}],
    "servers": [{"zone": str, "server": str}],
    "nameservers": [str],
}
PREFIX_SHAPE = {
    "prefix": str, "connected": bool, "revision": int, "synced_age": OPT_NUM, "lost_for": OPT_NUM,
    "last_error": OPT_STR, "reconnects": int, "relists": int,
}
STATUS_SHAPE = {
    "hostname": str,
    "node_ip": OPT_STR,
    "etcd": {"endpoint": str, "connected": bool, "last_error": OPT_STR, "failovers": int, "prefixes": [PREFIX_SHAPE]},
    "session": (type(None), {"lease": OPT_STR, "ttl": int, "keepalive_age": OPT_NUM, "last_error": OPT_STR}),
    "invalid_keys": [{"part": str, "key": str, "error": str}],
    "upstreams": [str],
    "dns": (type(None), {"listen": str, "listening": bool}),
    "resolv_conf": (type(None), {
        "path": str, "state": str, "address": OPT_STR, "writes": int, "undone": int,
        "last_writer": OPT_STR, "last_error": OPT_STR, "upstreams": [str],
    }),
    "vips": (type(None), {"held": int}),
    "peers": (type(None), {
        "failsafe": str, "why": OPT_STR, "listen": OPT_STR, "keeping": [str], "deadline_in": OPT_NUM,
        "retaking": bool, "holdoff_left": (int, float), "refused_messages": int,
        "promises_given": [{"to": str, "vips": [str], "seconds_left": (int, float)}],
        "promises_held": [{"from": str, "seconds_left": (int, float)}],
    }),
    "leader": (type(None), {"key": str, "holder": OPT_STR, "is_leader": bool, "tasks": [str], "published": dict}),
}


def check_shape(value, shape, where="$"):
    """``shape``: a type, a tuple of alternatives, [item shape], or {key: shape} (exact keys)."""
    if isinstance(shape, tuple):
        errors = []
        for alternative in shape:
            try:
                check_shape(value, alternative, where)
                return
            except AssertionError as e:
                errors.append(str(e))
        raise AssertionError(f"{where}: none of the alternatives fit: {errors}")
    if isinstance(shape, list):
        assert isinstance(value, list), f"{where}: {value!r} is not a list"
        for i, item in enumerate(value):
            check_shape(item, shape[0], f"{where}[{i}]")
    elif isinstance(shape, dict):
        assert isinstance(value, dict), f"{where}: {value!r} is not an object"
        assert set(value) == set(shape), f"{where}: keys {sorted(value)} != {sorted(shape)}"
        for key, sub in shape.items():
            check_shape(value[key], sub, f"{where}.{key}")
    else:
        assert isinstance(value, shape) and not (shape is int and isinstance(value, bool)), \
            f"{where}: {value!r} is not {shape.__name__}"


# -- fixtures ------------------------------------------------------------------------


class Api(BuiltNode):
    """A node built as the daemon builds it (no DNS, no VIPs) with its API on a free port, and a tiny HTTP client."""

    def __init__(self, etcd, etcd_root):
        self.port = free_port()
        super().__init__(etcd.endpoint, etcd_root, "node-a", "--no-vips", "--no-dns", "--node-ip", "10.1.2.3",
                         "--api-listen", f"127.0.0.1:{self.port}", call_timeout=1.0)

    def _fetch(self, path, method="GET", headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request(method, path, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict((k.lower(), v) for k, v in response.getheaders()), response.read()
        finally:
            conn.close()

    def fetch(self, path, method="GET", headers=None):
        return threads.deferToThread(self._fetch, path, method, headers)


@pytest.fixture
def api_factory(etcd_root):
    made = []

    def make(etcd):
        api = Api(etcd, etcd_root)
        made.append(api)
        return api

    yield make
    for api in made:
        pytest_twisted.blockon(defer.Deferred.fromCoroutine(api.stop()))


# -- the dump, as a pure function -------------------------------------------------------


def test_dump_is_byte_exact_and_sorted():
    assert render_text(VIEW) == EXPECTED_DUMP


def test_dump_with_nothing_keeps_every_section():
    assert render_text(DnsConfigView()) == EMPTY_DUMP


def test_dump_as_json_has_the_same_data():
    data = render_json(VIEW)
    check_shape(data, DNS_CONFIG_SHAPE)
    assert [e["name"] for e in data["exact"]] == ["deployd.lain", "empty.lain", "etcd.lain", "localhost", "multi.lain"]
    assert data["nameservers"] == ["10.0.0.3:53", "10.0.0.2:53", "[fd00::53]:53"]
    assert data["servers"][0] == {"zone": "example", "server": "[fd00::1]:5353"}


# -- over HTTP ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_dns_config_over_http(etcd_server, api_factory):
    api = api_factory(etcd_server)
    api.start_api(dns=FakeDns(VIEW, listening=True))

    status, headers, body = await api.fetch("/v1/dns/config")
    assert (status, body) == (200, EXPECTED_DUMP)
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert (await api.fetch("/v1/dns/config/"))[2] == EXPECTED_DUMP, "a trailing slash is the same page"

    status, headers, body = await api.fetch("/v1/dns/config", method="HEAD")
    assert (status, body) == (200, b"")

    for path, headers_in in [("/v1/dns/config?format=json", {}),
                             ("/v1/dns/config", {"Accept": "application/json"})]:
        status, headers, body = await api.fetch(path, headers=headers_in)
        assert status == 200 and headers["content-type"] == "application/json"
        data = json.loads(body)
        check_shape(data, DNS_CONFIG_SHAPE)
        assert data == render_json(VIEW)


@pytest_twisted.ensureDeferred
async def test_unknown_paths_404_other_methods_405_no_files(etcd_server, api_factory, tmp_path):
    api = api_factory(etcd_server)
    api.start_api()
    for path in ["/", "/v1", "/v1/dns", "/public/index.html", "/../../etc/passwd", "/v1/dns/config/extra"]:
        status, _, body = await api.fetch(path)
        assert (status, body) == (404, b"404 page not found\n"), path
    for method in ["POST", "PUT", "DELETE"]:
        status, headers, _ = await api.fetch("/v1/status", method=method)
        assert status == 405 and headers["allow"] == "GET, HEAD"
    status, _, body = await api.fetch("/v1/dns/config")
    assert (status, body) == (200, EMPTY_DUMP), "without DNS the dump is empty, not an error"


@pytest_twisted.ensureDeferred
async def test_vips_lists_what_the_vip_part_reports(etcd_server, api_factory):
    api = api_factory(etcd_server)
    api.start_api()
    status, headers, body = await api.fetch("/v1/vips")
    assert (status, json.loads(body)) == (200, [])
    entry = {"key": "10.0.0.100", "config": {"app": "hello", "proc": "web"}, "holder": "node-a",
             "held": True, "container": "172.20.0.5", "dnat": ["tcp 80 -> 172.20.0.5:8080"], "error": None}
    await api.restart_api(vips=FakeVips([entry], held=1))
    status, headers, body = await api.fetch("/v1/vips")
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == [entry]


@pytest_twisted.ensureDeferred
async def test_status_reports_etcd_revisions_invalid_keys_and_upstreams(etcd_server, etcd_root, api_factory):
    api = api_factory(etcd_server)
    dns = FakeDns(listening=True)
    dns.set_upstreams([("10.0.0.2", 53), ("10.0.0.3", 53)])
    dns.invalid_keys = {f"{etcd_root}/config/domains/bad.lain": "value is not JSON"}
    vips = FakeVips(held=2)
    vips.invalid_keys = {f"{etcd_root}/config/vips/10.0.0.300": "not an IP address"}
    watcher = api.root.watch(api.root.keys.domains)
    api.start(watcher)
    api.start_api(dns=dns, vips=vips)
    etcd_server.put(f"{etcd_root}/config/domains/a.lain", '{"ips": ["10.0.0.1"]}')
    revision = etcd_server.revision()
    await eventually(lambda: watcher.status.revision >= revision)

    status, headers, body = await api.fetch("/v1/status")
    assert status == 200 and headers["content-type"] == "application/json"
    data = json.loads(body)
    check_shape(data, STATUS_SHAPE)
    assert data["etcd"]["connected"] is True
    assert [(p["prefix"], p["revision"], p["connected"]) for p in data["etcd"]["prefixes"]] == [
        (f"{etcd_root}/config/domains/", revision, True)
    ]
    assert data["invalid_keys"] == [
        {"part": "dns", "key": f"{etcd_root}/config/domains/bad.lain", "error": "value is not JSON"},
        {"part": "vips", "key": f"{etcd_root}/config/vips/10.0.0.300", "error": "not an IP address"},
    ]
    assert data["upstreams"] == ["10.0.0.2:53", "10.0.0.3:53"]
    assert data["dns"] == {"listen": "127.0.0.1:53", "listening": True}
    assert data["vips"] == {"held": 2}
    assert (data["hostname"], data["node_ip"]) == ("node-a", "10.1.2.3")


@pytest_twisted.ensureDeferred
async def test_healthz_turns_503_when_etcd_stops(private_etcd, etcd_root, api_factory):
    api = api_factory(private_etcd)
    dns = FakeDns(listening=True)
    watcher = api.root.watch(api.root.keys.domains)
    api.start(watcher)
    api.start_api(dns=dns)
    await eventually(lambda: watcher.status.connected)
    assert await api.fetch("/healthz") == (200, _any_headers, b"ok\n")
    assert await api.fetch("/healthz", method="HEAD") == (200, _any_headers, b"")

    dns.stop_listening()
    status, _, body = await api.fetch("/healthz")
    assert status == 503 and b"DNS server is not listening on 127.0.0.1:53" in body
    dns.start_listening()

    private_etcd.stop()
    await eventually(lambda: not watcher.status.connected, timeout=15)
    status, _, body = await api.fetch("/healthz")
    assert status == 503
    assert f"etcd watch of {etcd_root}/config/domains/ is down".encode() in body, body
    status, _, body = await api.fetch("/v1/status")
    assert status == 200 and json.loads(body)["etcd"]["connected"] is False

    private_etcd.start()
    await eventually(lambda: watcher.status.connected, timeout=15)
    assert (await api.fetch("/healthz"))[0] == 200


@pytest_twisted.ensureDeferred
async def test_healthz_asks_etcd_itself_when_nothing_watches(private_etcd, api_factory):
    api = api_factory(private_etcd)
    api.start_api()
    assert (await api.fetch("/healthz"))[0] == 200
    private_etcd.stop()

    async def unhealthy():
        status, _, body = await api.fetch("/healthz")
        return body if status == 503 else None

    body = await eventually(unhealthy, timeout=10, interval=0.1)
    assert b"does not answer" in body
    status, _, body = await api.fetch("/v1/status")
    assert json.loads(body)["etcd"]["connected"] is False


@pytest_twisted.ensureDeferred
async def test_metrics_in_prometheus_text(etcd_server, etcd_root, api_factory):
    api = api_factory(etcd_server)
    dns = FakeDns(listening=True)
    dns.stats.queries = {("NOERROR", "local"): 7, ("NOERROR", "cache"): 3, ("NXDOMAIN", "forward"): 2}
    dns.stats.cache_hits = 3
    dns.stats.cache_misses = 4
    dns.stats.observe_upstream(0.004)
    dns.stats.observe_upstream(0.2)
    watcher = api.root.watch(api.root.keys.domains)
    api.start(watcher)
    api.start_api(dns=dns, vips=FakeVips(held=2))
    await eventually(lambda: watcher.status.connected)

    status, headers, body = await api.fetch("/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("networkd_dns_queries_total", (("rcode", "NOERROR"), ("source", "local")))] == 7
    assert samples[("networkd_dns_queries_total", (("rcode", "NXDOMAIN"), ("source", "forward")))] == 2
    assert samples[("networkd_dns_cache_hits_total", ())] == 3
    assert samples[("networkd_dns_upstream_latency_seconds_bucket", (("le", "0.005"),))] == 1
    assert samples[("networkd_dns_upstream_latency_seconds_bucket", (("le", "+Inf"),))] == 2
    assert samples[("networkd_dns_upstream_latency_seconds_count", ())] == 2
    assert samples[("networkd_vips_held", ())] == 2
    prefix = (("prefix", f"{etcd_root}/config/domains/"),)
    assert samples[("networkd_etcd_connected", prefix)] == 1
    assert samples[("networkd_etcd_reconnects_total", prefix)] == 0


@pytest_twisted.ensureDeferred
async def test_metrics_count_fencings_and_lifetime_violations(etcd_server, api_factory):
    api = api_factory(etcd_server)
    api.start_api(vips=FakeVips(held=1))
    status, _, body = await api.fetch("/metrics")
    samples = {s.name: s.value for family in text_string_to_metric_families(body.decode()) for s in family.samples}
    assert status == 200
    assert samples["networkd_vip_fencings_total"] == 1
    assert samples["networkd_vip_address_requests_total"] == 5
    assert samples["networkd_vip_lifetime_violations_total"] == 0
    assert samples["networkd_vip_netlink_overruns_total"] == 0


@pytest_twisted.ensureDeferred
async def test_busy_address_is_logged_and_retried(etcd_server, api_factory):
    api = api_factory(etcd_server)
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", api.port))
    blocker.listen()
    with LogCapture() as logs:
        api.root.api = ApiService(api.parts(), ListenAddress("127.0.0.1", api.port), reactor,
                                  backoff=Backoff(0.05, 0.1))
        api.start(api.root.api)
        await eventually(lambda: logs.has(f"HTTP API: cannot listen on 127.0.0.1:{api.port}"))
        blocker.close()
        await eventually(lambda: api.root.api.port is not None, timeout=5)
    assert (await api.fetch("/healthz"))[0] == 200


class _Any:
    def __eq__(self, other):
        return True


_any_headers = _Any()
