"""Reading an AddressMonitor record after a fault: unheld periods and moves per VIP.

Shared by the fault tests and bench/faults.py, so both count the same way:
a VIP is *unheld* while no node has it (the gap between one holding's end and
the next one's start), a *move* is a holding that begins inside the window.
"""

from __future__ import annotations

Interval = tuple[str, str, float, float]  # node, ip, start, end (AddressMonitor.intervals())


def unheld_periods(intervals: list[Interval], ip: str, start: float, end: float) -> list[tuple[float, float]]:
    """(from, to) of every period within [start, end] in which no node had ``ip``."""
    spans = sorted((s, e) for _, i, s, e in intervals if i == ip and e > start and s < end)
    gaps, covered = [], start
    for s, e in spans:
        if s > covered:
            gaps.append((covered, s))
        covered = max(covered, e)
    if covered < end:
        gaps.append((covered, end))
    return gaps


def longest_unheld(intervals: list[Interval], ips, start: float, end: float) -> dict[str, float]:
    """ip -> its longest unheld period within [start, end] in seconds (0.0: held throughout)."""
    return {ip: max((b - a for a, b in unheld_periods(intervals, ip, start, end)), default=0.0) for ip in ips}


def moves(intervals: list[Interval], start: float, end: float) -> list[Interval]:
    """Holdings that began within (start, end]: each is a VIP arriving on a node."""
    return [i for i in intervals if start < i[2] <= end]


def counts(holders: dict[str, frozenset[str]], nodes) -> dict[str, int]:
    """node -> how many VIPs it has, from AddressMonitor.holders_now()."""
    out = {n: 0 for n in nodes}
    for who in holders.values():
        for n in who:
            out[n] = out.get(n, 0) + 1
    return out
