"""``networkd status`` against a running daemon, and its table from prepared data."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from networkd.api.vipstatus import add_held_for
from networkd.tools.table import render
from tests.support.daemon import Daemon
from tests.support.ports import free_port


def status(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    d = Daemon([])
    return subprocess.run([sys.executable, "-m", "networkd", "status", *args], capture_output=True, text=True,
                          timeout=timeout, env=d.env, cwd=d.workdir)


@pytest.fixture
def running(private_etcd, etcd_root, tmp_path):
    private_etcd.put(f"{etcd_root}/config/domains/bad.lain", "{nope")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    hosts = tmp_path / "hosts"
    hosts.write_text("10.7.7.7 fromhosts.example\n")
    api, dns = free_port(), free_port()
    daemon = Daemon(["--etcd", private_etcd.endpoint, "--etcd-root", etcd_root, "--no-vips", "--node-ip", "10.1.2.3",
                     "--hostname", "node-s", "--deployd", "--dns-listen", f"127.0.0.1:{dns}",
                     "--api-listen", f"127.0.0.1:{api}", "--resolv-conf", str(resolv), "--no-resolv-conf",
                     "--hosts-file", str(hosts)]).start()
    daemon.wait_for_log(f"HTTP API listening on http://127.0.0.1:{api}/")
    daemon.wait_for_log("leader", timeout=15)
    yield SimpleNamespace(daemon=daemon, api=api, dns=dns, etcd=private_etcd, root=etcd_root)
    daemon.stop()


def test_status_of_a_running_daemon(running):
    deadline = time.monotonic() + 10
    while True:
        result = status("--api", f"127.0.0.1:{running.api}")
        if "holder  node-s (this node)" in result.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.startswith(f"networkd on node-s (node IP 10.1.2.3), API http://127.0.0.1:{running.api}, ")
    assert "\nhealth: ok\n" in out
    assert f"  endpoint  {running.etcd.endpoint} (connected, 0 fail-overs)" in out
    assert "watches   " in out and "all live" in out
    assert "  lease     " in out and "TTL 3s" in out
    assert f"  listen       127.0.0.1:{running.dns} (listening)" in out
    assert "  upstreams    127.0.0.1:53" in out
    assert "  cache        0 hits, 0 misses" in out
    assert "VIPs\n  off (--no-vips)" in out
    assert "  holder  node-s (this node)\n  tasks   deployd" in out
    assert f"invalid keys: 1\n  dns     {running.root}/config/domains/bad.lain: bad JSON" in out

    data = json.loads(status("--api", f"127.0.0.1:{running.api}", "--json").stdout)
    assert data["status"]["hostname"] == "node-s" and data["health"] == {"ok": True, "problems": []}
    assert data["dns_figures"]["cache_hits"] == 0 and data["vips"] == []


def test_status_exit_codes_unhealthy_and_unreachable(running):
    running.etcd.stop()
    deadline = time.monotonic() + 15
    while True:
        result = status("--api", f"127.0.0.1:{running.api}")
        if result.returncode == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "health: UNHEALTHY\n  - etcd watch of" in result.stdout
    assert "(NOT CONNECTED" in result.stdout

    running.daemon.stop()
    gone = status("--api", f"127.0.0.1:{running.api}")
    assert gone.returncode == 2 and gone.stdout == ""
    assert gone.stderr.startswith("networkd status: the networkd API does not answer: ")
    assert status("--api", "nowhere").returncode == 2


def test_watch_redraws_until_ctrl_c(running):
    d = Daemon([])
    # Ctrl-C as at a terminal: a suite started in the background (``make test &``) passes SIGINT on ignored,
    # and Python then raises no KeyboardInterrupt for it.
    watch = subprocess.Popen([sys.executable, "-m", "networkd", "status", "--api", f"127.0.0.1:{running.api}",
                              "--watch", "--interval", "0.3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=d.env, cwd=d.workdir,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        time.sleep(2.5)
        watch.send_signal(signal.SIGINT)
        out, err = watch.communicate(timeout=10)
    finally:
        if watch.poll() is None:
            watch.kill()
    assert watch.returncode == 0, err
    assert out.count("networkd on node-s") >= 3, out
    assert "\x1b[" not in out, "no terminal codes when the output is not a terminal"


def test_vip_table_reads_like_a_report():
    data = {
        "api": "http://127.0.0.1:3000",
        "health": {"ok": False, "problems": ["etcd lease keep-alive not acknowledged for 4.0s (TTL 3s)"]},
        "dns_figures": {"cache_hits": 30, "cache_misses": 10, "queries": {"NOERROR": 38, "SERVFAIL": 2}},
        "status": {"hostname": "n1", "node_ip": "10.0.0.1", "etcd": {"endpoint": "http://e:2379", "connected": True,
                   "failovers": 1, "prefixes": []}, "session": None, "invalid_keys": [], "upstreams": ["10.0.0.2:53"],
                   "dns": {"listen": "127.0.0.1:53", "listening": True}, "resolv_conf": None,
                   "vips": {"held": 1}, "leader": None},
        "vips": [
            {"key": "10.0.0.100", "ip": "10.0.0.100", "floating": True, "app": "web", "proc": "web", "holder": "n1",
             "held_by_me": True, "active": True, "held_for": 754.0, "last_error": None,
             "health": {"here": "healthy", "probes": ["tcp 172.20.0.5:8080"], "error": None}},
            {"key": "10.0.0.101", "ip": "10.0.0.101", "floating": True, "app": "web", "proc": "web", "holder": "n2",
             "held_by_me": False, "active": False, "held_for": None, "last_error": None},
            {"key": "0.0.0.0:8443", "ip": "0.0.0.0", "floating": False, "app": "api", "proc": "web", "holder": None,
             "held_by_me": False, "active": False, "held_for": None, "last_error": "firewall: iptables-restore failed"},
            {"key": "10.0.0.300", "error": "key IP '10.0.0.300' is not an IPv4 address"},
        ],
    }
    text = render(data, now=0)
    assert "health: UNHEALTHY\n  - etcd lease keep-alive not acknowledged" in text
    assert "  cache      30 hits, 10 misses, 75% hits" in text
    assert "  queries    40 (NOERROR 38, SERVFAIL 2)" in text
    table = text.split("VIPs\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert table[0] == "  1 held here, 4 configured"
    assert table[1].split() == ["KEY", "APP/PROC", "HOLDER", "HERE", "HEALTH", "SINCE", "ERROR"]
    assert table[2].split() == ["10.0.0.100", "web/web", "n1", "active", "healthy", "12m34s"]
    assert table[3].split() == ["10.0.0.101", "web/web", "n2", "no", "-", "-"]
    assert table[4].split()[:6] == ["0.0.0.0:8443", "api/web", "(DNAT)", "no", "-", "-"]
    assert table[4].endswith("firewall: iptables-restore failed")
    assert "invalid: key IP '10.0.0.300'" in table[5]
    assert len({line.index("APP/PROC") for line in table[1:2]}) == 1
    assert "  election  not a candidate (no leader task)" in text


def test_api_tells_how_long_each_vip_has_been_held():
    records = {"10.0.0.100": SimpleNamespace(acquired_at=100.0)}
    manager = SimpleNamespace(locks=SimpleNamespace(records=records))
    entries = [{"ip": "10.0.0.100", "held_by_me": True}, {"ip": "10.0.0.101", "held_by_me": False},
               {"key": "bad", "error": "x"}]
    assert add_held_for(entries, manager, now=142.26) == [
        {"ip": "10.0.0.100", "held_by_me": True, "held_for": 42.3},
        {"ip": "10.0.0.101", "held_by_me": False, "held_for": None},
        {"key": "bad", "error": "x"},
    ]
