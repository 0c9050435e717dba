"""``--log-format json``: one JSON object per line, for journald, ELK or Loki.

Each line: ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``
(the module that logged), ``message`` (the text the text format shows), and
every field the log call passed, as its own field (those its format names,
and any other plain value): ``ip``, ``key``, ``prefix``, ``lease``,
``error`` and so on.  Some get the name an
operator searches for as well: a VIP module's ``ip`` is also ``vip``, a DNS
upstream's ``server`` also ``upstream``, an ``e``/``why`` also ``error``.  A
logged failure adds ``traceback``.

twistd takes the observer from its application (an ``ILogObserver``
component, set by ``networkd.app.Networkd.setServiceParent``), so its own
lines are JSON too.  They go to standard output (the journal under systemd);
twistd's ``--logfile`` is not used then.
"""

from __future__ import annotations

import json
import string
import sys
import time

from twisted.logger import FileLogObserver, formatEvent

# (module prefix, field) -> the name operators search for, added beside the field.
ALIASES = {
    ("networkd.vips", "ip"): "vip",
    ("networkd.dns", "server"): "upstream",
    ("networkd.dns", "ups"): "upstreams",
    ("", "e"): "error",
    ("", "why"): "error",
}
RESERVED = {"time", "level", "logger", "message", "traceback"}
_formatter = string.Formatter()


def format_fields(log_format: str | None) -> list[str]:
    """The top-level field names a format string uses (``{ip}``, ``{lease:x}``, ``{e.errno}`` -> ``e``)."""
    if not log_format:
        return []
    names = []
    try:
        parsed = list(_formatter.parse(log_format))
    except ValueError:
        return []
    for _, field, _, _ in parsed:
        if field:
            name = field.split(".", 1)[0].split("[", 1)[0].rstrip("!")
            if name and name not in names:
                names.append(name)
    return names


def _is_plain(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value)


def _plain(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    return str(value)


def event_as_dict(event: dict) -> dict:
    at = event.get("log_time") or time.time()
    level = event.get("log_level")
    namespace = event.get("log_namespace") or ""
    out = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z",
        "level": getattr(level, "name", str(level)),
        "logger": namespace,
        "message": formatEvent(event),
    }
    named = format_fields(event.get("log_format"))
    if namespace != "log_legacy":  # twisted.python.log events: the message says it all
        named += [k for k in event if k not in named and _is_plain(event[k])]
    for name in named:
        if name in event and not name.startswith("log_") and name not in RESERVED:
            out[name] = _plain(event[name])
    for (prefix, field), alias in ALIASES.items():
        if field in out and namespace.startswith(prefix) and alias not in out:
            out[alias] = out[field]
    failure = event.get("log_failure")
    if failure is not None:
        try:
            out["traceback"] = failure.getTraceback()
        except Exception:
            out["traceback"] = repr(failure)
        out.setdefault("error", failure.getErrorMessage())
    return out


def json_line(event: dict) -> str:
    return json.dumps(event_as_dict(event), ensure_ascii=False, default=str) + "\n"


def json_observer(out=None) -> FileLogObserver:
    """Lines to ``out`` (standard output by default)."""
    return FileLogObserver(out if out is not None else sys.stdout, json_line)
