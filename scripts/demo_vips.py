#!/usr/bin/env python3
"""``make demo`` as root: the whole job in network namespaces; ``make demo-check``: the same, asserted.

Three nodes on a bridge, each with a container serving HTTP, one networkd per node, two
floating VIPs and a DNS name.  Interactive: prints what to try, then watches the VIP and
prints each move with the measured failover time, restarting a killed daemon.  Ctrl-C
(or any failure half-way) removes everything it made.  ``--check`` runs the scenario
without a person: the VIP answers, DNS and /v1/vips agree, SIGKILL of the holder moves it,
and nothing is left behind; exit status 0 only if all held.  Exit status 3: not root.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from demo_cluster import NODES, VIPS, DemoCluster  # noqa: E402

NOT_ROOT = 3


def netns_possible() -> str | None:
    from tests.support.privileges import privileged_reason

    return privileged_reason()


def wait_for(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


def host_firewall() -> str:
    """The host's own nat and filter rules, to show they are untouched."""
    out = []
    for table in ("nat", "filter"):
        result = subprocess.run(["iptables", "-S", "-t", table], capture_output=True, text=True)
        out.append(result.stdout if result.returncode == 0 else f"({table}: {result.stderr.strip()})")
    return "\n".join(out)


def failover(demo: DemoCluster, timeout: float = 15.0) -> tuple[str, str | None, float]:
    """SIGKILL the holder of the first VIP; (old, new, seconds until the VIP answered from another node)."""
    old = demo.holder()
    daemon = demo.cluster[old].daemon
    killed = time.monotonic()
    daemon.kill()
    new = wait_for(lambda: (n := demo.answering_node()) and n != old and n, timeout, interval=0.02)
    return old, new, time.monotonic() - killed


def check() -> int:
    results: list[tuple[bool, str]] = []

    def expect(ok, what: str) -> bool:
        results.append((bool(ok), what))
        print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
        return bool(ok)

    firewall_before = host_firewall()
    demo = DemoCluster()
    pids: list[int] = []
    try:
        demo.build().start()
        pids = [demo.cluster[n].daemon.pid for n in NODES] + [p.pid for p in demo.servers] + [demo.etcd.process.pid]
        first = wait_for(demo.answering_node, 40)
        expect(first, f"VIP {VIPS[0]} answers curl from the client: {demo.curl_vip()}")
        if first:
            # Both VIPs may land on one node first; balancing then moves one of them (a node over its share
            # lets go), so wait until they are apart and read both holders then.
            def apart():
                a, b = demo.answering_node(VIPS[0]), demo.answering_node(VIPS[1])
                return (a, b) if a and b and a != b else None

            placed = wait_for(apart, 20)
            second = placed[1] if placed else demo.answering_node(VIPS[1])
            first = placed[0] if placed else first
            expect(placed is not None, f"VIP {VIPS[1]} is on another node ({second}, the first on {first})")
            for node in NODES:
                expect(demo.dig(node, "hello.lain") == [VIPS[0]], f"dig @127.0.0.1 hello.lain on {node}")
            holders = {n: {v["key"]: v.get("holder") for v in json.loads(demo.api(n, "/v1/vips") or "[]")}
                       for n in NODES}
            expect(all(h.get(VIPS[0]) == first for h in holders.values()),
                   f"/v1/vips of every node names {first} as the holder of {VIPS[0]}")
            old, new, took = failover(demo)
            expect(new and new != old, f"SIGKILL of {old}'s networkd: {VIPS[0]} answered from {new} after {took:.2f}s")
            pids.append(demo.start_node(old).pid)
            demo.cluster[old].daemon.wait_for_log("DNAT rules in place", timeout=30)
            expect(demo.answering_node(), f"{VIPS[0]} still answers after {old}'s networkd came back")
    except Exception as e:
        expect(False, f"the scenario failed half-way: {type(e).__name__}: {e}")
    finally:
        made = demo.prefix
        demo.close()
    expect(not [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                if n.startswith(made)], f"no namespace {made}-* left")
    expect(not [p for p in pids if alive(p)], "no daemon, container server or etcd process left")
    expect(not os.path.exists(demo.workdir), "no temp files left")
    expect(host_firewall() == firewall_before, "the host's iptables rules are unchanged")
    failed = [what for ok, what in results if not ok]
    print(f"demo-check: {len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours is gone for every purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def interactive() -> int:
    demo = DemoCluster()
    try:
        print("building: etcd, 3 nodes with a container each, a client (network namespaces) ...", flush=True)
        demo.build().start()
        first = wait_for(demo.answering_node, 40)
        if not first:
            print("the VIP did not come up; daemon logs:\n" + demo.cluster.logs(), file=sys.stderr)
            return 1
        ns = {n: demo.cluster[n].ns.name for n in NODES}
        venv = os.path.join(os.path.dirname(sys.executable), "networkd")
        print(f"""
networkd demo: nodes {', '.join(f'{n} ({demo.cluster[n].ip}, netns {ns[n]})' for n in NODES)}
VIPs {VIPS[0]} and {VIPS[1]} -> port 8080 of the container of the node that holds them.

Try, in another terminal (as root):
  # the VIP, from a client on the bridge, through the holder's DNAT to its container
  ip netns exec {demo.client.name} curl http://{VIPS[0]}/
  # each node's own DNS and API
  ip netns exec {ns['n1']} dig @127.0.0.1 hello.lain +short
  ip netns exec {ns['n2']} curl -s 127.0.0.1:3000/v1/vips
  # a live view of one node
  ip netns exec {ns['n1']} {venv} status --watch
  # SIGKILL the holder's networkd and watch {VIPS[0]} move here (the demo restarts it)
  {demo.workdir}/kill-holder
  # what is in etcd
  ETCDCTL_API=3 etcdctl --endpoints={demo.etcd.endpoint} get --prefix /lain

Watching {VIPS[0]} (now on {first}); Ctrl-C removes everything.""", flush=True)
        watch(demo, first)
    except KeyboardInterrupt:
        pass
    finally:
        print("\nremoving namespaces, processes and temp files ...", flush=True)
        demo.close()
        print("done.")
    return 0


def watch(demo: DemoCluster, holder: str) -> None:
    while True:
        time.sleep(0.05)
        dead = [n for n in NODES if not demo.cluster[n].daemon.running()]
        if dead:
            died = time.monotonic()
            for name in dead:
                print(f"{time.strftime('%H:%M:%S')} {name}'s networkd died ({demo.cluster[name].daemon.process.returncode})",
                      flush=True)
            new = wait_for(lambda: (n := demo.answering_node()) and n not in dead and n, 20, interval=0.02)
            if new:
                print(f"{time.strftime('%H:%M:%S')} {VIPS[0]} answers from {new}: failover {time.monotonic() - died:.2f}s",
                      flush=True)
                holder = new
            for name in dead:
                demo.start_node(name)
                print(f"{time.strftime('%H:%M:%S')} restarted {name}'s networkd", flush=True)
            continue
        now = demo.answering_node()
        if now and now != holder:
            print(f"{time.strftime('%H:%M:%S')} {VIPS[0]} moved {holder} -> {now}", flush=True)
            holder = now


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="run the scenario non-interactively and assert it")
    args = parser.parse_args()
    reason = netns_possible()
    if reason is not None:
        print(f"networkd demo: the VIP demo needs network namespaces: {reason}", file=sys.stderr)
        return NOT_ROOT
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    return check() if args.check else interactive()


if __name__ == "__main__":
    sys.exit(main())
