"""Authoritative local data: exact names and wildcards.

``build_zone`` makes one whole from the snapshots (the reference, and what
tests compare with); the daemon keeps one up to date name by name
(``set_exact``/``set_wildcard``, driven by networkd.dns.zonefeed).  Each call
changes one name completely, reverse index included, between two queries
(the reactor runs one thing at a time), so a query never sees a name half
changed.  Lookup: an exact name
wins; otherwise the longest wildcard ``*.D`` whose D is the name or one of
its suffixes (``*.lain`` answers ``lain``, ``a.lain`` and ``a.b.lain``).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
from dataclasses import dataclass, field
from typing import Mapping

from networkd.dns import wire
from networkd.dns.names import BadName, split_wildcard
from networkd.dns.ptrindex import PtrIndex


@dataclass(frozen=True, slots=True)
class Record:
    """The addresses of one local name (text for the view, packed for answers).

    Slots: one per local name (40,000 of them at scale), and an instance
    without a ``__dict__`` weighs ~100 bytes less."""

    ips: tuple[str, ...]
    v4: tuple[bytes, ...] = field(init=False)
    v6: tuple[bytes, ...] = field(init=False)

    def __post_init__(self):
        v4, v6 = [], []
        for ip in self.ips:
            _, version, packed = parse_ip(ip)
            (v4 if version == 4 else v6).append(packed)
        object.__setattr__(self, "v4", tuple(v4))
        object.__setattr__(self, "v6", tuple(v6))


class Zone:
    """Exact names and wildcards, answered with packed bytes."""

    def __init__(self, exact: dict[str, Record], wildcards: dict[str, Record], ttl: int, serial: int = 1):
        self.exact = exact
        self.wildcards = wildcards
        self.ttl = ttl
        self.serial = serial & 0xFFFFFFFF
        self._ptr: PtrIndex | None = None  # built on the first reverse query, then kept up to date
        self.generation = 0  # counts set_exact/set_wildcard: what the API's cached dump is checked against

    def ptr_index(self) -> PtrIndex:
        """Reverse names of the exact names' addresses (networkd.dns.reverse)."""
        if self._ptr is None:
            self._ptr = PtrIndex(self.exact)
        return self._ptr

    def set_exact(self, name: str, record: Record | None) -> None:
        """Give ``name`` this record (None: not local any more), reverse index included."""
        old = self.exact.get(name)
        self.generation += 1
        if record is None:
            self.exact.pop(name, None)
        else:
            self.exact[name] = record
        if self._ptr is not None:
            if old is not None:
                self._ptr.remove(name, old)
            if record is not None:
                self._ptr.add(name, record)

    def set_wildcard(self, base: str, record: Record | None) -> None:
        """``*.base`` answers with this record (None: no such wildcard)."""
        self.generation += 1
        if record is None:
            self.wildcards.pop(base, None)
        else:
            self.wildcards[base] = record

    def lookup(self, name: str) -> tuple[str, Record] | None:
        """(apex, record) for a lower-case name, or None if it is not local."""
        record = self.exact.get(name)
        if record is not None:
            return name, record
        if self.wildcards:
            labels = name.split(".")
            for i in range(len(labels)):
                suffix = ".".join(labels[i:])
                record = self.wildcards.get(suffix)
                if record is not None:
                    return suffix, record
        return None

    def answer(self, query: wire.Query, apex: str, record: Record) -> bytes:
        """The authoritative answer (or NODATA + SOA) for a local name."""
        qtype = query.qtype
        if qtype == wire.TYPE_A:
            rrs = [(wire.TYPE_A, ip) for ip in record.v4]
        elif qtype == wire.TYPE_AAAA:
            rrs = [(wire.TYPE_AAAA, ip) for ip in record.v6]
        elif qtype == wire.TYPE_ANY:
            rrs = [(wire.TYPE_A, ip) for ip in record.v4] + [(wire.TYPE_AAAA, ip) for ip in record.v6]
        else:
            rrs = []
        ttl = struct.pack(">I", self.ttl)
        answers = b"".join(
            b"\xc0\x0c" + struct.pack(">HH", rtype, wire.CLASS_IN) + ttl + struct.pack(">H", len(ip)) + ip
            for rtype, ip in rrs
        )
        authority = b"" if rrs else self.soa(apex)
        extra = wire.opt_record(query.do) if query.edns else b""
        header = struct.pack(
            ">HHHHH", wire.response_flags(query.flags, wire.NOERROR, aa=True),
            1, len(rrs), 0 if rrs else 1, 1 if extra else 0,
        )
        return query.id + header + query.question + answers + authority + extra

    def soa(self, apex: str) -> bytes:
        """An SOA for NODATA answers, so resolvers can cache the absence (RFC 2308)."""
        owner = wire.name_to_wire(apex)
        rdata = (
            owner + wire.name_to_wire("hostmaster." + apex)
            + struct.pack(">IIIII", self.serial, 3600, 600, 86400, self.ttl)
        )
        return owner + struct.pack(">HHIH", wire.TYPE_SOA, wire.CLASS_IN, self.ttl, len(rdata)) + rdata


