"""The hot answers: pre-packed responses the UDP listener sends as they are.

A query whose bytes after the ID (when it has no EDNS options) or whose key
(flags + raw question + EDNS summary, which ignores a cookie;
``wire.question_key``) is here gets the stored bytes after its own ID: no
parsing, no logging, no objects.  The slow path (``networkd.dns.resolver``)
fills the two tables: ``local`` is emptied with each zone change, ``cached``
when the cache is flushed.

The cached table holds at most ``cached_limit`` keys (the cache's size; the
oldest goes first), each for an entry the cache still holds: an entry the
cache lets go takes its hot answers with it (``forget``).

A cached answer carries the time its TTLs next change (its age ticks over);
``lookup`` patches them on the first hit after that (a few bytes, no
parsing), so cached TTLs keep counting down without sending every cached
name through the slow path once a second.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass

from networkd.dns import wire
from networkd.dns.cache import Entry

HOT_LIMIT = 50_000  # local answers before the table is emptied
LOCAL = (wire.RCODE_NAMES[wire.NOERROR], "local")
_TTL = struct.Struct(">I")


@dataclass(slots=True)
class HotEntry:
    """One hot answer, never changed once made (re-ageing makes a new one).

    Slots: reading a field costs what indexing a tuple does (a NamedTuple's
    ``hit[0]`` is slower), which the UDP loops notice.  Not frozen: a frozen
    dataclass takes four times as long to build, once per cached name and
    second."""

    body: bytes  # the response after its 2-byte ID
    counter: tuple  # its key in DnsStats.queries: (rcode name, source)
    good_until: float  # when its TTLs next change; 0: never (local answers)
    entry: Entry | None  # the cache entry it was rendered from; None for local answers


class HotAnswers:
    def __init__(self, limit: int = HOT_LIMIT, cached_limit: int = HOT_LIMIT):
        self.limit = limit
        self.cached_limit = cached_limit
        self.local: dict = {}
        self.cached: OrderedDict = OrderedDict()  # oldest first, popped in O(1)
        self._names: dict[str, bytes | set] = {}  # lower-case name -> its key(s) in cached (drop_names; _index)
        self.touch = lambda entry: None  # tells the cache an entry is in use (its LRU order)

    def lookup(self, key: bytes, now: float) -> HotEntry | None:
        """The answer for ``key`` (the bytes after the ID, or a question key),
        its TTLs aged to ``now``; None if there is none (or it is about to
        expire, and then it is dropped)."""
        hit = self.local.get(key) or self.cached.get(key)
        if hit is not None and hit.good_until and now >= hit.good_until:
            return self._reage(key, hit, now)
        return hit

    def _reage(self, key: bytes, hit: HotEntry, now: float) -> HotEntry | None:
        entry = hit.entry
        if entry.expires_at - now <= 2:
            if self.cached.pop(key, None) is not None:
                self._unindex(key)
            return None
        body = bytearray(hit.body)
        age = int(now - entry.stored_at)
        for offset, ttl in entry.answer.ttls():
            _TTL.pack_into(body, offset - 2, max(0, ttl - age))
        hit = HotEntry(bytes(body), hit.counter, entry.stored_at + age + 1, entry)
        self.cached[key] = hit
        self.touch(entry)  # hits that never reach the cache still keep it from being evicted first
        return hit

    def remember_local(self, data: bytes, response: bytes, rcode: int = wire.NOERROR) -> None:
        """Keep an authoritative answer until the zone changes."""
        counter = LOCAL if rcode == wire.NOERROR else (wire.RCODE_NAMES[rcode], "local")
        self._remember(self.local, data, HotEntry(response[2:], counter, 0, None))

    def remember_cached(self, data: bytes, response: bytes, entry: Entry, now: float) -> None:
        """Keep an answer rendered from ``entry`` at ``now``, good until its
        age, and so its TTLs, next change; not if it expires within 2 s."""
        if entry.expires_at - now > 2:
            counter = (wire.RCODE_NAMES.get(entry.rcode, "?"), "cache")
            good_until = entry.stored_at + int(now - entry.stored_at) + 1
            self._remember(self.cached, data, HotEntry(response[2:], counter, good_until, entry))

    def _remember(self, table: dict, data: bytes, hit: HotEntry) -> None:
        """Small answers to plain questions only."""
        if len(hit.body) + 2 > wire.PLAIN_UDP_SIZE:
            return
        key = wire.question_key(data)
        if key is None or not wire.name_ends_at_first_zero(data):
            return
        keys = (key, data[2:]) if wire.has_fixed_bytes(data) and data[2:] != key else (key,)
        if table is self.local:
            if len(table) >= self.limit:
                table.clear()
        else:
            if self.cached_limit < len(keys):
                return
            while len(table) > self.cached_limit - len(keys):
                self._unindex(table.popitem(last=False)[0])  # the oldest
            entry = hit.entry
            entry.hot_keys += tuple(k for k in keys if k not in entry.hot_keys)
            self._index(_name(key), keys)
        for k in keys:
            table[k] = hit

    def forget(self, entry: Entry) -> None:
        """``entry`` left the cache: its hot answers go too."""
        for key in entry.hot_keys:
            hit = self.cached.get(key)
            if hit is not None and hit.entry is entry:
                del self.cached[key]
                self._unindex(key)

    def clear_local(self) -> None:
        self.local.clear()

    def clear_cached(self) -> None:
        self.cached.clear()
        self._names.clear()

    def _index(self, name: str, keys: tuple) -> None:
        """``name`` -> its keys in ``cached``: one key (nearly always) as itself, several as a set,
        which weighs ~200 bytes more, once per cached name."""
        held = self._names.get(name)
        if held is None and len(keys) == 1:
            self._names[name] = keys[0]
        elif held is None:
            self._names[name] = set(keys)
        elif isinstance(held, bytes):
            if keys != (held,):
                self._names[name] = {held, *keys}
        else:
            held.update(keys)

    def _unindex(self, key: bytes) -> None:
        name = _name(key)
        held = self._names.get(name)
        if held is None:
            return
        if isinstance(held, bytes):
            if held == key:
                del self._names[name]
            return
        held.discard(key)
        if len(held) == 1:
            self._names[name] = next(iter(held))
        elif not held:
            del self._names[name]

    def drop_cached(self, owned) -> None:
        """Forget the upstream answers to every name ``owned(name)`` claims
        (lower-case text, ``wire.wire_to_text``): a new zone's
        names, which the hot table must not shadow.  A key is the query after
        its ID, so its name starts after the rest of the header."""
        for key in [key for key in self.cached if owned(_name(key))]:
            del self.cached[key]
            self._unindex(key)

    def drop_names(self, names, under=()) -> None:
        """Forget the upstream answers to ``names`` and to every name at or
        under one of ``under`` (wildcard bases): names a zone change made
        local.  Looked up by name, so a put costs the same whatever the
        size of the table; only a new wildcard walks the names."""
        doomed = [key for name in names for key in _keys(self._names.pop(name, ()))]
        if under:
            suffixes = tuple("." + base for base in under)
            for name in [n for n in self._names if n in under or n.endswith(suffixes)]:
                doomed.extend(_keys(self._names.pop(name)))
        for key in doomed:
            self.cached.pop(key, None)


def _keys(held) -> tuple | set:
    """The keys of one name in ``HotAnswers._names``: a single key is kept as itself."""
    return (held,) if isinstance(held, bytes) else held


def _name(key: bytes) -> str:
    """The lower-case name a key asks for: a key is the query after its ID,
    so the name starts after the rest of the header."""
    return wire.wire_to_text(key[10:])
