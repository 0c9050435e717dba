"""What ``GET /v1/vips`` shows: one JSON object per VIP key, from the VIP manager's state.

Read-only: it looks at the manager's inputs, locks, addresses and applied
rules, and changes nothing.
"""

from __future__ import annotations

import functools
import json
import time

from networkd.vips.planner import local_container


BODY_PIECE = 10  # entries made and encoded between two yields of EntryTexts.renderer (~0.3 ms)
MOVING = ("held_for", "unheld_seconds")  # what changes with time alone: written after the kept text
_encode = json.JSONEncoder(sort_keys=True).encode  # json.dumps(sort_keys=True) without a new encoder a call


def vip_entries(manager) -> list[dict]:
    return list(each_vip_entry(manager))


def each_vip_entry(manager):
    """The entries one at a time, sorted by key, invalid keys last.  The keys, locks held, addresses,
    rules and history are taken at the start; each entry's container, health and errors when it is
    made (a few ms later at most, when the caller takes them in slices)."""
    inputs, firewall = manager.inputs, manager.firewall
    held = manager.locks.held()
    active = manager.active()
    failsafe = getattr(manager, "failsafe", None)
    kept = failsafe.kept(inputs.holders) if failsafe is not None else frozenset()
    applied = firewall.applied if firewall else frozenset()
    firewall_error = f"firewall: {firewall.last_error}" if firewall and firewall.last_error else None
    # Grouped once: per entry, a walk of every rule and of every VIP's history was O(n²)
    # (~0.1 s of one reactor turn with 1,000 VIP configs).
    rules_of: dict[str, list] = {}
    for rule in applied:
        rules_of.setdefault(rule.key, []).append(rule)
    unheld = manager.transitions.history.unheld_seconds() if inputs.configs else {}
    holders, invalid = dict(inputs.holders), sorted(inputs.invalid_keys.items())
    for key, config in sorted(inputs.configs.items()):
        container = local_container(config, inputs.containers, manager.hostname)
        rules = sorted(rules_of.get(key, ()))
        yield {
            "key": key,
            "ip": config.ip,
            "port": config.port,
            "floating": config.floating,
            "app": config.app,
            "proc": config.proc,
            "ports": [{"proto": p.proto, "src": p.src, "dest": p.dest} for p in config.ports],
            "excluded_nodes": sorted(config.excluded_nodes),
            "excluded": config.excludes(manager.hostname),
            "holder": holders.get(config.ip) if config.floating else None,
            "held_by_me": config.floating and config.ip in held,
            "active": config.ip in active,
            "failsafe": config.floating and config.ip in kept and config.ip in active,
            "local_container": None if container is None else {
                "instance": container.instance, "ip": container.container_ip,
            },
            "dnat": [f"{r.ip}:{r.port}/{r.proto} -> {r.to_ip}:{r.to_port}" for r in rules],
            "last_error": manager.error_of(config.ip if config.floating else key) or firewall_error,
            "health": manager.health.status(config.ip) if config.floating and container is not None else None,
            **(_placement(manager, config, unheld) if config.floating else {}),
        }
    for key, error in invalid:
        yield {"key": key, "error": error, "last_error": error}


def floating_active(manager) -> list[tuple[str, str, str, bool]]:
    """(ip, app, proc, carried here) per floating VIP key, sorted by key: what ``/metrics`` shows,
    without building every ``/v1/vips`` entry (candidates, history: ~15 ms at 1,000 VIPs)."""
    inputs = getattr(manager, "inputs", None)
    if inputs is None:  # a part that only gives whole entries
        return [(e["ip"], str(e.get("app")), str(e.get("proc")), bool(e.get("active")))
                for e in manager.status() if e.get("floating")]
    active = manager.active()
    return [(config.ip, str(config.app), str(config.proc), config.ip in active)
            for _, config in sorted(inputs.configs.items()) if config.floating]


