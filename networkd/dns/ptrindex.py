"""The reverse names of a zone's addresses, kept up to date name by name.

``ptr`` maps the reverse name of an address (``4.3.2.10.in-addr.arpa``) to
the exact names that have it, in name order; ``above`` counts, for each
reverse name above such an address (``3.2.10.in-addr.arpa``), the addresses
under it (it exists, empty: NODATA, not NXDOMAIN).  A put changes one name,
so the index follows it with a few dict and bisect steps instead of being
built again from the whole zone (networkd.dns.zone, networkd.dns.reverse).
"""

from __future__ import annotations

import bisect
import ipaddress


def _pointer(ip: str) -> str:
    """The reverse name of an address in normal form (a Record's)."""
    if ":" not in ip:
        return ".".join(reversed(ip.split("."))) + ".in-addr.arpa"
    return ipaddress.ip_address(ip).reverse_pointer


class PtrIndex:
    def __init__(self, exact=None):
        self.ptr: dict[str, list[str]] = {}
        self.above: dict[str, int] = {}
        for name, record in sorted((exact or {}).items()):
            self.add(name, record)

    def add(self, name: str, record) -> None:
        for ip in record.ips:
            rname = _pointer(ip)
            names = self.ptr.get(rname)
            if names is None:
                self.ptr[rname] = [name]
                self._count(rname, 1)
            else:
                i = bisect.bisect_left(names, name)
                if i == len(names) or names[i] != name:
                    names.insert(i, name)

    def remove(self, name: str, record) -> None:
        for ip in record.ips:
            rname = _pointer(ip)
            names = self.ptr.get(rname)
            if names is None:
                continue
            i = bisect.bisect_left(names, name)
            if i < len(names) and names[i] == name:
                del names[i]
            if not names:
                del self.ptr[rname]
                self._count(rname, -1)

    def _count(self, rname: str, step: int) -> None:
        labels = rname.split(".")
        for i in range(1, len(labels) - 2):
            above = ".".join(labels[i:])
            left = self.above.get(above, 0) + step
            if left:
                self.above[above] = left
            else:
                del self.above[above]
