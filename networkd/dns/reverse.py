"""Reverse lookups answered here: PTR for the addresses of local names, and
the locally served reverse zones of RFC 6303 (and RFC 7793).

``dig -x`` of an address some local name has (exact names, from etcd or the
hosts file; a wildcard names no host) gets a PTR for every such name, in
name order.  A name in a locally served zone (10/8, 172.16/12, 192.168/16,
127/8, ::1, fd00::/8 ...: private and special addresses, whose reverse names
mean nothing outside the site) with no local address at or under it gets an
authoritative NXDOMAIN instead of going upstream, where it would only leak
the site's addresses.  ``--dns-forward-reverse CIDR`` (and a domain_servers
zone) hands a part of them back to forwarding.
"""

from __future__ import annotations

import ipaddress
import struct

from networkd.dns import wire

TYPE_PTR = 12

LOCALLY_SERVED = tuple(ipaddress.ip_network(net) for net in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.2.0/24", "192.168.0.0/16", "198.51.100.0/24", "203.0.113.0/24", "255.255.255.255/32",
    "::/128", "::1/128", "fd00::/8", "fe80::/10", "2001:db8::/32",
))
SUFFIXES = {"in-addr.arpa": (4, 8), "ip6.arpa": (6, 4)}  # suffix -> (IP version, bits a label)


def reverse_name(net) -> str:
    """The reverse name of a network on a label boundary (``10.in-addr.arpa``)."""
    if net.version == 4:
        labels = [str(b) for b in net.network_address.packed[:net.prefixlen // 8]]
        return ".".join([*reversed(labels), "in-addr", "arpa"])
    return ".".join([*reversed(net.network_address.packed.hex()[:net.prefixlen // 4]), "ip6", "arpa"])


def on_label_boundaries(net):
    """``net`` as the reverse zones that cover it (172.16/12: sixteen /16s)."""
    bits = 8 if net.version == 4 else 4
    prefix = -(-net.prefixlen // bits) * bits
    return net.subnets(new_prefix=prefix) if prefix != net.prefixlen else (net,)


def parse_reverse(name: str):
    """The network a reverse name stands for, as far as its labels from the
    right are an address prefix (``foo.1.10.in-addr.arpa``: 10.1/16), with
    whether all of them were; (None, False) outside the reverse trees."""
    for suffix, (version, bits) in SUFFIXES.items():
        if name == suffix or name.endswith("." + suffix):
            labels = name[:-len(suffix)].rstrip(".").split(".") if name != suffix else []
            break
    else:
        return None, False
    value, taken = 0, 0
    for label in reversed(labels):
        if taken * bits >= (32 if version == 4 else 128) or not _is_part(label, version):
            break
        value = value << bits | int(label, 10 if version == 4 else 16)
        taken += 1
    total = 32 if version == 4 else 128
    network = ipaddress.ip_network((value << (total - taken * bits), taken * bits))
    return network, taken == len(labels)


def _is_part(label: str, version: int) -> bool:
    if version == 4:
        return label.isdigit() and len(label) <= 3 and int(label) <= 255 and str(int(label)) == label
    return len(label) == 1 and label in "0123456789abcdef"


class ReverseZones:
    """The reverse names answered locally, for the zone in force."""

    def __init__(self, forward=()):
        self.forward = tuple(forward)  # --dns-forward-reverse networks
        self.zones = {reverse_name(sub): sub for net in LOCALLY_SERVED for sub in on_label_boundaries(net)}

    def served_zone(self, name: str) -> str | None:
        labels = name.split(".")
        for i in range(len(labels) - 1):
            apex = ".".join(labels[i:])
            if apex in self.zones:
                return apex
        return None

    def answer(self, zone, query: wire.Query, name: str, forwarded: bool) -> tuple[int, bytes] | None:
        """(rcode, response), or None if the name is not answered here.
        ``forwarded``: a domain_servers zone claims the name."""
        index = zone.ptr_index()  # kept up to date by the zone, name by name
        names = index.ptr.get(name)
        if names is not None:
            if query.qtype in (TYPE_PTR, wire.TYPE_ANY):
                ttl = struct.pack(">I", zone.ttl)
                rrs = b"".join(b"\xc0\x0c" + struct.pack(">HH", TYPE_PTR, wire.CLASS_IN) + ttl
                               + struct.pack(">H", len(w)) + w for w in map(wire.name_to_wire, names))
                return wire.NOERROR, _response(query, wire.NOERROR, rrs, len(names), b"")
            return wire.NOERROR, _response(query, wire.NOERROR, b"", 0, zone.soa(self.served_zone(name) or name))
        apex = self.served_zone(name)
        if apex is None or forwarded:
            return None
        network, _ = parse_reverse(name)
        if any(network.version == net.version and network.subnet_of(net) for net in self.forward):
            return None
        soa = zone.soa(apex)
        if name == apex and query.qtype == wire.TYPE_SOA:
            return wire.NOERROR, _response(query, wire.NOERROR, soa, 1, b"")
        if name == apex or name in index.above:
            return wire.NOERROR, _response(query, wire.NOERROR, b"", 0, soa)
        return wire.NXDOMAIN, _response(query, wire.NXDOMAIN, b"", 0, soa)


def _response(query: wire.Query, rcode: int, answers: bytes, count: int, authority: bytes) -> bytes:
    extra = wire.opt_record(query.do) if query.edns else b""
    header = struct.pack(">HHHHH", wire.response_flags(query.flags, rcode, aa=True),
                         1, count, 1 if authority else 0, 1 if extra else 0)
    return query.id + header + query.question + answers + authority + extra
