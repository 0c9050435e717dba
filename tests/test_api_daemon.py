"""The API of a real daemon (``twistd -n networkd``), asked with curl."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.support.daemon import Daemon
from tests.support.ports import free_port
from tests.support.waiting import wait_until


def curl(port: int, path: str) -> tuple[int, bytes]:
    """(status, body) of a GET, with the real curl."""
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "5", "-w", "\n%{http_code}", f"http://127.0.0.1:{port}{path}"],
        capture_output=True, timeout=10,
    )
    assert result.returncode == 0, result.stderr
    body, _, code = result.stdout.rpartition(b"\n")
    return int(code), body


@pytest.fixture
def daemon_factory(tmp_path):
    daemons = []

    def make(args):
        daemon = Daemon(args).start()
        daemons.append(daemon)
        return daemon

    yield make
    for daemon in daemons:
        daemon.stop()


def test_daemon_api_with_curl(private_etcd, etcd_root, tmp_path, daemon_factory):
    port = free_port()
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 10.0.0.2\n")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    daemon = daemon_factory([
        "--etcd", private_etcd.endpoint, "--etcd-root", etcd_root, "--node-ip", "10.1.2.3",
        "--no-vips", "--no-dns", "--no-resolv-conf", "--api-listen", f"127.0.0.1:{port}",
        "--resolv-conf", str(resolv), "--hosts-file", str(hosts),
    ])
    daemon.wait_for_log(f"HTTP API listening on http://127.0.0.1:{port}/")

    code, body = curl(port, "/v1/dns/config")
    assert (code, body) == (200, b"# exact domains\n\n# wildcard domains\n\n# domain servers (tinydns)\n"
                                 b"\n# name servers (synchronized with /etc/resolv.conf)\n")
    code, body = curl(port, "/v1/status")
    assert code == 200
    status = json.loads(body)
    assert status["etcd"]["connected"] is True and status["dns"] is None
    assert curl(port, "/healthz") == (200, b"ok\n")
    assert curl(port, "/nothing")[0] == 404

    private_etcd.stop()
    code, body = wait_until(lambda: (r := curl(port, "/healthz"))[0] == 503 and r, 10, interval=0.1,
                            message="/healthz 503")
    assert b"does not answer" in body
    assert daemon.running(), "losing etcd is not a reason to exit"
    assert resolv.read_text() == "nameserver 10.0.0.2\n", "--no-resolv-conf: the file is not touched"
    assert daemon.stop() == 0, daemon.log()
    assert "Server Shut Down." in daemon.log()
