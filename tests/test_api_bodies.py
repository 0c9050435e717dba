"""Large API bodies (issue 13): the DNS dump rendered in slices and kept per data generation.

Byte-exactness against the renderers the API used before (copied here as the
reference), the cache against a real DnsService fed by real etcd, over HTTP.
"""

from __future__ import annotations

import http.client
import json
import random

import pytest_twisted
from twisted.internet import reactor, threads
from twisted.web import server

from networkd.api import dnsdump
from networkd.api.parts import ApiParts
from networkd.api.resources import ApiResource
from networkd.api.slices import run_sliced
from networkd.dns.zone import Record
from networkd.views import DnsConfigView
from tests.support.waiting import eventually
from tests.test_dns_server import Env

# -- the renderers as they were (one sort, json.dumps with indent) -----------------------


def old_sorted(view):
    return DnsConfigView(
        exact=tuple(sorted(((name, tuple(ips)) for name, ips in view.exact), key=lambda item: item[0])),
        wildcards=tuple(sorted(view.wildcards)), servers=tuple(sorted(view.servers)),
        nameservers=tuple(view.nameservers))


def old_text(view):
    view = old_sorted(view)
    parts = ["# exact domains\n"] + [f"{n} [{' '.join(ips)}]\n" for n, ips in view.exact]
    parts += ["\n# wildcard domains\n"] + [f"address=/{d}/{ip}\n" for d, ip in view.wildcards]
    parts += ["\n# domain servers (tinydns)\n"] + [f"server=/{z}/{s}\n" for z, s in view.servers]
    parts += ["\n# name servers (synchronized with /etc/resolv.conf)\n"] + [f"nameserver {s}\n" for s in view.nameservers]
    return "".join(parts).encode()


def old_json(view):
    view = old_sorted(view)
    data = {"exact": [{"name": n, "ips": list(ips)} for n, ips in view.exact],
            "wildcards": [{"domain": d, "ip": ip} for d, ip in view.wildcards],
            "servers": [{"zone": z, "server": s} for z, s in view.servers],
            "nameservers": list(view.nameservers)}
    return json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"


PREFIXES = ["a", "b", "é", 'x"y', "z\\w", "m"]  # non-ASCII and JSON escapes too


def random_view(rng, n):
    names = {f"{rng.choice(PREFIXES)}{rng.randrange(10 ** 6)}.lain" for _ in range(n)}
    exact = [(name, tuple(f"10.0.{rng.randrange(256)}.{k}" for k in range(rng.randrange(4)))) for name in names]
    wildcards = tuple((f"w{rng.randrange(9)}.lain", f"10.9.0.{k}") for k in range(rng.randrange(4)))
    servers = tuple((f"z{rng.randrange(5)}", f"10.8.0.{k}:53") for k in range(rng.randrange(3)))
    nameservers = tuple(f"10.7.0.{k}:53" for k in range(rng.randrange(3)))
    return exact, wildcards, servers, nameservers


def run(renderer):
    return dnsdump.join(renderer)


def test_sliced_dump_is_byte_for_byte_the_old_one():
    rng = random.Random(13)
    for n in (0, 1, 7, 999, 1000, 1001, 3500):
        exact, wildcards, servers, nameservers = random_view(rng, n)
        pairs = DnsConfigView(tuple(exact), wildcards, servers, nameservers)
        # The daemon's form: a name -> Record table, unsorted.
        table = DnsConfigView(dict((name, Record(ips)) for name, ips in exact), wildcards, servers, nameservers)
        for view in (pairs, table):
            assert run(dnsdump.text_renderer(view)) == old_text(pairs), n
            assert run(dnsdump.json_renderer(view)) == old_json(pairs), n
            assert dnsdump.render_text(view) == old_text(pairs)


class StepReactor:
    """callLater(0, f) kept until the test runs it: one reactor turn per ``step``."""

    def __init__(self):
        self.calls = []

    def callLater(self, delay, f, *args):
        assert delay == 0
        self.calls.append((f, args))

    def step(self):
        f, args = self.calls.pop(0)
        f(*args)


def test_a_large_dump_leaves_the_reactor_free_between_slices():
    steps = StepReactor()
    table = {f"d{i}.scale.lain": Record((f"10.1.{i >> 8 & 255}.{i & 255}",)) for i in range(20000)}
    view = DnsConfigView(table)
    done = run_sliced(steps, dnsdump.json_renderer(view), budget=0.001)
    turns = 1
    while not done.called:
        assert len(steps.calls) == 1, "a slice always schedules the next one"
        steps.step()
        turns += 1
    assert turns > 5, f"rendered in {turns} turns"
    assert b"".join(done.result) == old_json(DnsConfigView(tuple((n, r.ips) for n, r in table.items())))


