"""``networkd check``: is every key under ``--etcd-root`` one the daemon can use?

Like ``keepalived --config-test`` or ``unbound-checkconf``.  It reads the
whole root at one revision with the daemon's own etcd client and options
(``--etcd*``), judges each key with the daemon's own parsers
(networkd/tools/validate.py) and prints, per part, the invalid keys with
the reason, then a summary.  Exit status: 0 all valid, 1 any invalid, 2 etcd
could not be read (or a usage error).

``--file PATH`` (``-`` for stdin) checks one JSON value before it is
written: ``--key`` names the key it is for (a full key under the root tells
the kind), or ``--kind`` says what it is.
"""

from __future__ import annotations

import json
import sys

from twisted.internet import defer
from twisted.python import usage

from networkd.options import ETCD_PARAMETERS, validate_etcd
from networkd.tools import validate
from networkd.tools.command import CANNOT, OK, PROBLEM, parse, run_on_reactor

PROG = "networkd check"


class CheckOptions(usage.Options):
    synopsis = "Usage: networkd check [--etcd ...] [--etcd-root /lain] [--json] | --file PATH [--kind KIND] [--key KEY]"
    longdesc = ("Check every key under --etcd-root with networkd's own parsers.  Exit status 0: all valid, "
                "1: some key is invalid, 2: etcd could not be read.  --file checks one value instead "
                f"(kinds: {', '.join(validate.KINDS)}).")
    optFlags = [["json", None, "Print the report as JSON."]]
    optParameters = [
        *ETCD_PARAMETERS,
        ["timeout", None, "10", "Seconds to wait for etcd."],
        ["file", "f", None, "Check this JSON value (- for stdin) instead of etcd."],
        ["kind", None, None, f"What --file is a value of: {', '.join(validate.KINDS)}."],
        ["key", None, None, "The key --file is for: a full key under --etcd-root, or one relative to the kind's prefix."],
    ]

    def opt_version(self):
        """Print the version and exit."""
        from networkd import __version__

        print(f"networkd {__version__}")
        sys.exit(0)

    def postOptions(self):
        validate_etcd(self)
        try:
            self["timeout"] = float(self["timeout"])
        except ValueError:
            raise usage.UsageError(f"--timeout: {self['timeout']!r} is not a number") from None
        if self["kind"] is not None and self["kind"] not in validate.KINDS:
            raise usage.UsageError(f"--kind: {self['kind']!r} is not one of {', '.join(validate.KINDS)}")
        if (self["kind"] or self["key"]) and not self["file"]:
            raise usage.UsageError("--kind and --key go with --file")


def main(argv: list[str]) -> None:
    options = parse(CheckOptions(), argv, PROG)
    if options["file"]:
        sys.exit(check_file(options))
    run_on_reactor(lambda reactor: check_etcd(options, reactor))


# -- one value -----------------------------------------------------------------

def check_file(options) -> int:
    part, key = _file_target(options)
    try:
        if options["file"] == "-":
            raw = sys.stdin.read()
        else:
            with open(options["file"], encoding="utf-8") as f:
                raw = f.read()
    except (OSError, UnicodeDecodeError) as e:
        print(f"{PROG}: error: cannot read {options['file']}: {e}", file=sys.stderr)
        return CANNOT
    shown = options["key"] or f"{part.example_key} (no --key given: checked as this one)"
    reason = validate.check_value(part, key or part.example_key, raw)
    if reason is not None:
        print(f"INVALID {part.name} value for {shown}: {reason}")
        return PROBLEM
    print(f"valid {part.name} value for {shown}")
    return OK


def _file_target(options) -> tuple[validate.Part, str]:
    """(part, key relative to its prefix) from --kind and --key."""
    key, root = options["key"], options["etcd-root"]
    part = validate.part_named(options["kind"]) if options["kind"] else None
    if key and key.startswith("/"):
        found = validate.kind_of_key(root, key)
        if found is None:
            _usage(f"--key: {key} is not under a prefix networkd reads below {root}")
        if part is not None and found[0] is not part:
            _usage(f"--key: {key} is a {found[0].name} key, not a {part.name} key")
        return found
    if part is None:
        _usage(f"--file needs --kind ({', '.join(validate.KINDS)}) or a full --key under {root}")
    return part, key or ""


def _usage(message: str):
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.exit(CANNOT)


# -- every key in etcd -----------------------------------------------------------

async def check_etcd(options, reactor) -> int:
    from networkd.app import make_client

    client = make_client(options)
    root = options["etcd-root"]
    try:
        reading = client.get_prefix((root + "/").encode())
        reading.addTimeout(options["timeout"], reactor)
        revision, kvs = await reading
    except Exception as e:  # every way of not reading etcd is exit status 2
        reason = f"no answer within {options['timeout']:g}s" if isinstance(e, defer.TimeoutError) else str(e) or type(e).__name__
        print(f"{PROG}: cannot read etcd {', '.join(map(str, options['etcd-endpoints']))}: {reason}", file=sys.stderr)
        return CANNOT
    finally:
        await _close(client)
    values = {kv.key.decode("utf-8", "replace"): kv.value.decode("utf-8", "replace") for kv in kvs}
    report = validate.check_keys(root, values)
    if options["json"]:
        print(json.dumps({**validate.as_json(report), "revision": revision}, indent=2))
    else:
        print(render(report, revision, client.endpoint))
    return PROBLEM if report.invalid else OK


async def _close(client) -> None:
    try:
        await client.close()
    except Exception:
        pass


def render(report: validate.Report, revision: int, endpoint) -> str:
    lines = [f"etcd {endpoint}, root {report.root}, revision {revision}", ""]
    for part in report.parts:
        state = "all valid" if not part.invalid else f"{len(part.invalid)} invalid"
        lines.append(f"{part.part.title} ({part.prefix}): {part.checked} keys, {state}")
        for key, reason in part.invalid:
            lines.append(f"  INVALID {key}: {reason}")
    bad_parts = sum(1 for part in report.parts if part.invalid)
    lines.append("")
    summary = (f"{report.checked} keys checked, {report.invalid} invalid in {bad_parts} part"
               f"{'' if bad_parts == 1 else 's'}" if report.invalid else f"{report.checked} keys checked, all valid")
    lines.append(f"summary: {summary} ({report.other_keys} other keys under {report.root} not checked)")
    return "\n".join(lines)
