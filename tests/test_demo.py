"""``make demo-check``: the VIP demo's scenario without a person, as CI runs it (root, namespaces)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_make_demo_check(privileged):
    result = subprocess.run(["make", "-s", "demo-check"], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-3000:]
    for line in ("ok   VIP 10.77.0.100 answers curl from the client: hello from the container on n",
                 "ok   VIP 10.77.0.101 is on another node",
                 "ok   dig @127.0.0.1 hello.lain on n3",
                 "ok   /v1/vips of every node names",
                 "ok   SIGKILL of n", "ok   no namespace ndm", "ok   no daemon, container server or etcd process left",
                 "ok   the host's iptables rules are unchanged"):
        assert line in out, out
    assert "demo-check: 12 passed, 0 failed" in out
    took = float(out.split("answered from n", 1)[1].split(" after ", 1)[1].split("s\n", 1)[0])
    assert took < 10, "a SIGKILLed holder's VIP moves within the lease TTL and a few ticks"


def test_without_root_the_vip_demo_says_so_and_steps_aside():
    """Exit status 3 tells scripts/demo.sh to run the DNS-only demo instead."""
    setpriv = shutil.which("setpriv")
    cmd = [sys.executable, os.path.join(REPO, "scripts/demo_vips.py"), "--check"]
    if os.geteuid() == 0:
        assert setpriv, "setpriv (util-linux) runs the demo as nobody"
        cmd = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "the VIP demo needs network namespaces: needs root" in result.stderr
