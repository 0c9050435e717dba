"""The hosts file as local DNS data: its text parsed into (name, ip) entries.

Parsing takes text, not a path (tests feed it strings).  Unlike the Go
daemon a name keeps every address of every line (``localhost`` gets both
127.0.0.1 and ::1), and inline comments are stripped.  Noticing that the
file changed is the directory watcher's job (``networkd.dirwatch``).
"""

from __future__ import annotations

import ipaddress

from networkd.dirwatch import FileChangeWatcher  # networkd.dns.service imports it from here
from networkd.dns.names import BadName, check_name

__all__ = ["FileChangeWatcher", "parse_hosts"]


def parse_hosts(text: str) -> list[tuple[str, str]]:
    """``[(name, ip), ...]`` in file order; bad lines and names are skipped."""
    entries = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        try:
            ip = ipaddress.ip_address(fields[0])
        except ValueError:
            continue
        for field in fields[1:]:
            try:
                entries.append((check_name(field), str(ip)))
            except BadName:
                continue
    return entries
