"""Hold benchmark: one daemon holding many VIPs at rest.

Builds, in network namespaces (nothing on the host changes): a private etcd,
one node namespace "n1" (10.77.0.11 on eth0, bridge in a namespace of its
own) running networkd with ``--lock-ttl 3`` and the nft firewall back end,
and ``--configs`` floating VIP configs (10.78.x.y, only ever added inside the
namespace) of which ``--local`` belong to apps whose pod group has a
container on n1; the others belong to apps placed on node "ghost", which has
no daemon, so n1 has them configured but does not contest them.  Local and
remote VIPs are interleaved in the address range, ``--vips-per-app`` per app.

The daemon is started with no config; then every pod group and VIP config is
written in one burst (etcd transactions of up to 128 puts through etcd's
HTTP gateway) and the time until all local VIPs are on eth0 is logged.  Then,
for ``--seconds``, once a second: the daemon's CPU (utime+stime from
/proc/PID/stat, and every thread's measured time on a CPU from
/proc/PID/task/*/schedstat, the figure to trust at rest: utime+stime counts
100 Hz ticks; its waited-for children, i.e. iptables-restore, separately),
its RSS (VmRSS), how many of the local VIPs are on eth0 (a netlink address
dump inside the namespace, pyroute2 in a thread of its own), other /32s on
eth0, and the "fencing:" lines in its log.  Host load (loadavg, busy CPU of
all cores, etcd's CPU) is recorded too, since the machine may be shared.

The containers do not exist by default (``--containers absent``: the node has
no route to them, so every probe fails at once).  ``--containers listening``
makes every container address local inside the node namespace (a ``local``
route for 10.79.0.0/16 on lo) with one listener on port 80 accepting and
closing, so every probe connects.

A bench, not a test: it always exits 0.  Run as root:

    python bench/hold.py --configs 1000 --local 100 --seconds 120
    python bench/hold.py --configs 1000 --local 1000 --json /tmp/hold.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.procstat import RunTime  # noqa: E402
from bench.vipnode import EtcdWriter, VipNode, build_workload  # noqa: E402
from tests.support.etcd_server import EtcdServer  # noqa: E402

ROOT = "/bench"
TICK = os.sysconf("SC_CLK_TCK")
FENCE_MARK = "fencing:"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- /proc readings ------------------------------------------------------------------


def proc_cpu(pid: int) -> tuple[float, float]:
    """(utime+stime, cutime+cstime) of ``pid`` in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime = field 14, stime 15, cutime 16, cstime 17
    return (int(fields[11]) + int(fields[12])) / TICK, (int(fields[13]) + int(fields[14])) / TICK


