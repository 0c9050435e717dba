"""Option parsing and validation, without starting anything."""

from __future__ import annotations

import pytest
from twisted.python import usage

from networkd.options import Endpoint, ListenAddress, Options

BASE = ["--no-vips", "--no-dns"]


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions([*BASE, *args])
    return options


def test_defaults():
    options = parse()
    assert options["etcd-endpoints"] == (Endpoint("127.0.0.1", 2379, False),)
    assert options["etcd-root"] == "/lain"
    assert options["dns-listen"] == ListenAddress("127.0.0.1", 53)
    assert options["api-listen"] == ListenAddress("127.0.0.1", 3000)
    assert options["lock-ttl"] == 3
    assert options["resolv-conf"] == "/etc/resolv.conf"
    assert options["hostname"]


def test_go_flag_aliases_map_to_our_options():
    options = parse("--etcd.endpoint", "http://10.0.0.1:4001", "--godns.addr", "127.0.0.2:5353",
                    "--api.addr", "127.0.0.1:3001", "--net.interface", "eth1", "--net.address", "10.1.1.1")
    assert options["etcd-endpoints"] == (Endpoint("10.0.0.1", 4001, False),)
    assert options["dns-listen"] == ListenAddress("127.0.0.2", 5353)
    assert options["api-listen"] == ListenAddress("127.0.0.1", 3001)
    assert options["interface"] == "eth1"
    assert options["node-ip"] == "10.1.1.1"


def test_leader_tasks_are_go_flag_names_and_off_by_default():
    assert parse()["leader-tasks"] == ()
    options = parse("--webrouter", "--deployd", "--tinydns", "--domain", "Example.COM.")
    assert options["leader-tasks"] == ("deployd", "tinydns", "webrouter")
    assert options["domain"] == "example.com"


def test_several_endpoints_and_schemes():
    options = parse("--etcd", "https://etcd1:2379, 10.0.0.2:2380,http://[::1]:2379")
    assert options["etcd-endpoints"] == (
        Endpoint("etcd1", 2379, True), Endpoint("10.0.0.2", 2380, False), Endpoint("::1", 2379, False),
    )


def test_ipv6_listen_address():
    assert parse("--dns-listen", "[::1]:5353")["dns-listen"] == ListenAddress("::1", 5353)


def test_etcd_root_is_normalised():
    assert parse("--etcd-root", "lain/")["etcd-root"] == "/lain"


@pytest.mark.parametrize("args, message", [
    (["--dns-listen", "127.0.0.1"], "--dns-listen: '127.0.0.1' is not IP:PORT"),
    (["--dns-listen", "127.0.0.1:0"], "--dns-listen: port 0 is out of range 1-65535"),
    (["--api-listen", "example.com:80"], "--api-listen: 'example.com' in 'example.com:80' is not an IP address"),
    (["--lock-ttl", "1"], "--lock-ttl: 1 is out of range 2-3600"),
    (["--lock-ttl", "three"], "--lock-ttl: 'three' is not a whole number"),
    (["--etcd", "ftp://x:1"], "--etcd: 'ftp://x:1': scheme must be http or https"),
    (["--etcd", ""], "--etcd: no endpoint given"),
    (["--etcd-user", "root"], "--etcd-user and --etcd-password go together"),
    (["--node-ip", "10.0.0.300"], "--node-ip: '10.0.0.300' is not an IPv4 address"),
    (["--dns-allow", "10.0.0.0/33"], "--dns-allow: '10.0.0.0/33' is not a CIDR"),
    (["--firewall-backend", "pf"], "--firewall-backend: 'pf' is not one of auto, legacy, nft"),
    (["--etcd-keepalives", "http"], "--etcd-keepalives: 'http' is not one of gateway, grpc"),
    (["--interface", "a-very-long-interface-name"], "is not an interface name"),
    (["--domain", "bad..name"], "--domain: 'bad..name' is not a domain name"),
])
def test_bad_values_are_usage_errors(args, message):
    with pytest.raises(usage.UsageError, match=None) as error:
        parse(*args)
    assert message in str(error.value)


def test_node_ip_needed_when_interface_has_none():
    options = Options()
    with pytest.raises(usage.UsageError, match="has no IPv4 address; pass --node-ip"):
        options.parseOptions(["--interface", "nd-nonexistent"])


def test_vip_probe_options_default_and_validate():
    options = parse()
    assert (options["vip-probe"], options["vip-probe-interval"], options["vip-probe-timeout"],
            options["vip-probe-rise"], options["vip-probe-fall"]) == ("on", 1.0, 1.0, 2, 3)
    options = parse("--vip-probe", "off", "--vip-probe-interval", "0.5", "--vip-probe-timeout", "0.2",
                    "--vip-probe-rise", "1", "--vip-probe-fall", "5")
    assert (options["vip-probe"], options["vip-probe-interval"], options["vip-probe-timeout"],
            options["vip-probe-rise"], options["vip-probe-fall"]) == ("off", 0.5, 0.2, 1, 5)
    for args, message in ((["--vip-probe", "yes"], "--vip-probe: 'yes' is not on or off"),
                          (["--vip-probe-interval", "fast"], "--vip-probe-interval: 'fast' is not a number"),
                          (["--vip-probe-timeout", "0"], "--vip-probe-timeout: 0.0 is out of range"),
                          (["--vip-probe-rise", "0"], "--vip-probe-rise: 0 is out of range"),
                          (["--vip-probe-fall", "x"], "--vip-probe-fall: 'x' is not a whole number")):
        with pytest.raises(usage.UsageError, match=message):
            parse(*args)


def test_notify_script_and_garp_interval(tmp_path):
    options = parse()
    assert options["notify-script"] is None and options["garp-interval"] == 60
    script = tmp_path / "notify"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(usage.UsageError, match="--notify-script: .* is not an executable file"):
        parse("--notify-script", str(script))
    script.chmod(0o755)
    assert parse("--notify-script", str(script), "--garp-interval", "0")["notify-script"] == str(script)
    with pytest.raises(usage.UsageError, match="--notify-script: .* is not an executable file"):
        parse("--notify-script", str(tmp_path))
    with pytest.raises(usage.UsageError, match="--garp-interval: -1 is out of range"):
        parse("--garp-interval", "-1")
