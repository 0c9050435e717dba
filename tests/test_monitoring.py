"""packaging/monitoring: the alerting rules pass promtool, and every metric the rules and
the dashboard use is one a running networkd exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon import Daemon
from tests.support.privileges import REQUIRE
from tests.support.vipnodes import Cluster, vip_value

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MONITORING = os.path.join(REPO, "packaging/monitoring")
RULES = os.path.join(MONITORING, "networkd-alerts.yml")
RULE_TESTS = os.path.join(MONITORING, "networkd-alerts.test.yml")
DASHBOARD = os.path.join(MONITORING, "networkd-dashboard.json")
METRIC = re.compile(r"\bnetworkd_[a-z0-9_]+\b")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if REQUIRE or os.environ.get("CI") == "true":
            pytest.fail("promtool is missing (Debian package prometheus); scripts/install-deps.sh installs it")
        pytest.skip("promtool is missing (Debian package prometheus)")
    return found


def test_promtool_check_rules():
    result = subprocess.run([promtool(), "check", "rules", RULES], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 10 rules found" in result.stdout


def test_promtool_test_rules():
    result = subprocess.run([promtool(), "test", "rules", RULE_TESTS], capture_output=True, text=True, timeout=120,
                            cwd=MONITORING)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_the_issue_names_is_there_and_tested():
    rules = yaml.safe_load(open(RULES))["groups"][0]["rules"]
    names = {rule["alert"] for rule in rules}
    assert {"NetworkdVipUnheld", "NetworkdVipTwoHolders", "NetworkdVipFenced", "NetworkdEtcdDisconnected",
            "NetworkdLeaseKeepaliveLate", "NetworkdDnsServfailRatio", "NetworkdDnsUpstreamSlow",
            "NetworkdResolvConfUndone"} <= names
    tests = yaml.safe_load(open(RULE_TESTS))["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    # Every alert fires in some test case (a lifetime violation is shown not to fire on a flat counter).
    assert names - tested <= {"NetworkdVipLifetimeViolation"}, names - tested
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def dashboard_exprs() -> list[str]:
    dash = json.load(open(DASHBOARD))
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_dashboard_is_importable_json():
    dash = json.load(open(DASHBOARD))
    assert dash["title"] == "networkd" and dash["uid"] == "networkd"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    graphs = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(graphs) >= 12
    for p in graphs:
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        for target in p["targets"]:
            assert METRIC.search(target["expr"]), target


def used_metrics() -> set[str]:
    rules = yaml.safe_load(open(RULES))["groups"][0]["rules"]
    found = {m for rule in rules for m in METRIC.findall(rule["expr"])}
    found |= {m for expr in dashboard_exprs() for m in METRIC.findall(expr)}
    return found


def exported_names(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names |= {sample.name for sample in family.samples}
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
    return names


def test_rules_and_dashboard_use_only_metrics_networkd_exports(lan, etcd_server, etcd_root, tmp_path):
    """A daemon with every part on (VIPs, DNS, resolv.conf, a lease) in a namespace node; its /metrics."""
    cluster = Cluster(lan, etcd_server, etcd_root, "nft")
    node = cluster.add("n1", 11)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 10.77.0.200\n")
    hosts = tmp_path / "hosts"
    hosts.write_text("")
    args = [a for a in node.args() if a not in ("--no-dns", "--no-resolv-conf")]
    args += ["--dns-listen", "127.0.0.1:53", "--resolv-conf", str(resolv), "--no-resolv-conf",
             "--hosts-file", str(hosts)]
    cluster.put_vip("10.77.0.100", vip_value("hello", "web", [{"src": 80, "proto": "tcp", "dest": 8080}]))
    cluster.put_pods("hello", "web", [(1, "n1", "172.30.0.5")])
    daemon = node.daemon = Daemon(args, netns=node.ns.name).start()
    try:
        daemon.wait_for_log("DNAT rules in place", timeout=20)
        deadline = time.monotonic() + 15
        while True:
            text = node.ns.run("curl", "-sS", "--max-time", "3", "http://127.0.0.1:3000/metrics", check=False).stdout
            names = exported_names(text) if text else set()
            if "networkd_etcd_keepalive_age_seconds" in names or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert 'networkd_vip_active{app="hello",proc="web",vip="10.77.0.100"}' in text, text
        missing = used_metrics() - names
        assert not missing, f"used by packaging/monitoring but not exported: {sorted(missing)}"
        assert len(used_metrics()) >= 15
    finally:
        cluster.close()
