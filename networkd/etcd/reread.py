"""A prefix read again whole, without one long reactor turn at the end (issue 13).

At 40,000 keys, building the dict from the pages, comparing it with the
values held and dropping the one that is not kept took one 8-10 ms turn.
``ReRead`` builds and compares key by key as the pages come (each page is
its own turn); ``Discard`` frees a big dict a slice per turn, once nothing
else holds it.
"""

from __future__ import annotations

import sys
from typing import Callable, Mapping

DISCARD_PIECE = 2000  # keys freed per reactor turn
DISCARD_WAIT = 0.1  # seconds between looks while someone else still holds a dict
DISCARD_LOOKS = 50  # then it is let go (freed by whoever drops it last, as any object)


class ReRead:
    """The keys of a paged read (``add`` is an EtcdClient.get_prefix sink) and whether they differ from ``old``."""

    def __init__(self, old: Mapping[str, str], pair: Callable[[bytes, bytes], tuple[str, str]]):
        self._old = old
        self._pair = pair
        self.values: dict[str, str] = {}
        self._differs = False

    def add(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:  # an attempt starts (again)
            self.values, self._differs = {}, False
            return
        key, value = self._pair(key, value)
        old = self._old.get(key)
        if old == value:
            value = old  # the held string: the new one is freed now, a page at a time
        else:
            self._differs = True
        self.values[key] = value

    def changed(self) -> bool:
        """Every key read is held with the same value and there are as many: the same content."""
        return self._differs or len(self.values) != len(self._old)


class Discard:
    """Big dicts freed ``DISCARD_PIECE`` keys per reactor turn instead of all at once."""

    def __init__(self, reactor):
        self._reactor = reactor
        self._pile: list[list] = []  # [dict, looks]
        self._call = None

    def later(self, table: dict) -> None:
        """Free ``table`` in slices once this is the last reference to it (the caller drops its own)."""
        self._pile.append([table, 0])
        self._schedule(0)

    def pending(self) -> int:
        return len(self._pile)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self, delay: float) -> None:
        if self._call is None or not self._call.active():
            self._call = self._reactor.callLater(delay, self._turn)

    def _turn(self) -> None:
        self._call = None
        entry = self._pile[0]
        table = entry[0]
        # References: the pile's entry, ``table`` here, getrefcount's argument.
        if sys.getrefcount(table) > 3:
            entry[1] += 1
            if entry[1] >= DISCARD_LOOKS:
                self._pile.pop(0)
            if self._pile:
                self._schedule(DISCARD_WAIT if self._pile[0] is entry else 0)
            return
        pop = table.popitem
        for _ in range(min(DISCARD_PIECE, len(table))):
            pop()
        if not table:
            self._pile.pop(0)
        del table, entry
        if self._pile:
            self._schedule(0)
