"""inotify on directories, driven by the reactor.

Watching the directory rather than the file sees every way a file can
change: edited in place, replaced by rename, deleted and created again
(watching the file itself loses the watch with the old inode, BUG 37).
The inotify fd is handed to the reactor as a reader; nothing blocks.
"""

from __future__ import annotations

import os
from typing import Callable

from inotify_simple import INotify, flags
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

log = Logger()

# Written and closed, renamed in or out, deleted, created (symlinks show up
# only as a create), and the directory itself going away.
MASK = (
    flags.CLOSE_WRITE | flags.MOVED_TO | flags.MOVED_FROM | flags.DELETE | flags.CREATE
    | flags.DELETE_SELF | flags.MOVE_SELF
)

ChangeCallback = Callable[[str, str, int], None]  # directory, name ("" for the directory), mask


@implementer(IReadDescriptor)
class DirectoryWatcher:
    """Reports changes of chosen names in chosen directories to ``on_change``."""

    def __init__(self, reactor, on_change: ChangeCallback):
        self._reactor = reactor
        self._on_change = on_change
        self._inotify: INotify | None = None
        self._directories: dict[int, str] = {}  # watch descriptor -> directory
        self._wanted: dict[str, frozenset[str]] = {}  # directory -> names

    def start(self) -> None:
        if self._inotify is None:
            self._inotify = INotify()
            self._reactor.addReader(self)

    def stop(self) -> None:
        if self._inotify is not None:
            self._reactor.removeReader(self)
            self._inotify.close()
            self._inotify = None
            self._directories.clear()
            self._wanted = {}

    def watch(self, wanted: dict[str, set[str]]) -> list[str]:
        """Watch exactly these directories for these names; returns problems (missing dirs)."""
        problems = []
        if self._inotify is None:
            return ["not started"]
        wanted = {os.path.normpath(d): frozenset(names) for d, names in wanted.items()}
        watched = {d: wd for wd, d in self._directories.items()}
        for directory, wd in watched.items():
            if directory not in wanted:
                try:
                    self._inotify.rm_watch(wd)
                except OSError:
                    pass
                del self._directories[wd]
        for directory in wanted:
            if directory not in watched:
                try:
                    wd = self._inotify.add_watch(directory, MASK)
                except OSError as e:
                    problems.append(f"cannot watch {directory}: {e.strerror}")
                    continue
                self._directories[wd] = directory
        self._wanted = wanted
        return problems

    def watched(self) -> set[str]:
        return set(self._directories.values())

    # -- IReadDescriptor -------------------------------------------------------

    def fileno(self) -> int:
        return self._inotify.fileno() if self._inotify is not None else -1

    def doRead(self):
        if self._inotify is None:
            return
        try:
            events = self._inotify.read(timeout=0)
        except OSError as e:
            log.warn("inotify read failed: {e}", e=e)
            return
        for event in events:
            if event.mask & flags.Q_OVERFLOW:
                # Events were lost: every watched name may have changed.
                for directory in set(self._directories.values()):
                    self._report(directory, "", event.mask)
                continue
            directory = self._directories.get(event.wd)
            if directory is None:
                continue
            if event.mask & flags.IGNORED:
                # The directory is gone: forget the watch; the owner re-adds it.
                del self._directories[event.wd]
                self._report(directory, "", event.mask)
                continue
            if event.mask & (flags.DELETE_SELF | flags.MOVE_SELF) or event.name in self._wanted.get(directory, ()):
                self._report(directory, event.name, event.mask)

    def _report(self, directory: str, name: str, mask: int) -> None:
        try:
            self._on_change(directory, name, mask)
        except Exception:
            log.failure("directory change handler failed for {d}/{n}", d=directory, n=name)

    def logPrefix(self) -> str:
        return "inotify"

    def connectionLost(self, reason) -> None:
        pass