# -- over HTTP, against a real DnsService -----------------------------------------------


def fetch(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_dump_is_rendered_once_per_change_and_shows_each_change(etcd_server, etcd_root, upstream):
    env = await Env(etcd_server, etcd_root, [upstream]).start()
    parts = ApiParts(reactor=reactor, client=env.client, etcd_root=etcd_root, hostname="node-a", node_ip=None,
                     dns_listen=env.dns.listen, dns=env.dns)
    api = ApiResource(parts)
    port = reactor.listenTCP(0, server.Site(api), interface="127.0.0.1")

    async def get(path):
        status, body = await threads.deferToThread(fetch, port.getHost().port, path)
        assert status == 200
        return body

    try:
        env.put_domain("one.lain", '{"ips": ["10.0.0.1"]}')
        await eventually(lambda: "one.lain" in env.dns.resolver.zone.exact)
        text = await get("/v1/dns/config")
        assert b"one.lain [10.0.0.1]\n" in text and text == old_text(env.dns.config_view())
        renders = api.bodies.renders
        assert await get("/v1/dns/config") == text
        assert api.bodies.renders == renders, "nothing changed: the body rendered before is served"

        data = await get("/v1/dns/config?format=json")
        assert data == old_json(env.dns.config_view())
        assert await get("/v1/dns/config?format=json") == data and api.bodies.renders == renders + 1

        env.put_domain("two.lain", '{"ips": ["10.0.0.2"]}')
        await eventually(lambda: "two.lain" in env.dns.resolver.zone.exact)
        text = await get("/v1/dns/config")
        assert b"two.lain [10.0.0.2]\n" in text and text == old_text(env.dns.config_view())
        assert b'"name": "two.lain"' in await get("/v1/dns/config?format=json")

        env.dns.set_upstreams([("10.99.0.1", 53)])
        assert (await get("/v1/dns/config")).endswith(b"nameserver 10.99.0.1:53\n"), "an upstream change is seen"
        renders = api.bodies.renders
        assert (await get("/v1/dns/config")).endswith(b"nameserver 10.99.0.1:53\n")
        assert api.bodies.renders == renders
    finally:
        await port.stopListening()
        await env.stop()


def test_metrics_in_slices_are_what_generate_latest_printed(monkeypatch):
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    from networkd.api import metrics

    class Many:
        def collect(self):
            big = GaugeMetricFamily("big", 'help with "quotes" \\ and\nnewline', labels=["vip"])
            for i in range(1234):
                big.add_metric([f"10.0.{i // 250}.{i % 250}"], float(i))
            yield big
            yield CounterMetricFamily("count", "a counter", value=7)
            yield GaugeMetricFamily("empty", "no samples", labels=["x"])
            hist = HistogramMetricFamily("lat", "a histogram")
            hist.add_metric([], [("0.1", 1), ("+Inf", 3)], 0.5)
            yield hist
            many = CounterMetricFamily("many", "a big counter", labels=["vip"])
            for i in range(700):
                many.add_metric([str(i)], i)
            yield many

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Many())
    monkeypatch.setattr(metrics, "PIECE", 100)
    steps = StepReactor()
    done = run_sliced(steps, metrics.metrics_renderer(registry), budget=0.0)
    turns = 1
    while not done.called:
        steps.step()
        turns += 1
    assert b"".join(done.result) == generate_latest(registry)
    assert turns >= 13 + 7, f"{turns} turns: a family or {metrics.PIECE} samples a turn"


def test_the_api_site_keeps_no_timer_and_still_dates_its_access_lines():
    """twisted.web's log-date cache was a timer waking the reactor every second for the daemon's life."""
    from twisted.internet import task
    from twisted.web.resource import Resource
    from twisted.web.test.requesthelper import DummyRequest

    from networkd.api import QuietSite

    clock = task.Clock()
    clock.advance(1_800_000_000)  # 2027-01-15
    site = QuietSite(Resource(), reactor=clock)
    site.startFactory()
    try:
        assert clock.getDelayedCalls() == []
        lines = []
        site._logFormatter = lambda date, request: lines.append(date) or "line"
        site.log(DummyRequest([b"v1", b"status"]))
        assert lines == ["[15/Jan/2027:08:00:00 +0000]"]
    finally:
        site.stopFactory()
