"""Noticing file changes: inotify on the files' directories.

Watching the directory rather than the file sees every way a file can
change: edited in place, replaced by rename, deleted and created again
(watching the file itself loses the watch with the old inode, BUG 37).
``DirectoryWatcher`` hands its inotify fd to the reactor as a reader and
calls back; ``FileChangeWatcher`` answers "changed since the last look?"
for a caller that asks on its own schedule (the hosts file).  Nothing
blocks.
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
Change = tuple[str, str, int]


def directories_of(*paths: str) -> dict[str, set[str]]:
    """What to watch to see every change of these paths: directory -> names in it.

    Pass a symlink's real path too: its target changes in another directory.
    """
    wanted: dict[str, set[str]] = {}
    for path in paths:
        directory, name = os.path.split(os.path.abspath(path))
        wanted.setdefault(directory, set()).add(name)
    return wanted


@implementer(IReadDescriptor)
class DirectoryWatcher:
    """Reports changes of chosen names in chosen directories.

    With a reactor, to ``on_change`` as they happen; with ``reactor=None``,
    to whoever calls ``poll()``.
    """

    def __init__(self, reactor, on_change: ChangeCallback | None = None):
        self._reactor = reactor
        self._on_change = on_change
        self._inotify: INotify | None = None
        self._directories: dict[int, str] = {}  # watch descriptor -> directory
        self._wanted: dict[str, frozenset[str]] = {}  # directory -> names

    @property
    def started(self) -> bool:
        return self._inotify is not None

    def start(self) -> None:
        """Open the inotify fd (OSError when the system is out of inotify instances)."""
        if self._inotify is None:
            self._inotify = INotify()
            if self._reactor is not None:
                self._reactor.addReader(self)

    def stop(self) -> None:
        if self._inotify is not None:
            if self._reactor is not None:
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
        for directory, name, mask in self.poll():
            try:
                self._on_change(directory, name, mask)
            except Exception:
                log.failure("directory change handler failed for {d}/{n}", d=directory, n=name)

    def poll(self) -> list[Change]:
        """The changes since the last call (directory, name or "" for the directory, mask); never blocks."""
        if self._inotify is None:
            return []
        try:
            events = self._inotify.read(timeout=0)
        except OSError as e:
            log.warn("inotify read failed: {e}", e=e)
            return []
        changes = []
        for event in events:
            if event.mask & flags.Q_OVERFLOW:
                # Events were lost: every watched name may have changed.
                changes += [(directory, "", event.mask) for directory in set(self._directories.values())]
                continue
            directory = self._directories.get(event.wd)
            if directory is None:
                continue
            if event.mask & flags.IGNORED:
                # The directory is gone: forget the watch; the owner re-adds it.
                del self._directories[event.wd]
                changes.append((directory, "", event.mask))
                continue
            if event.mask & (flags.DELETE_SELF | flags.MOVE_SELF) or event.name in self._wanted.get(directory, ()):
                changes.append((directory, event.name, event.mask))
        return changes

    def logPrefix(self) -> str:
        return "inotify"

    def connectionLost(self, reason) -> None:
        pass


class FileChangeWatcher:
    """Tells whether a file changed since the last look (content, or replaced).

    inotify on its directory (and its symlink target's) says when to look;
    the stat signature (mtime, size, inode) says whether it really changed,
    so a write that left it as it was is no change.  While a directory cannot
    be watched (it is missing, or inotify is unavailable) every look compares
    the signature, and every ``recheck``-th look does anyway: inotify misses
    a bind-mounted file written through its other mount.  The inotify fd
    opens at the first look, not here.

    With ``reactor`` and ``on_event``, the reactor reads the inotify fd and
    ``on_event()`` is called when something may have changed: the owner
    looks then, and otherwise only rarely (``blind`` says when it must keep
    looking often), instead of waking the reactor every second for a look.
    """

    def __init__(self, path: str, recheck: int = 30, reactor=None, on_event: Callable[[], None] | None = None):
        self.path = path
        self._on_event = on_event
        self._watcher = DirectoryWatcher(reactor if on_event else None, self._event)
        self._signature: tuple | None = ("never",)
        self._blind = True  # some directory is not watched (yet)
        self._recheck = recheck
        self._looks = 0
        self._seen = False  # the reactor read an event since the last look
        self._started = False

    @property
    def blind(self) -> bool:
        """Some change could go unseen by inotify: the owner must look often."""
        return self._blind

    def _event(self, directory: str, name: str, mask: int) -> None:
        if not self._seen:
            self._seen = True
            self._on_event()

    def changed(self, compare: bool = False) -> bool:
        """Whether the file changed since the last look; ``compare``: check its signature anyway."""
        self._looks += 1
        if not self._started:  # (at the first look, and the first after ``close``)
            self._started = True
            try:
                self._watcher.start()
            except OSError as e:
                log.warn("cannot watch {path} with inotify ({e}); comparing its stat on every look",
                         path=self.path, e=e)
        seen, self._seen = self._seen, False
        if self._watcher.poll() or seen or compare or self._blind or self._looks % self._recheck == 0:
            # Re-aimed at every look that saw something: a symlink may point elsewhere now.
            problems = self._watcher.watch(directories_of(self.path, os.path.realpath(self.path)))
            self._blind = bool(problems) or not self._watcher.started
            return self._signature_changed()
        return False

    def _signature_changed(self) -> bool:
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

    def close(self) -> None:
        self._watcher.stop()
        self._started = False
        self._blind = True