def proc_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def host_cpu() -> tuple[float, float]:
    """(busy, total) seconds of all CPUs together, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # without guest times, which user already counts
    return (total - idle) / TICK, total / TICK


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class LogCounter:
    """Counts lines containing ``mark`` in a growing file, reading only what is new."""

    def __init__(self, path: str, mark: str):
        self.path, self.mark = path, mark
        self.offset, self.count, self._rest = 0, 0, b""

    def update(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return self.count
        self.offset += len(data)
        lines = (self._rest + data).split(b"\n")
        self._rest = lines.pop()
        mark = self.mark.encode()
        self.count += sum(1 for line in lines if mark in line)
        return self.count


# -- the sampler ---------------------------------------------------------------------


class Sampler:
    """A thread that samples the daemon; every ``interval`` seconds while settling, every second after.

    It owns the pyroute2 socket (whose sync API runs an event loop of its own).
    """

    def __init__(self, netns: str, pid: int, etcd_pid: int, log_path: str, local: set[str]):
        self.netns, self.pid, self.etcd_pid = netns, pid, etcd_pid
        self.run_time = RunTime(pid)
        self.local = local
        self.fences = LogCounter(log_path, FENCE_MARK)
        self.tracebacks = LogCounter(log_path, "Traceback")
        self.present = 0  # latest count of local VIPs on eth0
        self.max_present = 0
        self.settle: list[dict] = []
        self.samples: list[dict] = []
        self.error: BaseException | None = None
        self.dead = False
        self._window_start: float | None = None
        self._window_seconds = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Sampler":
        self._thread.start()
        self._ready.wait(10)
        if self.error:
            raise self.error
        return self

    def _addresses(self, ipr, index: int) -> tuple[int, int]:
        """(local VIPs on eth0, other /32s on eth0)."""
        present = extra = 0
        for msg in ipr.get_addr(family=socket.AF_INET):
            if msg["index"] != index or msg["prefixlen"] != 32:
                continue
            if msg.get_attr("IFA_ADDRESS") in self.local:
                present += 1
            else:
                extra += 1
        return present, extra

    def _sample(self, ipr, index: int, t0: float) -> dict:
        now = time.monotonic()
        try:
            cpu, children = proc_cpu(self.pid)
            run_time = self.run_time.seconds()
            rss = proc_rss_kb(self.pid)
        except OSError:
            self.dead = True
            raise
        present, extra = self._addresses(ipr, index)
        self.present = present
        self.max_present = max(self.max_present, present)
        try:
            etcd_cpu = sum(proc_cpu(self.etcd_pid))
        except OSError:
            etcd_cpu = float("nan")
        busy, total = host_cpu()
        return {"t": round(now - t0, 3), "cpu": cpu, "run_time": run_time, "children_cpu": children, "rss_kb": rss,
                "present": present, "extra": extra, "fences": self.fences.update(),
                "tracebacks": self.tracebacks.update(), "etcd_cpu": etcd_cpu,
                "self_cpu": sum(os.times()[:2]), "host_busy": busy, "host_total": total,
                "loadavg": loadavg()}

    def _run(self) -> None:
        from pyroute2 import IPRoute

        ipr = None
        try:
            ipr = IPRoute(netns=self.netns)
            index = ipr.link_lookup(ifname="eth0")[0]
            self._ready.set()
            t_settle = time.monotonic()
            while self._window_start is None and not self._stop.is_set():
                self.settle.append(self._sample(ipr, index, t_settle))
                self._stop.wait(0.1)
            k = 0
            while not self._stop.is_set() and k <= self._window_seconds:
                due = self._window_start + k
                self._stop.wait(max(0.0, due - time.monotonic()))
                if self._stop.is_set():
                    break
                self.samples.append(self._sample(ipr, index, self._window_start))
                k += 1
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self.error = e
        finally:
            self._ready.set()
            self._done.set()
            if ipr is not None:
                ipr.close()

    def begin_window(self, seconds: int) -> None:
        self._window_seconds = seconds
        self._window_start = time.monotonic()

    def wait_window(self) -> None:
        while not self._done.wait(1):
            pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# -- the report ----------------------------------------------------------------------


def pct(cpu_seconds: float, seconds: float) -> float:
    return 100.0 * cpu_seconds / seconds if seconds > 0 else float("nan")


def report(args, samples: list[dict], settle_took: float | None, settle_max: int, settle_fences: int) -> dict:
    m = args.local
    print()
    print(f"== hold benchmark: {args.configs} VIP configs, {m} local, lock TTL {args.lock_ttl}s, probes {args.vip_probe} "
          f"(containers {args.containers}, {args.vips_per_app} VIPs each), "
          f"firewall {args.firewall}, code {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}")
    if settle_took is not None:
        print(f"settle:   all {m} local VIPs on eth0 {settle_took:.2f} s after the write burst")
    else:
        print(f"settle:   NOT all local VIPs on eth0 within {args.settle_timeout} s "
              f"(at most {settle_max}/{m} seen); the window started anyway")
    if len(samples) < 2:
        print("window:   no samples (the daemon died?)")
        return {}
    first, last = samples[0], samples[-1]
    span = last["t"] - first["t"]
    n = len(samples)
    # per full minute (a window shorter than a minute counts as one partial minute)
    minutes = []
    for k in range(0, n - 1, 60):
        a, b = samples[k], samples[min(k + 60, n - 1)]
        if b["t"] - a["t"] >= 30 or k == 0:
            minutes.append((pct(b["cpu"] - a["cpu"], b["t"] - a["t"]),
                            pct(b["children_cpu"] - a["children_cpu"], b["t"] - a["t"]), b["t"] - a["t"]))
    after = samples[60] if n > 61 else first
    mean_label = "excluding the first minute" if n > 61 else "whole window (shorter than 2 minutes' worth)"
    mean_cpu = pct(last["cpu"] - after["cpu"], last["t"] - after["t"])
    # the threads' measured time on a CPU (schedstat): utime+stime counts 100 Hz ticks, ~30 a minute at 0.5 %
    mean_run = pct(last["run_time"] - after["run_time"], last["t"] - after["t"])
    mean_children = pct(last["children_cpu"] - after["children_cpu"], last["t"] - after["t"])
    rss_1m = samples[min(60, n - 1)]["rss_kb"] / 1024
    rss_end = last["rss_kb"] / 1024
    short = [s for s in samples if s["present"] < m]
    fences = last["fences"] - first["fences"]
    host_busy = pct(last["host_busy"] - first["host_busy"], last["host_total"] - first["host_total"])
    cores = os.cpu_count() or 1
    etcd = pct(last["etcd_cpu"] - first["etcd_cpu"], span)
    bench = pct(last["self_cpu"] - first["self_cpu"], span)
    daemon_all = pct(last["cpu"] - first["cpu"] + last["children_cpu"] - first["children_cpu"], span)
    others = host_busy * cores - daemon_all - etcd - bench
    print(f"window:   {span:.0f} s, {n} samples (1/s)")
    print(f"CPU:      daemon {mean_cpu:.1f} % of one core, mean {mean_label}; "
          f"per minute: {', '.join(f'{c:.1f}' for c, _, _ in minutes)} %; max per minute {max(c for c, _, _ in minutes):.1f} %")
    print(f"          measured time on a CPU (schedstat, every thread): {mean_run:.3f} % mean {mean_label} "
          f"(utime+stime above, tick-sampled: {mean_cpu:.3f} %)")
    print(f"          its children (iptables-restore...): {mean_children:.1f} % mean, "
          f"per minute: {', '.join(f'{c:.1f}' for _, c, _ in minutes)} %")
    print(f"RSS:      {rss_1m:.1f} MB at t={samples[min(60, n - 1)]['t']:.0f}s, {rss_end:.1f} MB at end, "
          f"growth {rss_end - rss_1m:+.1f} MB (window start {first['rss_kb'] / 1024:.1f} MB)")
    print(f"VIPs:     samples with fewer than {m} local VIPs on eth0: {len(short)}/{n}; "
          f"min present {min(s['present'] for s in samples)}/{m}; max other /32s on eth0 {max(s['extra'] for s in samples)}")
    print(f"fencing:  {fences} 'fencing:' log lines in the window ({last['fences']} since start, "
          f"{settle_fences} while settling); tracebacks in log: {last['tracebacks']}")
    print(f"host:     loadavg {first['loadavg']} at window start, {last['loadavg']} at end; all {cores} cores "
          f"{host_busy:.0f} % busy: daemon+children {daemon_all:.0f} %, etcd {etcd:.0f} %, this bench {bench:.0f} %, "
          f"everything else {others:.0f} % (of one core)")
    return {"cpu_mean_pct": mean_cpu, "run_time_mean_pct": mean_run, "cpu_per_minute_pct": [c for c, _, _ in minutes],
            "children_cpu_mean_pct": mean_children, "rss_1m_mb": rss_1m, "rss_end_mb": rss_end,
            "short_samples": len(short), "samples": n, "min_present": min(s["present"] for s in samples),
            "fences": fences, "host_busy_pct": host_busy, "others_pct_of_core": others}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=1000, help="VIP configs in etcd (default 1000)")
    parser.add_argument("--local", type=int, default=100, help="how many of them are local to the node (default 100)")
    parser.add_argument("--seconds", type=int, default=600, help="sampling window after settling (default 600)")
    parser.add_argument("--vips-per-app", type=int, default=10, help="VIP configs per app/pod group (default 10)")
    parser.add_argument("--lock-ttl", type=int, default=3)
    parser.add_argument("--vip-probe", default="on", choices=("on", "off"),
                        help="the daemon's container probes (on: every local VIP's container is probed and unreachable)")
    parser.add_argument("--containers", default="absent", choices=("absent", "listening"),
                        help="listening: every container address answers on port 80 inside the node namespace")
    parser.add_argument("--firewall", default="nft", choices=("nft", "legacy"))
    parser.add_argument("--settle-timeout", type=float, default=300,
                        help="give up waiting for all local VIPs after this long and sample anyway (default 300)")
    parser.add_argument("--json", metavar="PATH", help="write the raw samples here")
    parser.add_argument("--keep-log", action="store_true", help="print the daemon log's path and keep it")
    args = parser.parse_args()
    if not 0 <= args.local <= args.configs or args.configs > 250 * 250:  # build_workload's bounds
        parser.error("need 0 <= --local <= --configs <= 62500")

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    etcd = vipnode = sampler = None
    result = {"args": vars(args)}
    try:
        log(f"load before start: loadavg {loadavg()}, {os.cpu_count()} cores")
        etcd = EtcdServer().start()
        vipnode = VipNode(etcd, ROOT, args.firewall, args.lock_ttl, log=log)
        node = vipnode.node
        node.extra_args = [*node.extra_args, "--vip-probe", args.vip_probe]
        pods, vips, local = build_workload(ROOT, args.configs, args.local, args.vips_per_app, node.ip)
        if args.containers == "listening":
            vipnode.start_listener()
        vipnode.cluster.start()
        daemon = node.daemon
        log(f"daemon pid {daemon.pid} up in {node.ns.name}; log {daemon.log_path}")
        sampler = Sampler(node.ns.name, daemon.pid, etcd.process.pid, daemon.log_path, local).start()

        sent = time.monotonic()
        writer = EtcdWriter(etcd.endpoint)
        writer.put_all(pods)
        writer.put_all(vips)
        writer.close()
        log(f"wrote {len(pods)} pod groups and {len(vips)} VIP configs in {time.monotonic() - sent:.2f} s")
        settle_took = None
        deadline = sent + args.settle_timeout
        last_note = sent
        while time.monotonic() < deadline:
            if sampler.error or sampler.dead or not daemon.running():
                break
            if sampler.present >= args.local:
                settle_took = time.monotonic() - sent
                break
            if time.monotonic() - last_note >= 10:
                last_note = time.monotonic()
                log(f"  settling: {sampler.present}/{args.local} local VIPs on eth0 after {last_note - sent:.0f} s")
            time.sleep(0.05)
        if settle_took is not None:
            log(f"all {args.local} local VIPs on eth0 {settle_took:.2f} s after the write burst")
        else:
            log(f"not all local VIPs on eth0 within {args.settle_timeout} s "
                f"({sampler.present}/{args.local} now, {sampler.max_present} at most)")
        settle_fences = sampler.fences.count

        if daemon.running() and not sampler.error:
            log(f"sampling for {args.seconds} s ...")
            sampler.begin_window(args.seconds)
            progress = time.monotonic()
            while not sampler._done.wait(1):
                if not daemon.running():
                    log(f"the daemon exited ({daemon.process.returncode}) during the window")
                    break
                if time.monotonic() - progress >= 60 and sampler.samples:
                    progress = time.monotonic()
                    s = sampler.samples[-1]
                    log(f"  t={s['t']:.0f}s present {s['present']}/{args.local}, RSS {s['rss_kb'] / 1024:.1f} MB, "
                        f"fencing lines {s['fences']}, loadavg {s['loadavg']}")
            sampler.stop()
        else:
            log("the daemon or the sampler failed before the window")
            sampler.stop()
        if sampler.error and not sampler.dead:
            log(f"sampler error: {sampler.error!r}")

        result["summary"] = report(args, sampler.samples, settle_took, sampler.max_present, settle_fences)
        result.update(settle_seconds=settle_took, settle=sampler.settle, samples=sampler.samples)
        if args.keep_log:
            print(f"daemon log: {daemon.log_path}")
    except KeyboardInterrupt:
        log("interrupted")
    except Exception as e:  # noqa: BLE001 - a bench reports and exits 0
        log(f"bench failed: {e!r}")
        if vipnode is not None and vipnode.cluster is not None:
            tail = vipnode.cluster.logs()[-3000:]
            print(tail)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cleanup finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for what, step in (("sampler", sampler and sampler.stop),
                           ("node", vipnode and (lambda: vipnode.close(args.keep_log))),
                           ("etcd", etcd and etcd.destroy)):
            try:
                step and step()
            except Exception as e:  # noqa: BLE001 - each step even if another failed
                log(f"cleanup of {what} failed: {e!r}")
        if args.json and "samples" in result:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
            log(f"raw samples in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
