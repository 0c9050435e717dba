"""Keeps the zone in force equal to ``build_zone`` of the latest inputs, key by key.

Rebuilding the whole zone for every domains snapshot cost CPU in proportion
to the number of domains, on the reactor that answers DNS (issue 13: ~1 s a
put at 40,000).  Here a snapshot's ``changed`` keys are applied one by one:
each key's value is checked (bad names and values become invalid keys with
the same error as before), then the one name it claims is given its record
in the zone (``Zone.set_exact``/``set_wildcard``: reverse index included).
Several keys may name one name (``A.lain`` and ``a.lain``): the greatest
valid key wins, as in ``build_zone``; an etcd name hides a hosts-file name.

Whole-state guarantees are kept: a snapshot with no ``changed`` (the first,
a re-read of the prefix after a compaction, a reconnect or the periodic
anti-entropy read) is compared with what was applied, key by key, in slices
of at most ``budget`` seconds with the reactor free in between, so a lost
watch event is found and the reactor never stalls on a big table.  A key is
always applied whole within one slice; after each slice the resolver drops
the hot answers the change made stale (``Resolver.zone_changed``).  The
first snapshot is applied in slices too (whole, it was one reactor turn of
~1 s at 10,000 domains, ~4 s at 40,000, in which no keep-alive could go
out); ``built`` says when it is in, and the DNS service reads no query
before that (networkd.dns.service), so a daemon starting up never answers
from a half-filled zone.
"""

from __future__ import annotations

import time

from twisted.logger import Logger

from networkd.dns.names import BadName, split_wildcard
from networkd.dns.zone import Record, Zone, parse_domain_value

log = Logger()

BUDGET = 0.002  # seconds of work at most per reactor turn
# ... while the first snapshot goes in: no query is read before it is whole, so its slices are longer
# (fewer turns of other start-up work in between), still short enough for keep-alives and the rest
FIRST_BUDGET = 0.05
BIG_SCAN = 8192  # keys of a whole comparison above which it starts in the turn after the snapshot
_STALE = object()  # an applied value that must be evaluated again (webrouter IPs changed)


