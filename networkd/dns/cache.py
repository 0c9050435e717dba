"""Answers from upstreams, kept as long as their TTLs say, in a bounded LRU.

Keyed by (lower-case wire name, type, class, DO bit, CD bit): an answer
fetched with checking disabled is never served to a client that wants it
checked, nor the reverse.  Entries keep the
upstream bytes and the offsets of every TTL, so serving a hit only patches
bytes: the ID, the question's case, the TTLs (decremented by the age).
NXDOMAIN and NODATA are cached for min(SOA TTL, SOA minimum) (RFC 2308);
without an SOA they are not cached.  Our own failures (SERVFAIL) are kept a
few seconds at most and never replace a live good answer; they have a
table of their own (at most FAILURES_MAX), so a flood of names that fail
upstream (a black-holed upstream, random names) never pushes the answers
clients use out of the LRU.

Serve stale (RFC 8767): an answer past its TTL stays up to ``stale_max``
seconds more (still counted in the size), for when no upstream answers
(``stale``); a SERVFAIL never replaces it.

The size bounds every kept upstream answer: an entry that leaves (evicted,
replaced, expired, flushed) is handed to ``on_evict``, which drops its
pre-packed hot answers too (``networkd.dns.hot``).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass

from networkd.dns import wire

MAX_TTL = 86400  # cap on positive entries
MAX_NEGATIVE_TTL = 3600  # cap on NXDOMAIN / NODATA (RFC 2308 suggests 1-3 hours)
SERVFAIL_TTL = 2
FAILURES_MAX = 1000  # failures kept at once, besides the answers (a few seconds each)
STALE_MAX = 86400  # seconds past its TTL an answer may still be served stale (--dns-stale-max)
STALE_TTL = 30  # the TTL of a stale answer (RFC 8767 s4)


@dataclass(slots=True)
class Entry:
    """One cached answer or failure (``--dns-cache-size`` of them): slots, no ``__dict__`` each."""

    answer: wire.UpstreamAnswer | None  # None for a cached failure
    rcode: int
    stored_at: float
    expires_at: float
    key: object = None  # its key in the cache
    hot_keys: tuple = ()  # its keys in the hot table (a tuple: most entries never get one, and () is shared)
    stale_until: float = 0.0  # after a failed refresh: served stale without asking upstream until then
    hits: int = 0  # uses while live (hot hits count once a second)
    prefetched: bool = False  # a refresh ahead of expiry was started

    @property
    def failure(self) -> bool:
        return self.answer is None


class Cache:
    def __init__(self, size: int, clock, on_evict=None, stale_max: float = STALE_MAX):
        self.size = size
        self.stale_max = stale_max
        self._clock = clock
        self._entries: OrderedDict = OrderedDict()
        self._failures: OrderedDict = OrderedDict()  # key -> Entry of a failure, oldest first
        self.on_evict = on_evict or (lambda entry: None)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key) -> Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            failure = self._failures.get(key)
            if failure is not None and failure.expires_at <= self._clock.seconds():
                del self._failures[key]
                return None
            return failure
        if entry.expires_at <= self._clock.seconds():
            if self.stale(key) is None:
                del self._entries[key]
                self.on_evict(entry)
            return None
        self._entries.move_to_end(key)
        return entry

    def stale(self, key) -> Entry | None:
        """An answer past its TTL but within ``stale_max`` of it (never a failure)."""
        entry = self._entries.get(key)
        if entry is None or entry.failure:
            return None
        if entry.expires_at <= self._clock.seconds() < entry.expires_at + self.stale_max:
            return entry
        return None

    def drop_stale(self, key) -> None:
        """A fresh answer came that could not be kept: the stale one must not outlive it."""
        entry = self.stale(key)
        if entry is not None:
            del self._entries[key]
            self.on_evict(entry)

    def touch(self, entry: Entry) -> None:
        """``entry`` was used (a hot hit): it is the most recent again."""
        if self._entries.get(entry.key) is entry:
            self._entries.move_to_end(entry.key)

    def put_answer(self, key, answer: wire.UpstreamAnswer) -> Entry | None:
        """Store an upstream answer if its rcode and TTLs allow; return the entry."""
        ttl = cache_ttl(answer)
        if not ttl or self.size <= 0:
            return None
        now = self._clock.seconds()
        entry = Entry(answer, answer.rcode, now, now + ttl, key)
        self._failures.pop(key, None)
        self._store(key, entry)
        return entry

    def put_failure(self, key) -> None:
        """Remember a SERVFAIL briefly, unless a good answer is still live or
        may still be served stale."""
        if self.size <= 0:
            return
        current = self._entries.get(key)
        now = self._clock.seconds()
        if current is not None and current.expires_at + self.stale_max > now:
            return
        if current is not None:  # an answer too old to serve even stale
            del self._entries[key]
            self.on_evict(current)
        self._failures[key] = Entry(None, wire.SERVFAIL, now, now + SERVFAIL_TTL, key)
        self._failures.move_to_end(key)
        while len(self._failures) > min(self.size, FAILURES_MAX):
            self._failures.popitem(last=False)

    def _store(self, key, entry: Entry) -> None:
        old = self._entries.get(key)
        self._entries[key] = entry
        self._entries.move_to_end(key)
        if old is not None:
            self.on_evict(old)
        while len(self._entries) > self.size:
            self.on_evict(self._entries.popitem(last=False)[1])

    def clear(self) -> None:
        for entry in self._entries.values():
            self.on_evict(entry)
        self._entries.clear()
        self._failures.clear()


def cache_ttl(answer: wire.UpstreamAnswer) -> int:
    """How long an answer may be cached, 0 if not at all."""
    if answer.flags & wire.TC:
        return 0
    if answer.rcode == wire.NOERROR and answer.answer_count:
        return min(answer.min_answer_ttl or 0, MAX_TTL)
    if answer.rcode in (wire.NOERROR, wire.NXDOMAIN) and answer.negative_ttl is not None:
        return min(answer.negative_ttl, MAX_NEGATIVE_TTL)
    return 0


def render(entry: Entry, query: wire.Query, now: float, stale: bool = False) -> bytes:
    """The cached answer for ``query``: its ID, its case, TTLs aged (stale:
    every TTL STALE_TTL)."""
    answer = entry.answer
    body = bytearray(answer.body)
    age = int(now - entry.stored_at)
    for offset, ttl in answer.ttls():
        struct.pack_into(">I", body, offset, STALE_TTL if stale else max(0, ttl - age))
    flags = wire.response_flags(query.flags, answer.rcode, ad=bool(answer.flags & wire.AD))
    body[0:2] = query.id
    struct.pack_into(">H", body, 2, flags)
    qlen = len(query.qname)
    body[12:12 + qlen] = query.qname
    if query.edns:
        arcount = struct.unpack_from(">H", body, 10)[0]
        struct.pack_into(">H", body, 10, arcount + 1)
        body += wire.opt_record(query.do, answer.rcode >> 4)
    return bytes(body)
