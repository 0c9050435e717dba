"""``GET /v1/dns/config``: the DNS data as the Go networkd printed it, or as JSON.

The text is byte-compatible with the Go daemon (same sections, order and
line formats; ``<name> [<ip> <ip>]`` is Go's ``%v`` of a list), except that
entries are sorted so the output is stable.  Upstream nameservers keep
resolv.conf order, which is the order they are asked in.

A zone holds up to tens of thousands of names: ``text_renderer`` and
``json_renderer`` sort and write it in pieces (networkd/api/slices.py) so
DNS is answered between them.  ``exact`` may be pairs or a mapping of name
to ips (or to a zone Record); the output is the same either way, and the
JSON is byte for byte what ``json.dumps(render_json(view), indent=2,
sort_keys=True)`` printed before.  A body is a list of chunks of ~1,000
names (joining 4 MB at once would be one long turn again).
"""

from __future__ import annotations

import heapq
from json.encoder import encode_basestring_ascii as _s
from typing import Iterator, Mapping

from networkd.api.slices import Renderer
from networkd.views import DnsConfigView

EXACT = "# exact domains\n"
WILDCARDS = "\n# wildcard domains\n"
SERVERS = "\n# domain servers (tinydns)\n"
NAMESERVERS = "\n# name servers (synchronized with /etc/resolv.conf)\n"

PIECE = 1000  # names sorted or written between two yields (~0.3 ms)


def _ips(value) -> tuple[str, ...]:
    return tuple(getattr(value, "ips", value))


def _sorted_exact(exact) -> Iterator:
    """Yields None between pieces of work; returns the names sorted, and the table they come from
    (pairs: the pairs sorted by name, and None).  Pairs are made piece by piece (``_piece``): 40,000
    of them made at once would be freed at once, one long turn of its own."""
    if not isinstance(exact, Mapping):
        return sorted(((name, _ips(ips)) for name, ips in exact), key=lambda item: item[0]), None
    names = list(exact)
    runs = []
    for i in range(0, len(names), PIECE):
        runs.append(sorted(names[i:i + PIECE]))
        yield
    out = []
    for k, name in enumerate(heapq.merge(*runs), 1):
        out.append(name)
        if not k % PIECE:
            yield
    return out, exact


def _piece(order: list, table, i: int) -> list:
    """The (name, ips) pairs ``i`` to ``i + PIECE`` in name order."""
    part = order[i:i + PIECE]
    return part if table is None else [(name, _ips(table[name])) for name in part]


def _small(view: DnsConfigView):
    return (sorted(view.wildcards), sorted(view.servers), tuple(view.nameservers))


def text_renderer(view: DnsConfigView) -> Renderer:
    order, table = yield from _sorted_exact(view.exact)
    wildcards, servers, nameservers = _small(view)
    chunks = [EXACT.encode()]
    for i in range(0, len(order), PIECE):
        chunks.append("".join([f"{name} [{' '.join(ips)}]\n" for name, ips in _piece(order, table, i)]).encode())
        yield
    parts = [WILDCARDS]
    parts += [f"address=/{domain}/{ip}\n" for domain, ip in wildcards]
    parts.append(SERVERS)
    parts += [f"server=/{zone}/{server}\n" for zone, server in servers]
    parts.append(NAMESERVERS)
    parts += [f"nameserver {server}\n" for server in nameservers]
    chunks.append("".join(parts).encode())
    return chunks


def _list(key: str, items: list[str], last: bool = False) -> str:
    """``"key": [...]`` at depth 1 of json.dumps(indent=2); ``items`` are rendered values at depth 2."""
    end = "\n" if last else ",\n"
    if not items:
        return f"  {_s(key)}: []{end}"
    return f"  {_s(key)}: [\n" + ",\n".join(items) + f"\n  ]{end}"


def _object(*pairs: tuple[str, str]) -> str:
    """An object at depth 2 whose (sorted) values are already rendered."""
    return "    {\n" + ",\n".join(f"      {_s(k)}: {v}" for k, v in pairs) + "\n    }"


def _ip_list(ips) -> str:
    if len(ips) == 1:
        return f"[\n        {_s(ips[0])}\n      ]"
    if not ips:
        return "[]"
    return "[\n" + ",\n".join(f"        {_s(ip)}" for ip in ips) + "\n      ]"


def json_renderer(view: DnsConfigView) -> Renderer:
    """``render_json(view)`` as the API prints it (indent 2, sorted keys, a final newline)."""
    order, table = yield from _sorted_exact(view.exact)
    wildcards, servers, nameservers = _small(view)
    chunks = [b"{\n"]
    if not order:
        chunks.append(_list("exact", []).encode())
    else:
        chunks.append(b'  "exact": [\n')
        for i in range(0, len(order), PIECE):
            lines = [f'    {{\n      "ips": {_ip_list(ips)},\n      "name": {_s(name)}\n    }},\n'
                     for name, ips in _piece(order, table, i)]
            if i + PIECE >= len(order):
                lines[-1] = lines[-1][:-2] + "\n  ],\n"
            chunks.append("".join(lines).encode("ascii"))
            yield
    chunks.append("".join([
        _list("nameservers", [f"    {_s(server)}" for server in nameservers]),
        _list("servers", [_object(("server", _s(server)), ("zone", _s(zone))) for zone, server in servers]),
        _list("wildcards", [_object(("domain", _s(domain)), ("ip", _s(ip))) for domain, ip in wildcards], last=True),
        "}\n"]).encode("ascii"))
    return chunks


def _run(renderer: Renderer):
    try:
        while True:
            next(renderer)
    except StopIteration as stop:
        return stop.value


def join(renderer: Renderer) -> bytes:
    """A renderer's body in one piece, made at once (tests, small views)."""
    return b"".join(_run(renderer))


def render_text(view: DnsConfigView) -> bytes:
    """The whole text at once (tests, small views)."""
    return join(text_renderer(view))


def render_json(view: DnsConfigView) -> dict:
    """The same data as JSON::

        {"exact":       [{"name": str, "ips": [str]}],
         "wildcards":   [{"domain": str, "ip": str}],
         "servers":     [{"zone": str, "server": "ip:port"}],
         "nameservers": ["ip:port"]}
    """
    order, table = _run(_sorted_exact(view.exact))
    exact = [pair for i in range(0, len(order), PIECE) for pair in _piece(order, table, i)]
    wildcards, servers, nameservers = _small(view)
    return {
        "exact": [{"name": name, "ips": list(ips)} for name, ips in exact],
        "wildcards": [{"domain": domain, "ip": ip} for domain, ip in wildcards],
        "servers": [{"zone": zone, "server": server} for zone, server in servers],
        "nameservers": list(nameservers),
    }
