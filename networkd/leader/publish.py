"""What the leader publishes, computed from the sources' snapshots.

Pure functions: (source values) -> ({target key: JSON value}, {source key:
error}).  A malformed source value is reported and skipped, never fatal
(the Go daemon crashed on an ``IP:PORT`` without a colon, [BUG 45]).

* ``deployd.lain`` / ``swarm.lain``: from deployd's and swarm's leader keys
  (``IP:PORT``), ``<root>/config/domains/<name>`` = ``{"ips": [IP], "type": ""}``.
* tinydns zones: the nodes serving tinydns register
  ``<root>/networkd/apps/tinydns/worker/<IP>:<PORT>``; the zone ``lain``
  (and ``--domain``) is forwarded to all of them:
  ``<root>/config/domain_servers/<zone>`` = ``{"servers": ["IP#PORT", ...]}``.
  With no worker registered nothing is written: the last list stays,
  rather than sending the cluster's own names to the outside resolvers.
* tinydns records (``--webrouter``), from the whole cluster's VIP configs and
  app keys, so every node no longer writes its own view ([BUG 27]): for each
  app, ``<root>/config/tinydns_fqdns/<app>.lain`` = ``["+<app>.lain:IP:300",
  ...]``; for the webrouter's IPs, ``<root>/config/tinydns_fqdns/<zone>`` =
  ``["+*.<zone>:IP:300", ".<zone>:IP:a:300", ...]``.  An app's IPs: its
  floating VIPs, the IP of its ``IP:PORT`` keys, and for ``0.0.0.0:PORT``
  the nodes that serve it (their app keys).  An app with no IP left keeps
  its last records.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Mapping

from networkd.vips.model import parse_vips

RECORD_TTL = 300
WEBROUTER = "webrouter"


def address_of(raw: str) -> str:
    """The IP of an ``IP:PORT`` value (``[v6]:PORT`` too); ValueError if malformed."""
    text = raw.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{raw!r} is not IP:PORT")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"{host!r} in {raw!r} is not an IP address") from None


def domain_value(ip: str) -> str:
    return json.dumps({"ips": [ip], "type": ""})


def leader_domain(source_key: str, raw: str | None, target_key: str, wanted: dict, invalid: dict) -> None:
    """``target_key`` names the IP found in ``raw`` (a leader key's value), if any."""
    if raw is None:
        return
    try:
        wanted[target_key] = domain_value(address_of(raw))
    except ValueError as e:
        invalid[source_key] = str(e)


def tinydns_zones(workers_prefix: str, workers: Mapping[str, str], zone_keys: list, wanted: dict,
                  invalid: dict) -> None:
    """Every ``zone_keys`` entry forwards to the registered tinydns workers."""
    servers = []
    for name in sorted(workers):
        try:
            ip = address_of(name)
        except ValueError as e:
            invalid[workers_prefix + name] = str(e)
            continue
        entry = f"{ip}#{name.rsplit(':', 1)[1]}"
        if entry not in servers:
            servers.append(entry)
    if servers:
        for key in zone_keys:
            wanted[key] = json.dumps({"servers": servers})


def same_json(current: str | None, wanted: str) -> bool:
    """Is the value in etcd already what we want (ignoring formatting)?"""
    if current is None:
        return False
    try:
        return json.loads(current) == json.loads(wanted)
    except ValueError:
        return False


def app_ips(vips: Mapping[str, str], app_keys: Mapping[str, str]) -> dict:
    """{app: sorted IPs} from VIP configs and app keys (``<app>/<proc>/<ip>:<port>``)."""
    served: dict = {}
    for name in app_keys:
        app, _, rest = name.partition("/")
        proc, _, endpoint = rest.partition("/")
        ip, _, port = endpoint.rpartition(":")
        if app and proc and port.isdigit():
            served.setdefault((app, proc, int(port)), set()).add(ip)
    configs, _errors = parse_vips(vips)  # the VIP part reports bad keys
    found: dict = {}
    for config in configs.values():
        ips = found.setdefault(config.app, set())
        if config.node_local:
            ips.update(served.get((config.app, config.proc, config.port), ()))
        else:
            ips.add(config.ip)
    return {app: sorted(ips, key=ipaddress.ip_address) for app, ips in found.items() if ips}


def tinydns_records(fqdns_prefix: str, vips: Mapping[str, str], app_keys: Mapping[str, str], zones: list,
                    wanted: dict) -> None:
    for app, ips in app_ips(vips, app_keys).items():
        name = f"{app}.lain"
        wanted[fqdns_prefix + name] = json.dumps([f"+{name}:{ip}:{RECORD_TTL}" for ip in ips])
        if app == WEBROUTER:
            for zone in zones:
                wanted[fqdns_prefix + zone] = json.dumps(
                    [line for ip in ips for line in (f"+*.{zone}:{ip}:{RECORD_TTL}", f".{zone}:{ip}:a:{RECORD_TTL}")])
