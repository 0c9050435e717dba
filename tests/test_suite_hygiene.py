"""The suite leaves nothing behind in the temporary directory, even when a test fails."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support.daemon import REPO

A_TEST = '''
import tempfile

from tests.support.daemon import Daemon


def test_makes_work_directories():
    daemon = Daemon(["--help"])
    open(daemon.log_path, "w").write("a log read after the daemon stopped")
    tempfile.mkdtemp(prefix="networkd-dns-")


def test_fails_after_making_one():
    tempfile.mkdtemp(prefix="networkd-leader-")
    assert False, "a failing test"
'''


def test_a_run_removes_its_temporary_files(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    tests_dir = tmp_path / "case"
    tests_dir.mkdir()
    (tests_dir / "test_case.py").write_text(A_TEST)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
         "--rootdir", str(tests_dir), str(tests_dir / "test_case.py")],
        cwd=REPO, env={**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": REPO},
        capture_output=True, text=True, timeout=120,
    )
    assert "1 failed, 1 passed" in run.stdout, run.stdout + run.stderr
    assert os.listdir(scratch) == [], "left behind: " + ", ".join(sorted(os.listdir(scratch)))
