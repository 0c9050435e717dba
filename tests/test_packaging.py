"""The RPM operators install: built with packaging/rpm/build.sh, unpacked
(not installed: this machine's /opt and systemd stay untouched) and run.

Debian's `rpm` package brings rpmbuild; it has no RPM database, so the
build runs with --nodeps and the venv is made from the interpreter running
these tests.  The build pip-installs the dependencies from PyPI (about a
minute).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

import pytest

import networkd
from tests.support.privileges import REQUIRE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = "/opt/networkd"


@pytest.fixture(scope="module")
def rpm(tmp_path_factory):
    if not (shutil.which("rpmbuild") and shutil.which("rpm2archive")):
        if REQUIRE:
            pytest.fail("rpmbuild is missing (Debian package rpm); scripts/install-deps.sh installs it")
        pytest.skip("rpmbuild is missing (Debian package rpm)")
    if subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("build.sh packs `git archive HEAD`: not a git checkout")
    out = tmp_path_factory.mktemp("rpms")
    python = getattr(sys, "_base_executable", sys.executable)
    build = subprocess.run(
        ["bash", os.path.join(REPO, "packaging/rpm/build.sh"), "--nodeps", "--define", f"python3_bin {python}"],
        env={**os.environ, "OUT": str(out)}, capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    binary = [p for p in os.listdir(out) if p.endswith(".rpm") and not p.endswith(".src.rpm")]
    assert len(binary) == 1, os.listdir(out)
    path = str(out / binary[0])
    root = tmp_path_factory.mktemp("payload")
    with tempfile.TemporaryFile() as archive:
        with open(path, "rb") as package:
            subprocess.run(["rpm2archive", "-"], stdin=package, stdout=archive, check=True)
        archive.seek(0)
        with tarfile.open(fileobj=archive, mode="r:gz") as tar:
            tar.extractall(root, filter="tar")
    return path, str(root)


CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def rpm_query(path: str, *what: str) -> list:
    return subprocess.run(["rpm", "-qp", *what, path], capture_output=True, text=True, check=True).stdout.split("\n")


@pytest.mark.timeout(600)  # the module fixture builds the RPM: minutes on a loaded host
def test_package_holds_the_daemon_unit_and_config(rpm):
    path, _ = rpm
    files = rpm_query(path, "-l")
    for wanted in (f"{VENV}/bin/twistd", "/usr/bin/networkd", "/usr/lib/systemd/system/networkd.service",
                   "/etc/sysconfig/networkd"):
        assert wanted in files, wanted
    assert "/etc/sysconfig/networkd" in rpm_query(path, "-c"), "an operator's options survive upgrades"
    assert "/usr/share/doc/networkd/README.md" in files, "the unit's Documentation="
    assert rpm_query(path, "--queryformat", "%{VERSION}")[0] == networkd.__version__
    requires = rpm_query(path, "--requires")
    assert {"iproute", "iptables"} <= set(requires)


def test_packaged_daemon_runs_from_its_venv(rpm):
    _, root = rpm
    venv = root + VENV
    with open(os.path.join(venv, "bin/twistd")) as f:
        assert f.readline().startswith(f"#!{VENV}/bin/python"), "scripts point at the installed venv"
    with open(os.path.join(root, "usr/lib/systemd/system/networkd.service")) as f:
        exec_start = re.search(r"^ExecStart=(\S+)", f.read(), re.M)[1]
    assert os.path.exists(root + exec_start), exec_start
    with open(root + exec_start) as f:
        assert f.readline().startswith(f"#!{VENV}/bin/python"), "the unit's program runs on the venv"
    unit_help = subprocess.run([os.path.join(venv, "bin/python"), root + exec_start, "--help"],
                               capture_output=True, text=True, timeout=60, cwd=root, env=CLEAN_ENV)
    assert unit_help.returncode == 0 and "--dns-listen" in unit_help.stdout, unit_help.stderr
    python = os.path.join(venv, "bin/python")
    shown = subprocess.run([python, os.path.join(venv, "bin/twistd"), "networkd", "--help"],
                           capture_output=True, text=True, timeout=60, cwd=root, env=CLEAN_ENV)
    assert shown.returncode == 0, shown.stderr
    assert "--etcd" in shown.stdout and "--dns-listen" in shown.stdout
    imported = subprocess.run([python, "-c", "import networkd, aetcd, pyroute2, iptc; print(networkd.__file__)"],
                              capture_output=True, text=True, timeout=60, cwd=root, env=CLEAN_ENV)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip().startswith(venv + "/lib/"), "the venv's own copy, not the checkout"
    bad = subprocess.run([python, os.path.join(venv, "bin/twistd"), "networkd", "--dns-ttl", "x"],
                         capture_output=True, text=True, timeout=60, cwd=root, env=CLEAN_ENV)
    assert bad.returncode == 2 and "--dns-ttl" in bad.stderr


def test_no_file_names_the_build_root(rpm):
    """rpmbuild's check-buildroot on RHEL fails a package whose files mention it."""
    _, root = rpm
    offenders = []
    for directory, _, names in os.walk(root):
        for name in names:
            full = os.path.join(directory, name)
            if os.path.islink(full):
                continue
            with open(full, "rb") as f:
                if b"/BUILDROOT/" in f.read():
                    offenders.append(os.path.relpath(full, root))
    assert offenders == []
