"""The hosts file as local DNS data: parse text, and notice changes.

Parsing takes text, not a path (tests feed it strings).  Unlike the Go
daemon a name keeps every address of every line (``localhost`` gets both
127.0.0.1 and ::1), and inline comments are stripped.
"""

from __future__ import annotations

import ipaddress
import os

from networkd.dns.names import BadName, check_name


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


class FileChangeWatcher:
    """Tells whether a file changed since the last look (mtime, size, inode).

    Polled about once a second: cheap, and it catches replace-by-rename and
    delete/recreate, which a naive inotify watch on the file misses.
    """

    def __init__(self, path: str):
        self.path = path
        self._signature = ("never",)

    def changed(self) -> bool:
        try:
            st = os.stat(self.path)
            signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            signature = None
        if signature == self._signature:
            return False
        self._signature = signature
        return True

    def read(self) -> str | None:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return None
