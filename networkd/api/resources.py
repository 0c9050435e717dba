"""The HTTP API's one resource: a fixed table of read-only routes.

GET and HEAD only (405 otherwise), unknown paths 404, a trailing slash
ignored, and nothing served from the file system (BUG 45).
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from networkd.api import dnsdump, metrics
from networkd.api.parts import ApiParts
from networkd.api.slices import BodyCache, run_sliced
from networkd.api.status import EtcdProbe, full_status, health_problems
from networkd.api.vipstatus import EntryTexts, each_vip_entry, lock_records, with_held_for
from networkd.views import DnsConfigView

log = Logger()

TEXT = b"text/plain; charset=utf-8"
JSON = b"application/json"


class ApiResource(resource.Resource):
    isLeaf = True

    ROUTES = {
        "/v1/dns/config": "dns_config",
        "/v1/vips": "vips",
        "/v1/status": "status",
        "/healthz": "healthz",
        "/metrics": "metrics",
    }

    def __init__(self, parts: ApiParts, probe: EtcdProbe | None = None, registry=None):
        super().__init__()
        self._parts = parts
        self._probe = probe or EtcdProbe(parts.client, parts.probe_key, parts.reactor)
        self._registry = registry or metrics.make_registry(parts)
        self.bodies = BodyCache(parts.reactor)
        self.vip_texts = EntryTexts()
        self.metric_lines: dict = {}  # per-VIP metric lines' names and labels (networkd/api/rowfamily.py)

    def render(self, request):
        path = request.path.decode("utf-8", errors="replace").rstrip("/") or "/"
        route = self.ROUTES.get(path)
        if route is None:
            return _reply(request, 404, b"404 page not found\n")
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return _reply(request, 405, b"405 method not allowed\n")
        return getattr(self, f"_get_{route}")(request)

    # -- routes ----------------------------------------------------------------

    def _get_dns_config(self, request):
        """Rendered in slices, once per DNS data generation and format (networkd/api/slices.py)."""
        dns = self._parts.dns
        dump = getattr(dns, "config_dump", None)
        if dump is not None:
            generation, view = dump()
        else:  # a part that cannot say when its data changes: rendered each time
            generation, view = None, dns.config_view() if dns is not None else DnsConfigView()
        if _wants_json(request):
            body = self.bodies.get("dns.json", generation, lambda: dnsdump.json_renderer(view))
            return _later(request, body, lambda body: _reply(request, 200, body, JSON))
        body = self.bodies.get("dns.text", generation, lambda: dnsdump.text_renderer(view))
        return _later(request, body, lambda body: _reply(request, 200, body))

    def _get_vips(self, request):
        """The entries made and encoded a few at a time (networkd/api/slices.py), each entry's text
        kept while it is the same (networkd/api/vipstatus.py ``EntryTexts``).  The body itself is not
        kept: ``held_for`` and the durations move with time."""
        vips = self._parts.vips
        if vips is None:
            return _json(request, [])
        body = run_sliced(self._parts.reactor, _vips_renderer(vips, self._parts.reactor, self.vip_texts))
        return _later(request, body, lambda body: _reply(request, 200, body, JSON))

    def _get_status(self, request):
        def respond(probe):
            return _json(request, full_status(self._parts, probe))

        return _later(request, self._probe_if_needed(), respond)

    def _get_healthz(self, request):
        def respond(probe):
            problems = health_problems(self._parts, probe)
            if problems:
                return _reply(request, 503, ("unhealthy: " + "; ".join(problems) + "\n").encode())
            return _reply(request, 200, b"ok\n")

        return _later(request, self._probe_if_needed(), respond)

    def _get_metrics(self, request):
        """Written in slices, a metric family or part of one at a time (not kept: counters move); the
        per-VIP lines' labels kept from one scrape to the next."""
        body = run_sliced(self._parts.reactor, metrics.metrics_renderer(self._registry, self.metric_lines))
        return _later(request, body, lambda body: _reply(request, 200, body, metrics.CONTENT_TYPE_LATEST.encode()))

    def _probe_if_needed(self) -> defer.Deferred:
        """Ask etcd directly only when no watcher already says how it is."""
        if self._parts.watchers:
            return defer.succeed(None)
        return self._probe.check()


def _wants_json(request) -> bool:
    fmt = request.args.get(b"format", [b""])[0].lower()
    if fmt:
        return fmt == b"json"
    return b"application/json" in (request.getHeader(b"accept") or b"").lower()


def _reply(request, code: int, body: bytes, content_type: bytes = TEXT) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"cache-control", b"no-store")
    return body


def _json(request, data) -> bytes:
    body = json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"
    return _reply(request, 200, body, JSON)


def _vips_renderer(vips, reactor, texts: EntryTexts):
    if getattr(vips, "inputs", None) is not None:  # the VIP manager: its entries made as they are written
        entries = each_vip_entry(vips)
    else:  # a part that only gives them whole
        entries = iter([dict(entry) for entry in vips.status()])  # copies: the renderer takes values out
    records, now = lock_records(vips), reactor.seconds()
    return (yield from texts.renderer(with_held_for(entry, records, now) for entry in entries))


def _later(request, deferred: defer.Deferred, respond) -> object:
    """Answer once ``deferred`` fires; the client may have gone away meanwhile."""
    gone = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    def write(result):
        if gone:
            return
        body = respond(result)  # bytes, or a list of chunks (networkd/api/slices.py)
        chunks = [body] if isinstance(body, bytes) else body
        request.setHeader(b"content-length", b"%d" % sum(map(len, chunks)))
        for chunk in chunks:
            request.write(chunk)
        request.finish()

    def failed(failure):
        log.failure("API request {path} failed", failure, path=request.path)
        if not gone:
            request.write(_reply(request, 500, b"500 internal error\n"))
            request.finish()

    deferred.addCallback(write).addErrback(failed)
    return server.NOT_DONE_YET
