"""Replace a small system file without ever leaving it half written.

The normal way is a temporary file in the same directory, renamed over the
target, keeping its mode and owner.  A bind-mounted file (Docker mounts
/etc/resolv.conf like that) cannot be renamed over, and a symlink must not
be replaced by a regular file: the first is written in place instead, the
second is followed and its target replaced.  Blocking: run it off the
reactor thread.
"""

from __future__ import annotations

import errno
import os
import tempfile

DEFAULT_MODE = 0o644


def mount_points(mountinfo: str = "/proc/self/mountinfo") -> set[str]:
    """Every mount point of this process's mount namespace."""
    points = set()
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4:
                    points.add(_unescape(fields[4]))
    except OSError:
        pass
    return points


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def is_mount_point(path: str) -> bool:
    return os.path.realpath(path) in mount_points()


def write_in_place(path: str, data: bytes) -> None:
    """Overwrite ``path`` keeping its inode (for bind mounts): write, then cut the tail."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        view = memoryview(data)
        offset = 0
        while offset < len(data):
            offset += os.pwrite(fd, view[offset:], offset)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: str, data: bytes) -> str:
    """Make ``path`` contain ``data``; returns how: "replaced", "created" or "in place".

    A symlink is followed (its target is replaced, the link stays).  Mode and
    owner of an existing file are kept; a new file gets mode 0644.
    """
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        st = None
    if st is not None and is_mount_point(real):
        write_in_place(real, data)
        return "in place"
    directory, name = os.path.split(real)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".networkd-tmp", dir=directory)
    try:
        try:
            view = memoryview(data)
            offset = 0
            while offset < len(data):
                offset += os.write(fd, view[offset:])
            os.fchmod(fd, (st.st_mode & 0o7777) if st is not None else DEFAULT_MODE)
            if st is not None:
                try:
                    os.fchown(fd, st.st_uid, st.st_gid)
                except PermissionError:
                    pass
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, real)
    except OSError as e:
        _unlink_quietly(tmp)
        if st is not None and e.errno in (errno.EBUSY, errno.EXDEV, errno.EPERM, errno.EACCES):
            # Not renamable (a mount point we did not see, or a sticky directory):
            # the file itself may still be writable.
            write_in_place(real, data)
            return "in place"
        raise
    _fsync_directory(directory)
    return "replaced" if st is not None else "created"


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
