"""Upstream servers and forwarding zones (domain_servers).

The upstream list itself comes from the resolv.conf guardian
(``networkd.resolvconf.parse_nameservers``).
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

from networkd.dns.names import BadName, check_name

Server = tuple[str, int]


def without_self(servers: list[Server], listen_host: str, listen_port: int) -> list[Server]:
    """Drop our own listen address (no forwarding loops); keep the order."""
    ours = {(listen_host, listen_port)}
    if listen_host in ("0.0.0.0", "::"):
        ours |= {("127.0.0.1", listen_port), ("::1", listen_port), (listen_host, listen_port)}
    out = []
    for server in servers:
        if server not in ours and server not in out:
            out.append(server)
    return out


def format_server(server: Server) -> str:
    ip, port = server
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def parse_server_entry(text: str) -> Server:
    """``IP#PORT`` (or a bare ``IP``, port 53) -> (ip, port)."""
    ip_text, sep, port_text = str(text).partition("#")
    ip = str(ipaddress.ip_address(ip_text.strip()))
    port = 53
    if sep:
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} out of range")
    return ip, port


@dataclass(frozen=True)
class ForwardZones:
    """Zone -> its servers; names at or under a zone go only there."""

    zones: dict  # zone (lower case) -> tuple[Server, ...]

    def servers_for(self, name: str) -> tuple[Server, ...] | None:
        """The servers of the longest zone containing ``name``, or None."""
        if not self.zones:
            return None
        labels = name.split(".")
        for i in range(len(labels)):
            servers = self.zones.get(".".join(labels[i:]))
            if servers is not None:
                return servers
        return None


def parse_forward_zones(values, key_prefix: str = "") -> tuple[ForwardZones, dict]:
    """From the domain_servers snapshot: (ForwardZones, {etcd key: error})."""
    zones: dict = {}
    invalid: dict = {}
    for name, raw in sorted(values.items()):
        key = key_prefix + name
        try:
            zone = check_name(name)
            value = json.loads(raw)
            if not isinstance(value, dict) or not isinstance(value.get("servers"), list):
                raise ValueError('value must be {"servers": ["IP#PORT", ...]}')
            servers = []
            for entry in value["servers"]:
                try:
                    server = parse_server_entry(entry)
                except ValueError:
                    raise ValueError(f"bad server {entry!r} (want IP#PORT)") from None
                if server not in servers:
                    servers.append(server)
            if not servers:
                raise ValueError("no servers")
        except (ValueError, BadName) as e:
            invalid[key] = _reason(e)
            continue
        zones[zone] = tuple(servers)
    return ForwardZones(zones), invalid


def _reason(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"bad JSON: {e.msg} at position {e.pos}"
    return str(e)
