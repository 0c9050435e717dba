"""Replacing resolv.conf: atomically, through symlinks, in place on bind mounts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from networkd.atomicfile import _unescape, replace_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_regular_file_is_replaced_by_rename_keeping_mode(tmp_path):
    path = tmp_path / "resolv.conf"
    path.write_text("old\n")
    os.chmod(path, 0o600)
    before = os.stat(path).st_ino
    assert replace_file(str(path), b"new\n") == "replaced"
    assert path.read_text() == "new\n"
    assert os.stat(path).st_ino != before, "a new inode: readers never see a half-written file"
    assert os.stat(path).st_mode & 0o7777 == 0o600
    assert os.listdir(tmp_path) == ["resolv.conf"]


def test_missing_file_is_created(tmp_path):
    assert replace_file(str(tmp_path / "new.conf"), b"x\n") == "created"
    assert os.stat(tmp_path / "new.conf").st_mode & 0o7777 == 0o644


def test_symlink_stays_a_symlink(tmp_path):
    target = tmp_path / "target.conf"
    target.write_text("old\n")
    link = tmp_path / "link.conf"
    os.symlink("target.conf", link)
    replace_file(str(link), b"new\n")
    assert os.readlink(link) == "target.conf"
    assert target.read_text() == "new\n"


def test_mountinfo_escapes():
    assert _unescape(r"/tmp/with\040space") == "/tmp/with space"
    assert _unescape("/etc/resolv.conf") == "/etc/resolv.conf"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_bind_mounted_file_is_written_in_place(tmp_path):
    source = tmp_path / "host-resolv.conf"
    source.write_text("nameserver 10.0.0.2\n")
    target = tmp_path / "resolv.conf"
    target.write_text("placeholder\n")
    script = textwrap.dedent(f"""
        import os, subprocess
        from networkd.atomicfile import is_mount_point, replace_file
        subprocess.run(["mount", "--bind", {str(source)!r}, {str(target)!r}], check=True)
        print(replace_file({str(target)!r}, b"nameserver 127.0.0.1\\nnameserver 10.0.0.2\\n"))
        print(is_mount_point({str(target)!r}))
    """)
    # A private mount namespace: the bind mount vanishes with the process.
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script],
        capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": REPO},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["in", "place", "True"], "the bind mount is not broken"
    assert source.read_text() == "nameserver 127.0.0.1\nnameserver 10.0.0.2\n", "written through to the mounted file"
    assert target.read_text() == "placeholder\n"
