"""``--log-format json``: one JSON object per line, with the VIP, key or upstream as fields."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import dnslib
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from networkd.logjson import event_as_dict, format_fields, json_line
from tests.support.daemon import Daemon
from tests.support.ports import free_port
from tests.test_daemon import twistd


def event(namespace: str, fmt: str, **fields) -> dict:
    return {"log_namespace": namespace, "log_format": fmt, "log_level": LogLevel.warn, "log_time": 1700000000.25,
            "log_logger": object(), "log_source": None, **fields}


def test_fields_of_the_call_are_fields_of_the_line():
    line = event_as_dict(event("networkd.vips.locks", "lost the lock of VIP {ip}: {why}", ip="10.0.0.5",
                               why="lease gone"))
    assert line == {"time": "2023-11-14T22:13:20.250Z", "level": "warn", "logger": "networkd.vips.locks",
                    "message": "lost the lock of VIP 10.0.0.5: lease gone", "ip": "10.0.0.5", "vip": "10.0.0.5",
                    "why": "lease gone", "error": "lease gone"}
    upstream = event_as_dict(event("networkd.dns.health", "DNS upstream {server} does not answer", server="10.0.0.2:53"))
    assert upstream["upstream"] == "10.0.0.2:53"
    # ErrorLog passes the key without naming it in the text: still a field.
    skipped = event_as_dict(event("networkd.vips.inputs", "VIP config skipped: {error}", key="/lain/config/vips/x",
                                  error="/lain/config/vips/x: bad"))
    assert skipped["key"] == "/lain/config/vips/x" and skipped["error"] == "/lain/config/vips/x: bad"
    assert "vip" not in skipped
    assert format_fields("{lease:x} {e.errno} {a[0]} {{literal}}") == ["lease", "e", "a"]


def test_objects_and_failures():
    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    line = json.loads(json_line(event("networkd.app", "stopping {name} failed", name=object(), log_failure=failure,
                                      extra=object())))
    assert line["name"].startswith("<object object"), "a named object is shown as text"
    assert "extra" not in line, "an unnamed object is left out"
    assert "ZeroDivisionError" in line["traceback"] and line["error"] == "division by zero"
    assert json_line(event("x", "one\nline")).count("\n") == 1


def test_bad_log_format_exits_2():
    result = twistd("--no-vips", "--no-dns", "--no-resolv-conf", "--log-format", "yaml")
    assert result.returncode == 2
    assert "--log-format: 'yaml' is not one of text, json" in result.stderr


def test_daemon_logs_json_lines_with_fields(etcd_server, etcd_root, tmp_path):
    etcd_server.put(f"{etcd_root}/config/domains/bad.lain", "{nope")
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))  # an upstream that never answers
    quiet_upstream = f"127.0.0.1:{silent.getsockname()[1]}"
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    hosts = tmp_path / "hosts"
    hosts.write_text("")
    dns = free_port()
    daemon = Daemon(["--etcd", etcd_server.endpoint, "--etcd-root", etcd_root, "--no-vips", "--node-ip", "10.1.2.3",
                     "--dns-listen", f"127.0.0.1:{dns}", "--api-listen", f"127.0.0.1:{free_port()}",
                     "--resolv-conf", str(resolv), "--no-resolv-conf", "--hosts-file", str(hosts),
                     "--log-format", "json"]).start()
    try:
        daemon.wait_for_log('"message": "networkd started')
        # Names under quiet.test are forwarded to the silent socket only (a forwarding zone takes IP#PORT).
        etcd_server.put(f"{etcd_root}/config/domain_servers/quiet.test",
                        json.dumps({"servers": [f"127.0.0.1#{silent.getsockname()[1]}"]}))
        time.sleep(0.5)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(3)
            for n in range(4):
                client.sendto(dnslib.DNSRecord.question(f"n{n}.quiet.test").pack(), ("127.0.0.1", dns))
                try:
                    client.recv(512)
                except socket.timeout:
                    pass
        time.sleep(0.5)
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        silent.close()
    lines = [json.loads(line) for line in daemon.log().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert lines[0]["logger"].startswith("twisted."), "twistd's own first line is JSON too"
    started = next(line for line in lines if line["message"].startswith("networkd started"))
    assert started["ip"] == "10.1.2.3" and started["root"] == etcd_root and started["level"] == "info"
    ignored = next(line for line in lines if line.get("key") == f"{etcd_root}/config/domains/bad.lain")
    assert ignored["level"] == "warn" and "bad JSON" in ignored["reason"]
    assert not [line for line in lines if line["level"] == "debug"], "no debug lines without --verbose"
    quiet = [line for line in lines if line.get("upstream") == quiet_upstream]
    assert quiet and quiet[0]["logger"] == "networkd.dns.health", [line["message"] for line in lines]
