"""``GET /v1/dns/config``: the DNS data as the Go networkd printed it, or as JSON.

The text is byte-compatible with the Go daemon (same sections, order and
line formats; ``<name> [<ip> <ip>]`` is Go's ``%v`` of a list), except that
entries are sorted so the output is stable.  Upstream nameservers keep
resolv.conf order, which is the order they are asked in.
"""

from __future__ import annotations

from networkd.views import DnsConfigView

EXACT = "# exact domains\n"
WILDCARDS = "\n# wildcard domains\n"
SERVERS = "\n# domain servers (tinydns)\n"
NAMESERVERS = "\n# name servers (synchronized with /etc/resolv.conf)\n"


def _sorted(view: DnsConfigView) -> DnsConfigView:
    return DnsConfigView(
        exact=tuple(sorted(((name, tuple(ips)) for name, ips in view.exact), key=lambda item: item[0])),
        wildcards=tuple(sorted(view.wildcards)),
        servers=tuple(sorted(view.servers)),
        nameservers=tuple(view.nameservers),
    )


def render_text(view: DnsConfigView) -> bytes:
    view = _sorted(view)
    parts = [EXACT]
    parts += [f"{name} [{' '.join(ips)}]\n" for name, ips in view.exact]
    parts.append(WILDCARDS)
    parts += [f"address=/{domain}/{ip}\n" for domain, ip in view.wildcards]
    parts.append(SERVERS)
    parts += [f"server=/{zone}/{server}\n" for zone, server in view.servers]
    parts.append(NAMESERVERS)
    parts += [f"nameserver {server}\n" for server in view.nameservers]
    return "".join(parts).encode("utf-8")


def render_json(view: DnsConfigView) -> dict:
    """The same data as JSON::

        {"exact":       [{"name": str, "ips": [str]}],
         "wildcards":   [{"domain": str, "ip": str}],
         "servers":     [{"zone": str, "server": "ip:port"}],
         "nameservers": ["ip:port"]}
    """
    view = _sorted(view)
    return {
        "exact": [{"name": name, "ips": list(ips)} for name, ips in view.exact],
        "wildcards": [{"domain": domain, "ip": ip} for domain, ip in view.wildcards],
        "servers": [{"zone": zone, "server": server} for zone, server in view.servers],
        "nameservers": list(view.nameservers),
    }
