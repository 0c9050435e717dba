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
"""

from __future__ import annotations

import ipaddress
import json
from typing import Mapping


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