class ZoneFeed:
    def __init__(self, reactor, *, ttl: int, node_ip: str | None, key_prefix: str = "",
                 on_change=lambda added, added_wildcards: None, budget: float = BUDGET,
                 on_built=lambda: None, first_budget: float = FIRST_BUDGET):
        self.zone = Zone({}, {}, ttl)
        self.invalid: dict[str, str] = {}  # full etcd key -> why it is ignored
        self._reactor = reactor
        self._node_ip = node_ip
        self._prefix = key_prefix
        self._on_change = on_change
        self._on_built = on_built
        self.built = False  # the first domains snapshot is applied whole
        self._budget = budget
        self._first_budget = first_budget
        self._values = {}  # the latest domains snapshot (read, never copied)
        self._generation: int | None = None  # of the snapshot applied last
        self._applied: dict[str, object] = {}  # key -> the raw value the zone reflects
        self._entries: dict[str, tuple[tuple[str, bool], Record]] = {}  # valid key -> ((name, wildcard), record)
        self._claims: dict[tuple[str, bool], str | set[str]] = {}  # (name, wildcard) -> the valid key(s) naming it
        self._webrouter_keys: set[str] = set()  # keys whose value may say type webrouter
        self._webrouters: tuple[str, ...] = ()
        self._hosts: dict[str, Record] = {}
        self._dirty: set[str] = set()  # keys to evaluate again
        self._scan: list[str] = []  # keys of a whole comparison, walked from the end
        self._call = None
        self._added: list[str] = []  # names made local since the last on_change
        self._added_wildcards: list[str] = []
        self._touched = False
        self.touched_names = 0  # names given a new record, ever (what a put costs: tests)

    # -- inputs ----------------------------------------------------------------

    def domains(self, snapshot) -> None:
        """A new domains snapshot: its changed keys, or all of them, are applied."""
        first = self._generation is None
        changed = snapshot.changes_since(self._generation)
        self._generation = snapshot.generation
        self._values = snapshot.values
        if self.zone.serial != snapshot.revision & 0xFFFFFFFF:
            self.zone.serial = snapshot.revision & 0xFFFFFFFF  # the SOA of NODATA answers
            self._touched = True
        if changed is None:
            # Both ends: new keys and gone ones.  At 40,000 keys making this list is a turn's worth
            # of work (~1 ms) on its own: a big comparison starts in the next turn.
            scan = self._scan = list(self._applied)
            scan.extend(self._values)
            if not first and len(scan) > BIG_SCAN:
                self._call = self._call or self._reactor.callLater(0, self._later)
                return
        else:
            self._dirty.update(changed)
        self._work()

    def set_webrouters(self, ips: tuple[str, ...]) -> None:
        """Keys of type webrouter answer with these IPs (from the VIP configs)."""
        if ips != self._webrouters:
            self._webrouters = tuple(ips)
            for key in self._webrouter_keys:
                self._applied[key] = _STALE
            self._dirty.update(self._webrouter_keys)
            self._work()

    def set_hosts(self, hosts: list[tuple[str, str]]) -> None:
        """The hosts-file names (each used unless an etcd key names it too)."""
        merged: dict[str, list[str]] = {}
        for name, ip in hosts:
            ips = merged.setdefault(name, [])
            if ip not in ips:
                ips.append(ip)
        new = {name: Record(tuple(ips)) for name, ips in merged.items()}
        old, self._hosts = self._hosts, new
        for name in old.keys() | new.keys():
            if old.get(name) != new.get(name):
                self._settle((name, False))
        self._flush()

    def first_at_once(self) -> None:
        """Queries are read before the first snapshot came (etcd was slow to answer at start-up): it
        goes into the zone in one turn when it comes, as a half-filled zone must never be seen."""
        self._first_budget = float("inf")

    def pending(self) -> int:
        """Keys still to be looked at (0: the zone reflects the inputs)."""
        return len(self._dirty) + len(self._scan)

    # -- the work --------------------------------------------------------------

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _later(self) -> None:
        self._call = None
        self._work()

    def _work(self) -> None:
        """Apply dirty keys, then walk the comparison, until the budget is
        spent; the rest in a later reactor turn."""
        clock = time.perf_counter  # the work's real cost (the reactor's clock may be a test's)
        deadline = clock() + (self._budget if self.built else max(self._budget, self._first_budget))
        dirty, scan, applied, values = self._dirty, self._scan, self._applied, self._values
        n = 0
        while dirty or scan:
            key = dirty.pop() if dirty else scan.pop()
            raw = values.get(key)
            n += 1
            if raw != applied.get(key):
                self._apply(key, raw)
                n = 256
            if n >= 256:  # the clock after each change, and every 256 keys compared
                n = 0
                if clock() > deadline:
                    break
        self._flush()
        if (dirty or scan) and self._call is None:
            self._call = self._reactor.callLater(0, self._later)
        elif not (dirty or scan) and not self.built and self._generation is not None:
            self.built = True
            self._on_built()

    def _apply(self, key: str, raw: str | None) -> None:
        full_key = self._prefix + key
        old = self._entries.pop(key, None)
        self._webrouter_keys.discard(key)
        reason = None
        if raw is None:
            self._applied.pop(key, None)
        else:
            self._applied[key] = raw
            if "webrouter" in raw:
                self._webrouter_keys.add(key)
            try:
                slot = split_wildcard(key)
                self._entries[key] = (slot, Record(parse_domain_value(raw, self._node_ip, self._webrouters)))
            except BadName as e:
                reason = f"bad name: {e}"
            except ValueError as e:
                reason = str(e)
        self._set_invalid(full_key, reason)
        new = self._entries.get(key)
        if old is not None and (new is None or old[0] != new[0]):
            self._unclaim(old[0], key)
            self._settle(old[0])
        if new is not None:
            self._claim(new[0], key)
            self._settle(new[0])

    def _claim(self, slot: tuple[str, bool], key: str) -> None:
        """One key (nearly always) as a plain str, several as a set: 40,000 sets weigh ~9 MB."""
        held = self._claims.get(slot)
        if held is None:
            self._claims[slot] = key
        elif isinstance(held, str):
            if held != key:
                self._claims[slot] = {held, key}
        else:
            held.add(key)

    def _unclaim(self, slot: tuple[str, bool], key: str) -> None:
        held = self._claims[slot]
        if isinstance(held, str):
            del self._claims[slot]
        else:
            held.discard(key)
            if len(held) == 1:
                self._claims[slot] = next(iter(held))

    def _settle(self, slot: tuple[str, bool]) -> None:
        """Give the name of ``slot`` the record its inputs say, if that changed."""
        name, wildcard = slot
        keys = self._claims.get(slot)
        if keys:
            record = self._entries[keys if isinstance(keys, str) else max(keys)][1]
        else:
            record = None if wildcard else self._hosts.get(name)
        table = self.zone.wildcards if wildcard else self.zone.exact
        old = table.get(name)
        if old == record:
            return
        self.touched_names += 1
        self._touched = True
        if wildcard:
            self.zone.set_wildcard(name, record)
        else:
            self.zone.set_exact(name, record)
        if old is None:
            (self._added_wildcards if wildcard else self._added).append(name)

    def _set_invalid(self, full_key: str, reason: str | None) -> None:
        if reason is None:
            if self.invalid.pop(full_key, None) is not None:
                self._touched = True
        elif self.invalid.get(full_key) != reason:
            self.invalid[full_key] = reason
            self._touched = True
            log.warn("DNS: ignoring {key}: {reason}", key=full_key, reason=reason)

    def _flush(self) -> None:
        """Tell the resolver what this slice changed (same reactor turn: no
        query sees the zone changed but stale hot answers)."""
        if self._touched:
            added, self._added = self._added, []
            added_wildcards, self._added_wildcards = self._added_wildcards, []
            self._touched = False
            self._on_change(added, added_wildcards)
