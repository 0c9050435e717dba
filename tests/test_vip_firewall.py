"""Firewall: rule rendering and parsing, the restore back end on a real namespace, the driver."""

from __future__ import annotations

import subprocess
import uuid

import pytest
from twisted.internet import defer, task

from networkd.vips import firewall as fw
from networkd.vips.firewall.rules import NatRule, nat_rules, parse_rule, parse_save, render_restore
from networkd.vips.planner import DnatRule
from networkd.vips.reconciler import fencing_margin

WEB = DnatRule("10.0.0.5", "10.0.0.5", "tcp", 80, "172.20.0.5", 8080)
DNS = DnatRule("0.0.0.0:53", "10.9.0.1", "udp", 53, "172.20.0.6", 5353)


def test_each_dnat_is_a_prerouting_and_a_local_output_rule():
    assert nat_rules([WEB]) == [
        NatRule("lain-OUTPUT", "10.0.0.5", "tcp", 80, "172.20.0.5", 8080, "10.0.0.5", True),
        NatRule("lain-PREROUTING", "10.0.0.5", "tcp", 80, "172.20.0.5", 8080, "10.0.0.5", False),
    ]


def test_restore_text_replaces_our_chains_and_adds_missing_jumps_first():
    text = render_restore(nat_rules([WEB]), ["PREROUTING"])
    assert text.splitlines() == [
        "*nat",
        ":lain-PREROUTING - [0:0]",
        ":lain-OUTPUT - [0:0]",
        "-I PREROUTING 1 -j lain-PREROUTING",
        "-A lain-OUTPUT -d 10.0.0.5/32 -o lo -p tcp -m tcp --dport 80 -m comment --comment 10.0.0.5 "
        "-j DNAT --to-destination 172.20.0.5:8080",
        "-A lain-PREROUTING -d 10.0.0.5/32 -p tcp -m tcp --dport 80 -m comment --comment 10.0.0.5 "
        "-j DNAT --to-destination 172.20.0.5:8080",
        "COMMIT",
    ]


def test_parse_is_exact_bug18():
    line = ('-A lain-PREROUTING -d 110.0.0.5/32 -p tcp -m tcp --dport 80 -m comment --comment "110.0.0.5" '
            '-j DNAT --to-destination 172.20.0.5:8080')
    assert parse_rule(line).ip == "110.0.0.5"
    assert parse_rule("-A lain-PREROUTING -d 10.0.0.5/32 -p tcp -j ACCEPT") is None
    assert parse_rule("-A DOCKER -d 10.0.0.5/32 -j RETURN") is None


def test_save_output_round_trips_and_foreign_lines_force_a_rewrite():
    rules = nat_rules([WEB, DNS])
    body = [line for line in render_restore(rules, []).splitlines() if line.startswith("-A")]
    save = "\n".join(["*nat", ":PREROUTING ACCEPT [0:0]", ":lain-PREROUTING - [0:0]", ":lain-OUTPUT - [0:0]",
                      "-A PREROUTING -j lain-PREROUTING", "-A OUTPUT -j lain-OUTPUT", *body, "COMMIT"])
    state = parse_save(save)
    assert state.matches(rules)
    assert not state.matches(nat_rules([WEB]))
    foreign = parse_save(save + "\n-A lain-OUTPUT -j ACCEPT\n")
    assert foreign.foreign == 1 and not foreign.matches(rules)
    assert parse_save("*nat\nCOMMIT\n").missing_jumps == ["PREROUTING", "OUTPUT"]


def test_xtables_lock_is_retried_on_exit_status_4_only_bug21():
    calls = []

    def run(argv, **kw):
        calls.append(argv)
        code = 4 if len(calls) < 3 else 0
        return subprocess.CompletedProcess(argv, code, "", "Another app is currently holding the xtables lock")

    backend = fw.NftRestoreBackend(run=run, sleep=lambda s: None)
    backend.write(nat_rules([WEB]), [])
    assert len(calls) == 3

    def broken(argv, **kw):
        return subprocess.CompletedProcess(argv, 2, "", "iptables-restore: line 4 failed")

    with pytest.raises(fw.FirewallError, match="line 4 failed"):
        fw.NftRestoreBackend(run=broken, sleep=lambda s: None).write([], [])


