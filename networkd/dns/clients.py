"""Who may query: loopback, plus the --dns-allow networks.

``ClientFilter.decide`` is the one decision, for every path, and
``ClientFilter.verdicts`` remembers it per address: the resolver (UDP slow
path and TCP) looks up the host text of a peer, the UDP listener the same
text (recvfrom) or the packed address straight from a recvmmsg sockaddr.
An address seen for the first time is decided then (``dict.__missing__``),
so the hot path pays one dict subscript and no Python call.
"""

from __future__ import annotations

import ipaddress

MEMO_LIMIT = 10_000  # remembered addresses before the memo starts over


class Verdicts(dict):
    """address -> admitted?  ``address`` is host text (``"10.0.0.1"``,
    ``"::ffff:127.0.0.1"``, ``"fe80::1%eth0"``) or packed (4 or 16 bytes)."""

    def __init__(self, decide):
        super().__init__()
        self._decide = decide

    def __missing__(self, address: str | bytes) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0] if isinstance(address, str) else address)
        except ValueError:
            verdict = False
        else:
            verdict = self._decide(ip)
        if len(self) > MEMO_LIMIT:
            self.clear()
        self[address] = verdict
        return verdict


class ClientFilter:
    def __init__(self, allow=()):
        self.allow = tuple(allow)
        self.verdicts = Verdicts(self.decide)

    def admits(self, address: str | bytes) -> bool:
        return self.verdicts[address]

    def decide(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if ip.is_loopback:
            return True
        return any(ip.version == net.version and ip in net for net in self.allow)
