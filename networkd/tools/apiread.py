"""Reading the local daemon's HTTP API: one snapshot of what ``networkd status`` shows."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


class ApiUnreachable(Exception):
    """The API did not answer (daemon down, wrong --api)."""


def _get(base: str, path: str, timeout: float) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(base + path, timeout=timeout) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as e:  # /healthz answers 503 when unhealthy
        return e.code, e.read()
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ApiUnreachable(f"{base}{path}: {reason}") from None


def metric_sums(text: str) -> dict[str, float]:
    """Sample name (with labels ``name{k="v"}``) -> value, from Prometheus text."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def dns_figures(metrics: dict[str, float]) -> dict:
    """Cache and query counters of the DNS server, from /metrics."""
    hits = metrics.get("networkd_dns_cache_hits_total", 0.0)
    misses = metrics.get("networkd_dns_cache_misses_total", 0.0)
    by_rcode: dict[str, float] = {}
    for name, value in metrics.items():
        if name.startswith("networkd_dns_queries_total{"):
            rcode = name.split('rcode="', 1)[1].split('"', 1)[0]
            by_rcode[rcode] = by_rcode.get(rcode, 0.0) + value
    return {"cache_hits": int(hits), "cache_misses": int(misses),
            "queries": {k: int(v) for k, v in sorted(by_rcode.items())}}


def read_all(base: str, timeout: float = 3.0) -> dict:
    """``{"api", "status", "vips", "health": {"ok", "problems"}, "dns_figures"}`` of the daemon at ``base``."""
    code, body = _get(base, "/v1/status", timeout)
    if code != 200:
        raise ApiUnreachable(f"{base}/v1/status answered {code}")
    status = json.loads(body)
    code, body = _get(base, "/v1/vips", timeout)
    vips = json.loads(body) if code == 200 else []
    code, body = _get(base, "/healthz", timeout)
    text = body.decode("utf-8", "replace").strip()
    problems = [] if code == 200 else [p.strip() for p in text.partition(":")[2].split(";") if p.strip()]
    code, body = _get(base, "/metrics", timeout)
    figures = dns_figures(metric_sums(body.decode())) if code == 200 else None
    return {"api": base, "status": status, "vips": vips, "health": {"ok": not problems, "problems": problems},
            "dns_figures": figures}
