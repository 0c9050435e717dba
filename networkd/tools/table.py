"""The text of ``networkd status``: sections of aligned ``name  value`` lines and a VIP table.

Pure: the data read by networkd/tools/apiread.py in, text out.  Plain ASCII
without colours, so it pastes into a bug report as it looks.
"""

from __future__ import annotations

import time


def ago(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"


def columns(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def pairs(items: list[tuple[str, str]], indent: str = "  ") -> list[str]:
    width = max(len(k) for k, _ in items)
    return [f"{indent}{k.ljust(width)}  {v}" for k, v in items]


def render(data: dict, now: float | None = None) -> str:
    s = data["status"]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now if now is not None else time.time()))
    health = data["health"]
    lines = [f"networkd on {s.get('hostname')} (node IP {s.get('node_ip') or '-'}), API {data['api']}, {stamp}",
             "health: ok" if health["ok"] else "health: UNHEALTHY"]
    lines += [f"  - {p}" for p in health["problems"]]
    lines += ["", "etcd"] + pairs(_etcd(s))
    lines += ["", "DNS"] + pairs(_dns(s, data.get("dns_figures")))
    lines += ["", "VIPs"] + _vips(s, data.get("vips") or [])
    lines += ["", "leader"] + pairs(_leader(s.get("leader")))
    invalid = s.get("invalid_keys") or []
    lines += ["", f"invalid keys: {len(invalid) or 'none'}"]
    lines += [f"  {i['part']:<6}  {i['key']}: {i['error']}" for i in invalid]
    return "\n".join(lines)


def _etcd(s: dict) -> list[tuple[str, str]]:
    etcd = s.get("etcd") or {}
    state = "connected" if etcd.get("connected") else "NOT CONNECTED"
    items = [("endpoint", f"{etcd.get('endpoint')} ({state}, {etcd.get('failovers', 0)} fail-overs)")]
    if etcd.get("last_error"):
        items.append(("last error", etcd["last_error"]))
    prefixes = etcd.get("prefixes") or []
    if prefixes:
        down = [p for p in prefixes if not p.get("connected")]
        revision = max(p.get("revision") or 0 for p in prefixes)
        items.append(("watches", f"{len(prefixes)} prefixes, " + (
            "all live" if not down else f"{len(down)} down ({', '.join(p['prefix'] for p in down)})")
            + f", revision {revision}"))
    session = s.get("session")
    if session:
        lease = session.get("lease") or "none"
        items.append(("lease", f"{lease}, TTL {session.get('ttl')}s, keep-alive {ago(session.get('keepalive_age'))} ago"
                      + (f", {session['last_error']}" if session.get("last_error") else "")))
    return items


def _dns(s: dict, figures: dict | None) -> list[tuple[str, str]]:
    dns = s.get("dns")
    if dns is None:
        return [("server", "off (--no-dns)")]
    items = [("listen", f"{dns.get('listen')} ({'listening' if dns.get('listening') else 'NOT LISTENING'})"),
             ("upstreams", ", ".join(s.get("upstreams") or []) or "none")]
    if figures:
        hits, misses = figures["cache_hits"], figures["cache_misses"]
        ratio = f", {100 * hits / (hits + misses):.0f}% hits" if hits + misses else ""
        items.append(("cache", f"{hits} hits, {misses} misses{ratio}"))
        queries = figures["queries"]
        total = sum(queries.values())
        items.append(("queries", f"{total}" + (" (" + ", ".join(f"{k} {v}" for k, v in queries.items()) + ")"
                                                 if queries else "")))
    resolv = s.get("resolv_conf")
    if resolv:
        items.append(("resolv.conf", f"{resolv.get('path')}: {resolv.get('state')}, {resolv.get('writes', 0)} writes, "
                                     f"undone {resolv.get('undone', 0)} times"
                      + (f", last by {resolv['last_writer']}" if resolv.get("last_writer") else "")))
    return items


def _vips(s: dict, vips: list[dict]) -> list[str]:
    if s.get("vips") is None:
        return ["  off (--no-vips)"]
    lines = [f"  {s['vips'].get('held', 0)} held here, {len(vips)} configured"]
    if not vips:
        return lines
    rows = [["KEY", "APP/PROC", "HOLDER", "HERE", "HEALTH", "SINCE", "ERROR"]]
    for v in vips:
        if "ip" not in v:
            rows.append([v["key"], "-", "-", "-", "-", "-", f"invalid: {v.get('error')}"])
            continue
        here = "active" if v.get("active") else ("held" if v.get("held_by_me") else "no")
        if v.get("excluded"):
            here = "excluded"
        health = v.get("health")
        if isinstance(health, dict):  # the VIP probes' verdict on this node's container
            health = health.get("here") or "?"
        rows.append([v["key"], f"{v.get('app')}/{v.get('proc')}", v.get("holder") or ("-" if v.get("floating") else "(DNAT)"),
                     here, str(health) if health is not None else "-", ago(v.get("held_for")),
                     v.get("last_error") or ""])
    return lines + columns(rows)


def _leader(leader: dict | None) -> list[tuple[str, str]]:
    if leader is None:
        return [("election", "not a candidate (no leader task)")]
    items = [("holder", f"{leader.get('holder') or 'none'}" + (" (this node)" if leader.get("is_leader") else ""))]
    if leader.get("tasks"):
        items.append(("tasks", ", ".join(leader["tasks"])))
    return items
