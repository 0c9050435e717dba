"""The guarded file as found: one look at it, and giving it back on stop.

Blocking (reads, stats, an atomic replace): the guardian calls these in a
thread.  A look records what the file is (missing, a symlink, systemd-
resolved's stub) as well as its text, because that decides where upstreams
come from and which directories must be watched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from networkd.atomicfile import replace_file
from networkd.dirwatch import directories_of
from networkd.resolvconf.text import restore

STUB_NAME = "stub-resolv.conf"  # systemd-resolved's file that points at 127.0.0.53


@dataclass(frozen=True)
class FileState:
    """One look at the guarded file (and at systemd's upstream file in stub mode)."""

    path: str
    text: str | None  # None: missing
    realpath: str
    is_symlink: bool
    inode: int | None
    uid: int | None
    stub: bool  # a symlink to systemd-resolved's stub file
    upstream_text: str | None  # the text to take upstreams from (None: unknown)

    def watch_list(self, systemd_path: str) -> dict[str, set[str]]:
        return directories_of(self.path, self.realpath, *((systemd_path,) if self.stub else ()))


def read_text(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None


def look_at(path: str, systemd_path: str) -> FileState:
    """Read the file and what it is."""
    is_symlink = os.path.islink(path)
    realpath = os.path.realpath(path)
    text = read_text(path)
    try:
        st = os.stat(path)
        inode, uid = st.st_ino, st.st_uid
    except FileNotFoundError:
        inode = uid = None
    stub = is_symlink and os.path.basename(realpath) == STUB_NAME
    upstream_text = read_text(systemd_path) if stub else text
    return FileState(path, text, realpath, is_symlink, inode, uid, stub, upstream_text)


def replace_if_unchanged(path: str, seen: str | None, data: bytes) -> str | None:
    """``replace_file`` only if the file still reads as ``seen`` (None: missing); None if it changed
    since: another writer got there between our look and now, and its text must be looked at first
    (replacing it would throw its change away)."""
    if read_text(path) != seen:
        return None
    return replace_file(path, data)


def restore_file(path: str, ours: str) -> str | None:
    """Take our nameserver line out of the file; how it was written, None if nothing changed."""
    text = read_text(path)
    if text is None:
        return None
    restored = restore(text, ours)
    if restored == text:
        return None
    return replace_file(path, restored.encode())
