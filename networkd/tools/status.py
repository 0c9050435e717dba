"""``networkd status``: the local daemon as a person reads it, from its HTTP API.

A plain-text view of ``/v1/status``, ``/v1/vips``, ``/healthz`` and the DNS
figures of ``/metrics`` that reads well in a terminal and pasted into a bug
report; ``--json`` for scripts (the same data, raw); ``--watch`` redraws it
every ``--interval`` seconds until Ctrl-C.  Exit status: 0 healthy, 1 the
daemon says it is unhealthy, 2 the API did not answer (or a usage error).
"""

from __future__ import annotations

import json
import sys
import time

from twisted.python import usage

from networkd.options import parse_listen
from networkd.tools.apiread import ApiUnreachable, read_all
from networkd.tools.command import CANNOT, OK, PROBLEM, parse
from networkd.tools.table import render

PROG = "networkd status"


class StatusOptions(usage.Options):
    synopsis = "Usage: networkd status [--api 127.0.0.1:3000] [--json] [--watch [--interval 2]]"
    longdesc = ("Show the local networkd: VIPs, DNS, etcd, lease and leader, from its HTTP API.  "
                "Exit status 0: healthy, 1: unhealthy, 2: the API did not answer.")
    optFlags = [
        ["json", None, "Print the API's data as one JSON object."],
        ["watch", "w", "Redraw every --interval seconds until Ctrl-C."],
    ]
    optParameters = [
        ["api", None, "127.0.0.1:3000", "The daemon's --api-listen address."],
        ["interval", None, "2", "Seconds between redraws with --watch."],
        ["timeout", None, "3", "Seconds to wait for each API answer."],
    ]

    def opt_version(self):
        """Print the version and exit."""
        from networkd import __version__

        print(f"networkd {__version__}")
        sys.exit(0)

    def postOptions(self):
        self["api-address"] = parse_listen(self["api"], "--api")
        for name in ("interval", "timeout"):
            try:
                self[name] = float(self[name])
            except ValueError:
                raise usage.UsageError(f"--{name}: {self[name]!r} is not a number") from None
            if self[name] <= 0:
                raise usage.UsageError(f"--{name}: must be above 0")


def main(argv: list[str]) -> None:
    options = parse(StatusOptions(), argv, PROG)
    base = f"http://{options['api-address']}"
    if not options["watch"]:
        sys.exit(show_once(base, options))
    try:
        while True:
            if sys.stdout.isatty():
                sys.stdout.write("\x1b[H\x1b[2J")  # home, clear: redraw in place
            show_once(base, options)
            if not sys.stdout.isatty():
                print("-" * 72)
            sys.stdout.flush()
            time.sleep(options["interval"])
    except KeyboardInterrupt:
        sys.exit(OK)


def show_once(base: str, options) -> int:
    try:
        data = read_all(base, options["timeout"])
    except ApiUnreachable as e:
        print(f"{PROG}: the networkd API does not answer: {e}", file=sys.stderr)
        return CANNOT
    if options["json"]:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(render(data, now=time.time()))
    return OK if data["health"]["ok"] else PROBLEM