EMPTY_ZONE = Zone({}, {}, 60)


def parse_ip(text: str) -> tuple[str, int, bytes]:
    """(normal text, version, packed bytes) of an IP address; ValueError if it is none.
    A dotted quad already in normal form (nearly every one) is read by the C
    library: ``ipaddress`` costs ~20 us an address, most of a zone's build."""
    try:
        packed = socket.inet_pton(socket.AF_INET, text)
        if socket.inet_ntop(socket.AF_INET, packed) == text:
            return text, 4, packed
    except (OSError, ValueError):
        pass
    address = ipaddress.ip_address(text)
    return str(address), address.version, address.packed


def parse_domain_value(raw: str, node_ip: str | None, webrouter_ips: tuple[str, ...]) -> tuple[str, ...]:
    """The addresses a ``config/domains`` value stands for; ValueError if invalid."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"bad JSON: {e.msg} at position {e.pos}") from None
    if not isinstance(value, dict):
        raise ValueError('value must be an object {"ips": [...], "type": ""}')
    kind = value.get("type") or ""
    if kind == "node":
        if not node_ip:
            raise ValueError("type node but this node has no --node-ip")
        return (node_ip,)
    if kind == "webrouter":
        return tuple(webrouter_ips)
    if kind != "":
        raise ValueError(f"unknown type {kind!r} (want \"\", \"node\" or \"webrouter\")")
    ips = value.get("ips", [])
    if not isinstance(ips, list):
        raise ValueError('"ips" must be a list of IP addresses')
    out = []
    for ip in ips:
        try:
            text = parse_ip(str(ip).strip())[0]
        except ValueError:
            raise ValueError(f"bad IP {ip!r}") from None
        if text not in out:
            out.append(text)
    return tuple(out)


def webrouter_ips(vips: Mapping[str, str], node_ip: str | None) -> tuple[str, ...]:
    """IPs of the VIP configs whose app is ``webrouter`` (parsed leniently)."""
    found = []
    for key, raw in sorted(vips.items()):
        try:
            value = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(value, dict) or value.get("app") != "webrouter":
            continue
        host = key.rsplit(":", 1)[0] if ":" in key else key
        if host == "0.0.0.0":
            host = node_ip
        try:
            ip = str(ipaddress.IPv4Address(host))
        except (ValueError, TypeError):
            continue
        if ip not in found:
            found.append(ip)
    return tuple(found)


def build_zone(
    domains: Mapping[str, str],
    hosts: list[tuple[str, str]],
    *,
    node_ip: str | None,
    webrouters: tuple[str, ...],
    ttl: int,
    serial: int = 1,
    key_prefix: str = "",
) -> tuple[Zone, dict]:
    """(Zone, {etcd key: error}) from the domains snapshot and the hosts file.

    etcd names replace hosts-file names; invalid keys are left out and reported.
    """
    exact: dict[str, list[str]] = {}
    for name, ip in hosts:
        ips = exact.setdefault(name, [])
        if ip not in ips:
            ips.append(ip)
    records = {name: Record(tuple(ips)) for name, ips in exact.items()}
    wildcards: dict[str, Record] = {}
    invalid: dict[str, str] = {}
    for name, raw in sorted(domains.items()):
        key = key_prefix + name
        try:
            base, is_wildcard = split_wildcard(name)
        except BadName as e:
            invalid[key] = f"bad name: {e}"
            continue
        try:
            ips = parse_domain_value(raw, node_ip, webrouters)
        except ValueError as e:
            invalid[key] = str(e)
            continue
        (wildcards if is_wildcard else records)[base] = Record(ips)
    return Zone(records, wildcards, ttl, serial), invalid
