"""Parsed, validated VIP configs and deployd pod groups.

Parsing is strict and per key: a bad key becomes one ``InvalidValue`` whose
text names the etcd key, and never stops the other keys from applying
([BUG 5], [BUG 8]).  Ports are keyed by (proto, src) ([BUG 9]).
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Mapping

PROTOCOLS = ("tcp", "udp")


class InvalidValue(ValueError):
    """An etcd value (or key) that cannot be used; the message names the key."""


@dataclass(frozen=True, order=True, slots=True)
class PortMap:
    """``ip:src/proto`` is forwarded to ``container:dest``."""

    proto: str
    src: int
    dest: int


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """A VIP config's ``"health"`` object: how this node probes its local container.

    ``tcp``: a connect to ``port``; ``http``: ``GET path`` on ``port`` answered with
    status ``expect``; ``none``: no probe (deployd's pod state alone).
    """

    type: str
    port: int | None = None
    path: str = "/"
    expect: int = 200


HEALTH_FIELDS = {"tcp": {"type", "port"}, "http": {"type", "port", "path", "expect"}, "none": {"type"}}


def parse_health(data) -> HealthCheck:
    if not isinstance(data, dict):
        raise InvalidValue(f"health must be an object, not {type(data).__name__}")
    kind = data.get("type")
    if kind not in HEALTH_FIELDS:
        raise InvalidValue(f"health.type {kind!r} is not tcp, http or none")
    unknown = sorted(set(data) - HEALTH_FIELDS[kind])
    if unknown:
        raise InvalidValue(f"health: {', '.join(map(repr, unknown))} is not a field of a {kind} check")
    if kind == "none":
        return HealthCheck("none")
    if "port" not in data:
        raise InvalidValue(f"health.port is missing (a {kind} check needs one)")
    port = _port(data["port"], "health.port")
    if kind == "tcp":
        return HealthCheck("tcp", port)
    path = data.get("path", "/")
    if not isinstance(path, str) or not path.startswith("/") or any(ch in path for ch in " \r\n"):
        raise InvalidValue(f"health.path {path!r} is not an absolute path without spaces")
    expect = data.get("expect", 200)
    if isinstance(expect, bool) or not isinstance(expect, int) or not 100 <= expect <= 599:
        raise InvalidValue(f"health.expect {expect!r} is not an HTTP status code")
    return HealthCheck("http", port, path, expect)


@dataclass(frozen=True, slots=True)
class VipConfig:
    """One ``<root>/config/vips/<KEY>`` value.

    ``port`` is None for a floating VIP (lock + address + ARP + DNAT); with a
    port the key is port-scoped: DNAT only, on every node running the app.
    ``ip`` is ``0.0.0.0`` for node-local keys (the node IP is used).
    """

    key: str
    ip: str
    port: int | None
    app: str
    proc: str
    ports: tuple[PortMap, ...]
    excluded_nodes: frozenset[str] = frozenset()
    health: HealthCheck | None = None  # None: a TCP connect to each TCP port's dest

    @property
    def floating(self) -> bool:
        return self.port is None

    @property
    def node_local(self) -> bool:
        return self.ip == "0.0.0.0"

    def excludes(self, hostname: str) -> bool:
        return hostname in self.excluded_nodes


@dataclass(frozen=True, order=True, slots=True)
class Container:
    """A container deployd placed on some node (from a pod group)."""

    app: str
    proc: str  # the last dot-separated part of the pod group's Spec.Name
    instance: int
    node_name: str
    node_ip: str
    container_ip: str
    container_port: int | None = None
    # deployd's runtime state of the pod (None: an older writer did not say)
    state: int | None = field(default=None, compare=False)
    health: int | None = field(default=None, compare=False)

    @property
    def candidate(self) -> bool:
        """deployd says the pod runs (State 2) and is not starting or unhealthy (Healthst 0 or 2)."""
        return self.state in CANDIDATE_STATES and self.health in CANDIDATE_HEALTH


# deployd engine/runtimes.go: RunState 0 pending, 1 drift, 2 success (running), 3 exit, 4 fail;
# HealthState 0 none, 1 starting, 2 healthy, 3 unhealthy.  Absent (older writers) counts as running.
CANDIDATE_STATES = (None, 2)
CANDIDATE_HEALTH = (None, 0, 2)


def _optional_int(pod: dict, name: str, what: str) -> int | None:
    value = pod.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValue(f"{what}.{name} {value!r} is not an integer")
    return value


def _port(value, what: str) -> int:
    if isinstance(value, bool):
        raise InvalidValue(f"{what} {value!r} is not a port number")
    if isinstance(value, str):
        value = value.strip()
        if not value.isdigit():
            raise InvalidValue(f"{what} {value!r} is not a port number")
        value = int(value)
    if not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidValue(f"{what} {value!r} is not a port in 1-65535")
    return value


def _ipv4(text: str, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise InvalidValue(f"{what} {text!r} is not an IPv4 address") from None


def _name(value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidValue(f"{what} must be a non-empty string, not {value!r}")
    return value.strip()


def parse_vip_key(key: str) -> tuple[str, int | None]:
    """``A.B.C.D`` -> (ip, None); ``A.B.C.D:PORT`` / ``0.0.0.0:PORT`` -> (ip, port)."""
    host, sep, port_text = key.partition(":")
    if ":" in port_text or "/" in key:
        raise InvalidValue(f"key {key!r} is not IP or IP:PORT")
    ip = _ipv4(host, "key IP")
    if not sep:
        address = ipaddress.IPv4Address(ip)
        if address.is_unspecified or address.is_loopback or address.is_multicast or ip == "255.255.255.255":
            raise InvalidValue(f"key {key!r}: {ip} cannot be a floating VIP")
        return ip, None
    return ip, _port(port_text, "key port")


def parse_vip(key: str, raw: str) -> VipConfig:
    """Parse one VIP value; ``key`` is relative to the vips prefix."""
    ip, key_port = parse_vip_key(key)
    try:
        data = json.loads(raw)
    except (TypeError, ValueError) as e:
        raise InvalidValue(f"value is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidValue(f"value must be a JSON object, not {type(data).__name__}")
    app = _name(data.get("app"), "app")
    proc = _name(data.get("proc"), "proc")
    entries = data.get("ports")
    if not isinstance(entries, list) or not entries:
        raise InvalidValue("ports must be a non-empty list")
    ports: dict[tuple[str, int], PortMap] = {}
    for n, entry in enumerate(entries):
        what = f"ports[{n}]"
        if not isinstance(entry, dict):
            raise InvalidValue(f"{what} must be an object")
        proto = entry.get("proto") or "tcp"
        if not isinstance(proto, str) or proto.lower() not in PROTOCOLS:
            raise InvalidValue(f"{what}.proto {proto!r} is not tcp or udp")
        proto = proto.lower()
        src_raw = entry.get("src")
        if src_raw in (None, "") and key_port is not None:
            src = key_port
        else:
            src = _port(src_raw, f"{what}.src")
        dest_raw = entry.get("dest")
        dest = src if dest_raw in (None, "") else _port(dest_raw, f"{what}.dest")
        if (proto, src) in ports:
            raise InvalidValue(f"{what}: {proto}/{src} is listed twice")
        ports[(proto, src)] = PortMap(proto, src, dest)
    excluded = data.get("excluded_nodes") or []
    if not isinstance(excluded, list) or not all(isinstance(x, str) for x in excluded):
        raise InvalidValue("excluded_nodes must be a list of node names")
    health = None if data.get("health") is None else parse_health(data["health"])
    return VipConfig(key, ip, key_port, app, proc, tuple(sorted(ports.values())), frozenset(excluded), health)


def parse_vips(values: Mapping[str, str], prefix: str = "") -> tuple[dict[str, VipConfig], dict[str, str]]:
    """(configs by relative key, errors by full etcd key) for a whole snapshot."""
    configs: dict[str, VipConfig] = {}
    errors: dict[str, str] = {}
    for key, raw in values.items():
        try:
            configs[key] = parse_vip(key, raw)
        except InvalidValue as e:
            errors[prefix + key] = f"{prefix}{key}: {e}"
    return configs, errors


def parse_pod_group(key: str, raw: str) -> list[Container]:
    """The containers of one deployd pod group ``<app>/<podgroup>`` value."""
    try:
        data = json.loads(raw)
    except (TypeError, ValueError) as e:
        raise InvalidValue(f"value is not JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("Spec"), dict):
        raise InvalidValue("value has no Spec object")
    spec = data["Spec"]
    app = _name(spec.get("Namespace"), "Spec.Namespace")
    name = _name(spec.get("Name"), "Spec.Name")
    proc = name.rsplit(".", 1)[-1]
    pods = data.get("Pods") or []
    if not isinstance(pods, list):
        raise InvalidValue("Pods must be a list")
    containers = []
    for n, pod in enumerate(pods):
        if not isinstance(pod, dict):
            raise InvalidValue(f"Pods[{n}] must be an object")
        instance = pod.get("InstanceNo")
        if isinstance(instance, bool) or not isinstance(instance, int):
            raise InvalidValue(f"Pods[{n}].InstanceNo {instance!r} is not a number")
        state = _optional_int(pod, "State", f"Pods[{n}]")
        health = _optional_int(pod, "Healthst", f"Pods[{n}]")
        for m, c in enumerate(pod.get("Containers") or []):
            what = f"Pods[{n}].Containers[{m}]"
            if not isinstance(c, dict):
                raise InvalidValue(f"{what} must be an object")
            node_name = c.get("NodeName") or ""
            container_ip = c.get("ContainerIp") or ""
            if not node_name or not container_ip:
                continue  # not placed (yet): no node, or no address
            port = c.get("ContainerPort")
            containers.append(Container(
                app=app, proc=proc, instance=instance, node_name=str(node_name),
                node_ip=str(c.get("NodeIp") or ""),
                container_ip=_ipv4(str(container_ip), f"{what}.ContainerIp"),
                container_port=port if isinstance(port, int) and not isinstance(port, bool) else None,
                state=state, health=health,
            ))
    return containers
