"""Which free VIPs of one app/proc a least loaded node contests at once: its share, not all of them.

When the VIPs of an app are written while every node running it holds none,
every node is least loaded for every VIP, and each used to contest all of them
at once: with 20 nodes and 200 VIPs, 4,000 lock transactions in a second for
200 locks, the keep-alives of busy daemons timed out behind them, leases
expired and the contest started over (bench/cluster.py: 20 s until every VIP
was held, 34 s until balanced).  Now the free VIPs (sorted) and the nodes tied
for least loaded (sorted, rotated by a hash of the app/proc so that the spare
ones of different apps land on different nodes) are dealt out like cards: a
node contests at once only the VIPs dealt to it, one dealt to another node
only if nobody took it within a lock TTL (networkd.vips.locks.DEALT_GRACE_TTLS:
that node is live; if it dies its members key goes within a TTL).  One
free VIP (a holder died) is dealt to every tied node: they race, as before.
Only who asks first changes; the lock decides, as ever.
"""

from __future__ import annotations

import zlib
from typing import Iterable


def dealt(proc: tuple[str, str], free: list[tuple[str, Iterable[str]]], me: str) -> tuple[set[str], set[str]]:
    """(contest now, contest later) of ``free``: (ip, the nodes tied for least loaded, us included) per VIP.

    The free VIPs and the tied nodes are each ordered the same way on every
    node, so nodes that see the same snapshot deal the same hands: with k
    VIPs and t tied nodes, m = min(k, t), VIP j goes to the nodes at positions
    i with i = j (mod m), i.e. each VIP to about t/k nodes, each node about k/t VIPs.
    """
    now, later = set(), set()
    ordered = sorted(ip for ip, _ in free)
    position = {ip: j for j, ip in enumerate(ordered)}
    offset = zlib.crc32("/".join(proc).encode())
    for ip, tied in free:
        nodes = sorted(set(tied) | {me})
        m = min(len(ordered), len(nodes))
        i = (nodes.index(me) + offset) % len(nodes)
        (now if i % m == position[ip] % m else later).add(ip)
    return now, later
