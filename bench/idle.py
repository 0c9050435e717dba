"""The daemon's CPU when nothing changes and nobody asks: no DNS prober, no API fetches.

``bench/scale.py``'s "rest" step asks a local name 100 times a second, so its figure
includes answering; this one isolates what the daemon spends on its own (timers,
keep-alives, grpc's threads).  For each ``--domains`` count a private etcd and a fresh
daemon (``--no-vips``) are started, given ``--settle`` seconds, then the daemon's CPU
(/proc/PID/stat utime+stime) is read over ``--seconds``, ``--runs`` times.

    .venv/bin/python bench/idle.py --domains 0,10000 --seconds 60
    .venv/bin/python bench/idle.py --domains 0 --hold   # keep it up for strace / py-spy
    .venv/bin/python bench/idle.py --systemd ...        # as under the RPM's units

``--systemd`` runs the daemon as systemd would with the RPM's units: ``$NOTIFY_SOCKET``
(a socket this bench reads), ``WATCHDOG_USEC`` for WatchdogSec=30, and the DNS listeners
passed by "networkd.socket" (LISTEN_FDS): the start-up polls these enable are measured too.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.scale import (HOT, HOT_IP, ROOT, TWISTD, EtcdWriter, cpu_seconds, domain_ip,  # noqa: E402
                         domain_key, domain_value, loadavg, rss_mb, stop_process, wait_until_answer)
from tests.support.etcd_server import EtcdServer  # noqa: E402
from tests.support.notifysocket import FakeNotifySocket  # noqa: E402
from tests.test_dns_activation import WRAPPER  # noqa: E402
from tests.support.ports import free_port  # noqa: E402


def run(domains: int, args, work: str) -> tuple[float, float]:
    etcd = EtcdServer().start()
    proc = notify = None
    writer = EtcdWriter(etcd.endpoint)
    try:
        items = [(domain_key(f"d{i}.scale.lain"), domain_value(domain_ip(i))) for i in range(domains)]
        writer.put_all(items + [(domain_key(HOT), domain_value(HOT_IP))])
        hosts, resolv = os.path.join(work, "hosts"), os.path.join(work, "resolv.conf")
        open(hosts, "w").close()
        with open(resolv, "w") as f:
            f.write("nameserver 127.0.0.1\n")
        host = "127.0.0.1"
        port = free_port()
        cmd = [TWISTD, "--nodaemon", "--pidfile=", "networkd", "--etcd", etcd.endpoint, "--etcd-root", ROOT,
               "--dns-listen", f"{host}:{port}", "--api-listen", f"127.0.0.1:{free_port()}", "--no-vips",
               "--no-resolv-conf", "--node-ip", "10.1.1.1", "--hosts-file", hosts, "--resolv-conf", resolv,
               *args.extra]
        env = {**os.environ, "PYTHONPATH": args.daemon_repo}
        fds: list[int] = []
        if args.systemd:
            notify = FakeNotifySocket()
            sockets = [socket.socket(socket.AF_INET, kind) for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM)]
            for s in sockets:
                s.bind((host, port))
            sockets[1].listen(128)
            fds = [s.fileno() for s in sockets]
            env.update(NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="30000000", TEST_PASS_FDS=",".join(map(str, fds)),
                       LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES="dns:dns")
            cmd = [sys.executable, "-c", WRAPPER, *cmd]
        proc = subprocess.Popen(cmd, stdout=open(os.path.join(work, f"networkd-{domains}.log"), "wb"),
                                stderr=subprocess.STDOUT, env=env, pass_fds=fds)
        if args.systemd:
            for s in sockets:
                s.close()  # the daemon has its copies
        wait_until_answer(port, HOT, HOT_IP, time.monotonic(), 120)
        time.sleep(args.settle)
        if args.hold:
            signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up as Ctrl-C does
            print(f"daemon pid {proc.pid}, etcd {etcd.endpoint}; Ctrl-C / SIGTERM to stop", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                return 0.0, 0.0
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(args.seconds)
        return (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0), rss_mb(proc.pid)
    finally:
        writer.close()
        if notify is not None:
            notify.close()
        if proc is not None:
            stop_process(proc)
        etcd.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", default="0,10000", help="comma-separated domain counts")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--settle", type=float, default=5, help="seconds after the first answer before measuring")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hold", action="store_true", help="start one daemon and keep it up (for strace, py-spy)")
    parser.add_argument("--systemd", action="store_true",
                        help="NOTIFY_SOCKET, WATCHDOG_USEC and passed DNS sockets, as under the RPM's units")
    parser.add_argument("--daemon-repo", default=REPO, help="checkout whose networkd to run")
    parser.add_argument("extra", nargs="*", help="more daemon options (after --)")
    args = parser.parse_args()
    print(f"load before: {loadavg()}")
    with tempfile.TemporaryDirectory(prefix="networkd-idle-") as work:
        for domains in [int(s) for s in args.domains.split(",")]:
            cpus, rss = [], []
            for _ in range(1 if args.hold else args.runs):
                cpu, mb = run(domains, args, work)
                if args.hold:
                    return
                cpus.append(cpu * 100)
                rss.append(mb)
                print(f"{domains} domains: {cpu * 100:.2f} % CPU over {args.seconds:g} s, RSS {mb:.0f} MB", flush=True)
            print(f"{domains} domains: CPU min/median/max {min(cpus):.2f} / {statistics.median(cpus):.2f} / "
                  f"{max(cpus):.2f} %, RSS median {statistics.median(rss):.0f} MB (load {loadavg()})", flush=True)


if __name__ == "__main__":
    main()
