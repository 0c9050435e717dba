#!/usr/bin/env python3
"""DNS benchmark: networkd against dnsmasq, side by side.

Both servers get the same 1,000 local names (networkd from etcd, dnsmasq
from --address) and forward to the same stub upstream on 127.0.0.x, which
knows 1,000 more names.  Each server is pinned to CPU 0, dnsperf to CPU 1;
dnsperf runs for 10 s per case after a warm-up that fills the caches.
Prints QPS, server CPU per query and the networkd/dnsmasq ratio for
"local" and "cached forwarded" answers.

Run as root from the repository: ``/tmp/venv/bin/python bench/dns.py``
(needs etcd, dnsmasq-base, dnsperf; touches only 127.0.0.0/8).

``--baseline DIR`` adds a third server, networkd from another checkout
(e.g. ``git archive HEAD~1 | tar -x -C DIR``), to the same interleaved
rounds, so a change is measured against its parent on the same CPU at the
same time rather than in two runs minutes apart.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.support.dnsstub import StubServer, query  # noqa: E402
from tests.support.etcd_server import EtcdServer  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

NAMES = 1000
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_answer(port: int, name: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if query(port, name, timeout=0.5).rr:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"no answer for {name} on port {port}")


def dnsperf(port: int, datafile: str, seconds: float, server_pid: int, cpu: str) -> tuple[float, float, str]:
    before = cpu_seconds(server_pid)
    out = subprocess.run(
        ["taskset", "-c", cpu, "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", datafile,
         "-l", str(seconds), "-q", "500", "-c", "1", "-T", "1", "-t", "2"],
        capture_output=True, text=True, check=True,
    ).stdout
    used = cpu_seconds(server_pid) - before
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))
    completed = int(re.search(r"Queries completed:\s+(\d+)", out).group(1))
    lost = re.search(r"Queries lost:\s+(\d+)", out).group(1)
    return qps, used / max(completed, 1) * 1e6, lost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--server-cpu", default="0")
    parser.add_argument("--client-cpu", default="1")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per case; the best one counts")
    parser.add_argument("--forwarded-names", type=int, default=NAMES,
                        help="distinct forwarded names (many names = each one asked less often)")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also run networkd from this checkout (imported from DIR) in the same rounds")
    args = parser.parse_args()
    for tool in ("dnsperf", "dnsmasq", "taskset", "etcd"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            sys.exit(f"{tool} is missing")

    work = tempfile.mkdtemp(prefix="networkd-bench-")
    processes = []
    etcd = EtcdServer().start()
    stub = StubServer(ttl=3600)
    try:
        root = "/bench"
        local = [(f"h{i}.bench.lain", f"10.{i // 250}.{i % 250}.1") for i in range(NAMES)]
        forwarded = [f"f{i}.example.com" for i in range(args.forwarded_names)]
        for i, name in enumerate(forwarded):
            stub.records[name] = [f"172.16.{i // 250}.{i % 250 + 1}"]
        for start in range(0, NAMES, 100):
            ops = "".join(f'put {root}/config/domains/{n} {{"ips":["{ip}"]}}\n'
                          for n, ip in local[start:start + 100])
            etcd.ctl("txn", input="\n" + ops + "\n\n")
        local_file = os.path.join(work, "local.txt")
        forward_file = os.path.join(work, "forward.txt")
        with open(local_file, "w") as f:
            f.writelines(f"{n} A\n" for n, _ in local)
        with open(forward_file, "w") as f:
            f.writelines(f"{n} A\n" for n in forwarded)
        hosts = os.path.join(work, "hosts")
        resolv = os.path.join(work, "resolv.conf")
        open(hosts, "w").close()
        with open(resolv, "w") as f:
            f.write(f"nameserver {stub.host}\n")

        def start_networkd(checkout: str, label: str) -> tuple[int, subprocess.Popen]:
            port = free_port()
            proc = subprocess.Popen(
                ["taskset", "-c", args.server_cpu, TWISTD, "--nodaemon", "--pidfile=", "networkd",
                 "--etcd", etcd.endpoint, "--etcd-root", root, "--dns-listen", f"127.0.0.1:{port}",
                 "--api-listen", f"127.0.0.1:{free_port()}", "--no-vips", "--no-resolv-conf",
                 "--node-ip", "10.1.1.1", "--hosts-file", hosts, "--resolv-conf", resolv],
                stdout=open(os.path.join(work, f"{label}.log"), "wb"), stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": checkout},
            )
            processes.append(proc)
            return port, proc

        nd_port, nd = start_networkd(REPO, "networkd")
        dm_port = free_port()
        dm = subprocess.Popen(
            ["taskset", "-c", args.server_cpu, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null",
             "--no-resolv", "--no-hosts", "--port", str(dm_port), "--listen-address", "127.0.0.1",
             "--bind-interfaces", "--pid-file=", "--cache-size=10000", f"--server={stub.host}",
             *(f"--address=/{n}/{ip}" for n, ip in local)],
            stdout=open(os.path.join(work, "dnsmasq.log"), "wb"), stderr=subprocess.STDOUT,
        )
        processes.append(dm)
        servers = [("networkd", nd_port, nd), ("dnsmasq", dm_port, dm)]
        if args.baseline:
            bl_port, bl = start_networkd(os.path.abspath(args.baseline), "baseline")
            servers.append(("baseline", bl_port, bl))
        for _, port, _ in servers:
            wait_for_answer(port, local[-1][0])
        results = {}
        runs: dict = {}
        cases = (("local", local_file), ("cached forwarded", forward_file))
        for case, datafile in cases:
            for server, port, proc in servers:
                dnsperf(port, datafile, 2, proc.pid, args.client_cpu)  # warm-up: fills the caches
        for _ in range(args.rounds):  # interleaved, so that a noisy neighbour hurts both alike
            for case, datafile in cases:
                for server, port, proc in servers:
                    run = dnsperf(port, datafile, args.seconds, proc.pid, args.client_cpu)
                    print(f"  {case:<18} {server:<9} {run[0]:>9.0f} QPS {run[1]:>6.1f}us/query", flush=True)
                    runs.setdefault((case, server), []).append(run[0])
                    if (case, server) not in results or run[0] > results[(case, server)][0]:
                        results[(case, server)] = run
        print(f"best of {args.rounds} runs of {args.seconds:g} s:")
        print(f"{'case':<18} {'server':<9} {'QPS':>9} {'CPU/query':>10} {'lost':>6} {'median QPS':>11}")
        for (case, server), (qps, cpu, lost) in results.items():
            median = statistics.median(runs[(case, server)])
            print(f"{case:<18} {server:<9} {qps:>9.0f} {cpu:>8.1f}us {lost:>6} {median:>11.0f}")
        for case in ("local", "cached forwarded"):
            for other, _, _ in servers[1:]:
                n, d = results[(case, "networkd")], results[(case, other)]
                pairs = [a / b for a, b in zip(runs[(case, "networkd")], runs[(case, other)])]
                print(f"{case}: networkd/{other} QPS ratio {n[0] / d[0]:.2f} (best against best; round by round "
                      f"{min(pairs):.2f}-{max(pairs):.2f}), CPU per query ratio {n[1] / d[1]:.2f}")
        print(f"upstream saw {len(stub.queries)} queries (each forwarded name should be asked about "
              f"{len(servers)} times: once per server)")
    finally:
        for proc in processes:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        stub.close()
        etcd.destroy()
        if os.environ.get("KEEP_BENCH"):
            print("kept", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