def _placement(manager, config, unheld: dict) -> dict:
    """Candidates with their health and why, our last transitions of this VIP and since when it is as it is;
    in the cluster (as this node saw the locks): since when its holder is who it is, how often it changed,
    seconds it had none."""
    history, ip = manager.transitions.history, config.ip
    holder = history.holders.get(ip)
    return {"candidates": manager.health.candidates(config), "transitions": history.recent(ip),
            "since": _iso(history.since.get(ip)), "holder_since": _iso(holder and holder[1]),
            "holder_changes": history.holder_changes.get(ip, 0),
            "unheld_seconds": round(unheld.get(ip, 0.0), 3)}


def _iso(wall: float | None) -> str | None:
    return None if wall is None else _iso_second(int(wall // 1))


@functools.lru_cache(maxsize=4096)  # two a VIP a fetch, mostly the same seconds as the last fetch (~2 us each)
def _iso_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))


def add_held_for(entries: list[dict], manager, now: float) -> list[dict]:
    """``held_for``: seconds since this node took the lock of each VIP it holds (None otherwise)."""
    records = lock_records(manager)
    for entry in entries:
        with_held_for(entry, records, now)
    return entries


def lock_records(manager) -> dict:
    return getattr(getattr(manager, "locks", None), "records", None) or {}


def with_held_for(entry: dict, records: dict, now: float) -> dict:
    if "ip" in entry:  # not an invalid key
        record = records.get(entry.get("ip")) if entry.get("held_by_me") else None
        entry["held_for"] = None if record is None else round(max(0.0, now - record.acquired_at), 1)
    return entry


class EntryTexts:
    """Each entry's JSON kept while the entry is the same, so a fetch encodes only what changed.

    An entry is made anew on every fetch (nothing here can go stale: what is
    kept is compared with the fresh entry, not trusted); only its encoding
    is skipped when equal.  ``MOVING`` values change with time alone, so they
    are left out of the comparison and written after the kept text.  Kept:
    the texts of the last fetch only (keys gone are dropped)."""

    def __init__(self):
        self._kept: dict[str, tuple[dict, str]] = {}
        self.encoded = 0  # entries encoded (what the tests count)

    def renderer(self, entries, piece: int = BODY_PIECE):
        """A renderer (networkd/api/slices.py) of the body: a JSON list, one entry a line, taking the
        ``entries`` iterator ``piece`` at a time.  Whitespace: ``json.dumps``'s one-line form (C-encoded,
        ~4x faster than ``indent=2``'s pure-Python encoder), keys sorted but the moving ones last."""
        kept, fresh, lines, chunks, count = self._kept, {}, [], [], 0
        for steady in entries:  # each a fresh dict of our own: its moving values are taken out of it
            moving = [f'"{k}": {_scalar(steady.pop(k))}' for k in MOVING if k in steady]
            key = str(steady.get("key"))
            old = kept.get(key)
            if old is None or old[0] != steady:
                old = (steady, _encode(steady))
                self.encoded += 1
            # The kept objects stay the same while equal: the fresh entry dies young, and a fetch
            # moves no thousand dicts into the oldest GC generation (each move nears a full collection).
            fresh[key] = old
            text = old[1]
            if moving:
                text = text[:-1] + (", " if steady else "") + ", ".join(moving) + "}"
            lines.append((",\n" if count else "[\n") + text)
            count += 1
            if not count % piece:
                chunks.append("".join(lines).encode())
                lines = []
                yield
        self._kept = fresh
        lines.append("\n]\n" if count else "[]\n")
        chunks.append("".join(lines).encode())
        return chunks


def _scalar(value) -> str:
    """``json.dumps(value)`` for the moving values, without its per-call cost (~5 us) in the common cases."""
    if value is None:
        return "null"
    if type(value) is float and value - value == 0.0:  # finite: repr is what json writes
        return repr(value)
    return json.dumps(value)
