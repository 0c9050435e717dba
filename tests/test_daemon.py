"""The daemon as operators run it: ``twistd -n networkd``."""

from __future__ import annotations

import signal
import subprocess
import time

from tests.support.daemon import TWISTD, Daemon
from tests.support.ports import free_port

BASE = ["--no-vips", "--no-dns", "--no-resolv-conf"]


def twistd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    d = Daemon([])
    return subprocess.run(
        [TWISTD, "--nodaemon", "--pidfile=", "networkd", *args],
        capture_output=True, text=True, timeout=timeout, env=d.env, cwd=d.workdir,
    )


def test_help_lists_every_option():
    result = twistd("--help")
    assert result.returncode == 0
    for option in (
        "--etcd=", "--etcd-root=", "--etcd-ca=", "--etcd-cert=", "--etcd-key=", "--etcd-user=",
        "--etcd-password=", "--hostname=", "--interface=", "--node-ip=", "--dns-listen=",
        "--api-listen=", "--resolv-conf=", "--hosts-file=", "--lock-ttl=", "--no-vips", "--no-dns",
        "--no-resolv-conf", "--verbose", "--version", "--etcd.endpoint=", "--godns.addr=",
        "--api.addr=", "--net.interface=", "--net.address=",
    ):
        assert option in result.stdout, option


def test_bad_dns_listen_exits_2_with_one_clear_line():
    result = twistd(*BASE, "--dns-listen", "127.0.0.1:99999")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["networkd: error: --dns-listen: port 99999 is out of range 1-65535"]


def test_bad_go_alias_value_names_the_option():
    result = twistd(*BASE, "--godns.addr", "localhost:53")
    assert result.returncode == 2
    assert "--dns-listen: 'localhost' in 'localhost:53' is not an IP address" in result.stderr


def test_unreadable_certificate_exits_2(tmp_path):
    result = twistd(*BASE, "--etcd-ca", str(tmp_path / "missing.pem"))
    assert result.returncode == 2
    assert "--etcd-ca: cannot read" in result.stderr


def test_version():
    result = twistd("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("networkd ")


def test_forcing_another_reactor_is_refused():
    d = Daemon([])
    result = subprocess.run(
        [TWISTD, "--nodaemon", "--pidfile=", "--reactor=select", "networkd", *BASE],
        capture_output=True, text=True, timeout=30, env=d.env, cwd=d.workdir,
    )
    assert result.returncode != 0
    assert "needs Twisted's asyncio reactor" in result.stdout + result.stderr


def test_runs_until_sigterm_then_exits_0_quickly(etcd_server, etcd_root):
    daemon = Daemon([*BASE, "--etcd", etcd_server.endpoint, "--etcd-root", etcd_root,
                     "--api-listen", f"127.0.0.1:{free_port()}"]).start()
    try:
        daemon.wait_for_log("networkd started")
        time.sleep(1.0)
        assert daemon.running(), daemon.log()

        daemon.signal(signal.SIGHUP)  # forces a resync, does not stop the daemon
        time.sleep(0.5)
        assert daemon.running(), daemon.log()

        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        daemon.process.wait(5)
        assert time.monotonic() - started < 2.0
        assert daemon.process.returncode == 0, daemon.log()
        assert "Traceback" not in daemon.log()
    finally:
        daemon.kill()


def test_stays_up_while_etcd_is_unreachable():
    dead = f"http://127.0.0.1:{free_port()}"
    daemon = Daemon([*BASE, "--etcd", dead, "--api-listen", f"127.0.0.1:{free_port()}"]).start()
    try:
        daemon.wait_for_log("networkd started")
        time.sleep(2.0)
        assert daemon.running(), daemon.log()
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_debug_lines_only_with_verbose(etcd_server, etcd_root):
    """The API logs each request at debug level: seen with --verbose, not without."""
    import urllib.request

    logs = {}
    for verbose in (False, True):
        api = free_port()
        daemon = Daemon([*BASE, "--etcd", etcd_server.endpoint, "--etcd-root", etcd_root,
                         "--api-listen", f"127.0.0.1:{api}", *(["--verbose"] if verbose else [])]).start()
        try:
            daemon.wait_for_log("networkd started")
            deadline = time.monotonic() + 10
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{api}/v1/dns/config", timeout=2).read()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            time.sleep(0.3)
            assert daemon.stop() == 0
            logs[verbose] = daemon.log()
        finally:
            daemon.kill()
    assert "/v1/dns/config" in logs[True]
    assert "/v1/dns/config" not in logs[False]


def test_console_script_takes_the_same_options():
    import sys

    d = Daemon([])
    ok = subprocess.run([sys.executable, "-m", "networkd", "--version"], capture_output=True, text=True,
                        timeout=30, env=d.env, cwd=d.workdir)
    assert ok.returncode == 0 and ok.stdout.startswith("networkd ")
    bad = subprocess.run([sys.executable, "-m", "networkd", *BASE, "--lock-ttl", "0"], capture_output=True,
                         text=True, timeout=30, env=d.env, cwd=d.workdir)
    assert bad.returncode == 2 and "--lock-ttl: 0 is out of range 2-3600" in bad.stderr


def test_console_script_runs_the_daemon_until_sigterm():
    """``networkd [options]`` (what the RPM's unit runs) is the daemon itself, not only its options."""
    import sys

    d = Daemon([])
    api = free_port()
    with open(d.log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "networkd", *BASE, "--etcd", f"http://127.0.0.1:{free_port()}",
             "--api-listen", f"127.0.0.1:{api}"], cwd=d.workdir, stdout=log, stderr=subprocess.STDOUT, env=d.env)
    d.process = process
    try:
        d.wait_for_log("networkd started")
        assert d.stop() == 0, d.log()
        assert "Traceback" not in d.log()
    finally:
        d.kill()


LOADED_BY_TWISTD_PLUGINS = ("twisted.trial", "unittest", "twisted.words", "twisted.cred.strcred", "twisted.conch")


def _modules_after_parsing(options_class: str) -> list[str]:
    """The modules (of LOADED_BY_TWISTD_PLUGINS and twisted.plugins.*) a fresh interpreter holds
    once ``options_class`` parsed a daemon command line."""
    import sys

    code = (
        "import sys\n"
        f"{options_class}\n"
        "o = Options()\n"
        "o.parseOptions(['--nodaemon', '--pidfile=', 'networkd', '--no-vips', '--no-dns'])\n"
        f"print(sorted(m for m in sys.modules if m.startswith({LOADED_BY_TWISTD_PLUGINS!r} + ('twisted.plugins.',))))\n"
    )
    d = Daemon([])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=d.env,
                         cwd=d.workdir)
    assert out.returncode == 0, out.stderr
    return eval(out.stdout)


def test_console_script_loads_no_other_twisted_plugin():
    """twistd loads every Twisted plugin to list its sub-commands (trial, unittest, words... ~1.2 MB
    of RSS, more where the plugin caches are read-only); the console script knows its only one."""
    loaded = _modules_after_parsing("from networkd.cli import server_options; Options = server_options()")
    assert loaded == ["twisted.plugins.networkd_plugin"]
    # What it avoids: twistd's own options load them (if Twisted changes that, this test says so).
    loaded = _modules_after_parsing("from twisted.scripts.twistd import ServerOptions as Options")
    assert "twisted.trial" in loaded and "twisted.plugins.networkd_plugin" in loaded