def test_backend_detection():
    def version(text):
        return lambda argv, **kw: subprocess.CompletedProcess(argv, 0, text, "")

    assert fw.detect_backend("auto", version("iptables v1.8.9 (nf_tables)\n")) == "nft"
    assert fw.detect_backend("auto", version("iptables v1.8.4 (legacy)\n")) == "legacy"
    assert fw.detect_backend("legacy", version("iptables v1.8.9 (nf_tables)\n")) == "legacy"


@pytest.fixture
def netns(privileged):
    name = f"ndfw{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name])


def test_restore_backend_against_real_iptables_nft(netns):
    def run(argv, **kw):
        return subprocess.run(["ip", "netns", "exec", netns, *argv], **kw)

    backend = fw.NftRestoreBackend(run=run)
    state = backend.read()
    assert state.missing_jumps == ["PREROUTING", "OUTPUT"]
    backend.write(nat_rules([WEB, DNS]), state.missing_jumps)
    state = backend.read()
    assert state.matches(nat_rules([WEB, DNS])), state
    changed = DnatRule("10.0.0.5", "10.0.0.5", "udp", 80, "172.20.0.7", 80)
    backend.write(nat_rules([changed]), state.missing_jumps)
    state = backend.read()
    assert state.matches(nat_rules([changed])), "old dest/proto/container IP leave nothing behind"
    saved = run(["iptables-nft-save", "-t", "nat"], capture_output=True, text=True).stdout
    assert saved.count("-j lain-PREROUTING") == 1 and saved.count("-j lain-OUTPUT") == 1


def test_driver_retries_failures_and_applies_the_newest_state():
    clock = task.Clock()
    desired = {"rules": frozenset([WEB])}

    class Backend:
        name = "fake"
        fail = 1
        written: list = []

        def read(self):
            return fw.ChainState([], [], [], 0)

        def write(self, rules, jumps):
            if self.fail:
                self.fail -= 1
                raise fw.FirewallError("xtables lock still held")
            self.written.append(rules)

    backend = Backend()
    driver = fw.Firewall(clock, backend, lambda: desired["rules"], to_thread=lambda f, *a: defer.maybeDeferred(f, *a))
    results = []
    driver.sync().addCallback(results.append)
    assert results == [False] and driver.last_error == "xtables lock still held"
    desired["rules"] = frozenset([WEB, DNS])
    clock.advance(10)  # the retry, with the newest desired state
    assert backend.written == [nat_rules([WEB, DNS])] and driver.applied == {WEB, DNS}
    assert driver.last_error is None


@pytest.mark.parametrize("ttl, fence_after", [(2, 1.5), (3, 2.25), (10, 7.5)])
def test_fencing_margin(ttl, fence_after):
    assert ttl - fencing_margin(ttl) == fence_after


def test_driver_folds_requests_into_one_pass_redoes_a_failed_reset_and_stops_retrying():
    clock = task.Clock()
    desired = {"rules": frozenset([WEB])}
    calls = []

    class Backend:
        name = "fake"

        def read(self):
            calls.append("read")
            return fw.ChainState(nat_rules([WEB]), [], [], 0)

        def write(self, rules, jumps):
            calls.append(("write", len(rules)))

    threads = []

    def to_thread(f, *a):
        d = defer.Deferred()
        threads.append((d, f, a))
        return d

    def finish(ok=True):
        d, f, a = threads.pop(0)
        if ok:
            d.callback(f(*a))
        else:
            d.errback(fw.FirewallError("xtables lock still held"))

    driver = fw.Firewall(clock, Backend(), lambda: desired["rules"], to_thread=to_thread)
    driver.reset()
    finish(ok=False)
    clock.advance(10)  # the retry still resets: it reads back and writes even though the rules match
    finish()
    assert calls == ["read", ("write", 2)] and driver.last_error is None
    first, second = driver.sync(), driver.sync()
    assert first.called and second.called and not threads, "nothing changed: no thread, no write"
    desired["rules"] = frozenset([WEB, DNS])
    busy = driver.sync()
    desired["rules"] = frozenset([DNS])
    folded = [driver.sync(), driver.sync()]
    finish()
    assert busy.result is True and len(threads) == 1, "the requests made meanwhile fold into one pass"
    finish()
    assert all(d.result for d in folded) and driver.applied == {DNS} and driver.writes == 3
    desired["rules"] = frozenset()
    driver.sync()
    driver.stop()
    finish(ok=False)
    clock.advance(60)
    assert not threads, "no retry after stop"
