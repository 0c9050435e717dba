"""``networkd check`` against a real etcd with prepared contents, and ``--file``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.daemon import Daemon
from tests.support.ports import free_port

VIP = json.dumps({"app": "web", "proc": "web", "ports": [{"src": 80, "proto": "tcp", "dest": 8080}]})
POD_GROUP = json.dumps({"Spec": {"Namespace": "web", "Name": "web.web.web"}, "Pods": [
    {"InstanceNo": 1, "Containers": [{"NodeName": "n1", "ContainerIp": "172.20.0.5", "NodeIp": "10.0.0.1"}]}]})


def check(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    d = Daemon([])
    return subprocess.run([sys.executable, "-m", "networkd", "check", *args], capture_output=True, text=True,
                          timeout=60, env=d.env, cwd=d.workdir, input=input)


def fill(etcd, root: str, keys: dict) -> None:
    for key, value in keys.items():
        etcd.put(root + key, value)


VALID = {
    "/config/vips/10.0.0.100": VIP,
    "/config/vips/0.0.0.0:8443": VIP,
    "/deployd/pod_groups/web/web.web.web": POD_GROUP,
    "/config/domains/a.lain": json.dumps({"ips": ["10.0.0.7"], "type": ""}),
    "/config/domains/*.apps.lain": json.dumps({"type": "node"}),
    "/config/domain_servers/lain": json.dumps({"servers": ["10.0.0.8#53"]}),
    "/deployd/leader": "10.0.0.9:9003",
    "/networkd/apps/tinydns/worker/10.0.0.8:53": "n1",
    "/networkd/leader": "n1",  # written by networkd: counted, not judged
}


def test_all_valid_exits_0(etcd_server, etcd_root):
    fill(etcd_server, etcd_root, VALID)
    result = check("--etcd", etcd_server.endpoint, "--etcd-root", etcd_root)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"VIP configs ({etcd_root}/config/vips/): 2 keys, all valid" in out
    assert f"DNS names ({etcd_root}/config/domains/): 2 keys, all valid" in out
    assert "INVALID" not in out
    assert f"summary: 8 keys checked, all valid (1 other keys under {etcd_root} not checked)" in out


def test_invalid_keys_are_listed_per_part_and_exit_1(etcd_server, etcd_root):
    fill(etcd_server, etcd_root, {
        **VALID,
        "/config/vips/10.0.0.300": VIP,
        "/config/vips/10.0.0.101": json.dumps({"app": "web", "proc": "web", "ports": []}),
        "/config/domains/b.lain": "{not json",
        "/config/domain_servers/x": json.dumps({"servers": ["nowhere"]}),
        "/deployd/pod_groups/web/bad": json.dumps({"Pods": []}),
        "/deployd/leader": "10.0.0.9",
    })
    result = check("--etcd", etcd_server.endpoint, "--etcd-root", etcd_root)
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert f"VIP configs ({etcd_root}/config/vips/): 4 keys, 2 invalid" in out
    assert f"  INVALID {etcd_root}/config/vips/10.0.0.300: key IP '10.0.0.300' is not an IPv4 address" in out
    assert f"  INVALID {etcd_root}/config/vips/10.0.0.101: ports must be a non-empty list" in out
    assert f"  INVALID {etcd_root}/config/domains/b.lain: bad JSON" in out
    assert f"  INVALID {etcd_root}/config/domain_servers/x: bad server 'nowhere' (want IP#PORT)" in out
    assert f"  INVALID {etcd_root}/deployd/pod_groups/web/bad: value has no Spec object" in out
    assert f"  INVALID {etcd_root}/deployd/leader: '10.0.0.9' is not IP:PORT" in out
    assert "summary: 13 keys checked, 6 invalid in 5 parts" in out

    as_json = json.loads(check("--etcd", etcd_server.endpoint, "--etcd-root", etcd_root, "--json").stdout)
    assert as_json["invalid"] == 6 and as_json["revision"] > 0
    vips = next(p for p in as_json["parts"] if p["part"] == "vip")
    assert {i["key"] for i in vips["invalid"]} == {f"{etcd_root}/config/vips/10.0.0.300", f"{etcd_root}/config/vips/10.0.0.101"}


def test_etcd_unreadable_exits_2(private_etcd, etcd_root):
    fill(private_etcd, etcd_root, VALID)
    assert check("--etcd", private_etcd.endpoint, "--etcd-root", etcd_root).returncode == 0
    private_etcd.stop()
    result = check("--etcd", private_etcd.endpoint, "--etcd-root", etcd_root, "--timeout", "5")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith(f"networkd check: cannot read etcd {private_etcd.endpoint}")
    # A port where nothing listens at all, and a usage error, are 2 as well.
    assert check("--etcd", f"http://127.0.0.1:{free_port()}", "--timeout", "5").returncode == 2
    bad = check("--etcd", "ftp://x")
    assert bad.returncode == 2 and bad.stderr.startswith("networkd check: error: --etcd")


@pytest.mark.parametrize("args,value,code,words", [
    (["--key", "/lain/config/vips/10.0.0.5"], VIP, 0, "valid vip value for /lain/config/vips/10.0.0.5"),
    (["--key", "/lain/config/vips/10.0.0.500"], VIP, 1, "key IP '10.0.0.500' is not an IPv4 address"),
    (["--kind", "vip"], '{"app": "a"}', 1, "INVALID vip value for 192.0.2.10"),
    (["--kind", "domain", "--key", "a.lain"], '{"ips": ["10.1.1.1"]}', 0, "valid domain value for a.lain"),
    (["--key", "/lain/config/domains/a.lain"], '{"ips": ["x"]}', 1, "bad IP 'x'"),
    (["--kind", "podgroup"], POD_GROUP, 0, "valid podgroup value"),
    (["--key", "/lain/config/domain_servers/lain"], '{"servers": []}', 1, "no servers"),
])
def test_file_checks_one_value_before_it_is_written(tmp_path, args, value, code, words):
    path = tmp_path / "value.json"
    path.write_text(value)
    result = check("--file", str(path), *args)
    assert result.returncode == code, result.stdout + result.stderr
    assert words in result.stdout
    from_stdin = check("--file", "-", *args, input=value)
    assert (from_stdin.returncode, from_stdin.stdout) == (result.returncode, result.stdout)


def test_file_usage_errors_exit_2(tmp_path):
    path = tmp_path / "value.json"
    path.write_text(VIP)
    assert check("--file", str(path)).returncode == 2, "the kind must be known"
    wrong = check("--file", str(path), "--kind", "domain", "--key", "/lain/config/vips/10.0.0.5")
    assert wrong.returncode == 2 and "is a vip key, not a domain key" in wrong.stderr
    assert check("--file", str(tmp_path / "missing.json"), "--kind", "vip").returncode == 2
    assert check("--file", str(path), "--key", "/elsewhere/x").returncode == 2
