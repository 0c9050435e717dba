"""Evidence taken the moment two nodes carry one VIP (bench/cluster.py; never expected).

An overlap seen once in 22 runs, with no logs kept, could not be explained
afterwards: what each node's kernel held (lifetimes), whose lock it was on
which lease, and what each daemon believed were gone by then.  So a thread
looks at the address monitor's state every ``interval`` and, the first time
an IP has two or more holders, takes at once, for every node carrying it:

* ``ip -d -o addr show dev eth0`` in its namespace (valid_lft/preferred_lft:
  were the lifetimes bound, and to what);
* its daemon's ``/v1/vips`` entry for the IP and its ``/v1/status`` lease part
  (curl in the namespace: the API listens on 127.0.0.1:3000 there);

and from etcd (its HTTP gateway, on the host): the lock key with its lease
and revisions, each node's members key (its live lease), and every lease's
remaining TTL.  It takes the same again ``FOLLOW_UPS`` seconds later while
the overlap lasts (were lifetimes renewed?).  Cheap: nothing runs until an
overlap is seen, and at most ``limit`` IPs are captured per run.

The monitor's ``holders_now()`` can show two holders for a few ms during a
clean hand-over (a removal read after the next holder's add, though dated
before it); such a capture says ``still_overlapping: false`` and the bench's
``overlaps`` (from the intervals) will not list it.
"""

from __future__ import annotations

import base64
import json
import subprocess
import threading
import time

from bench.vipnode import b64, etcd_post, etcd_range

FOLLOW_UPS = (1.0, 3.0, 10.0)  # seconds after the first capture


def _api(ns: str, path: str, timeout: float = 4.0) -> str:
    """GET ``path`` of the daemon's API in namespace ``ns`` (it listens on 127.0.0.1:3000 there)."""
    return _run(["ip", "netns", "exec", ns, "curl", "-s", "-m", f"{timeout:g}", f"http://127.0.0.1:3000{path}"],
                timeout + 5)


def _run(cmd: list[str], timeout: float = 5.0) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return out.stdout + (f"\n[stderr] {out.stderr}" if out.stderr.strip() else "")
    except subprocess.TimeoutExpired:
        return f"[timed out after {timeout} s]"


class OverlapEvidence:
    """A thread that captures evidence for each IP the monitor shows with two holders."""

    holders = 2  # an overlap (a smoke test of the capture may set 1)

    def __init__(self, monitor, *, etcd_endpoint: str, root: str, namespaces: dict[str, str],
                 written: float, interval: float = 0.05, limit: int = 6, path: str | None = None):
        self.monitor = monitor
        self.etcd = etcd_endpoint
        self.root = root
        self.namespaces = namespaces
        self.written = written
        self.interval = interval
        self.limit = limit
        self.path = path  # each capture is appended there as a JSON line at once (a failed run keeps them)
        self.captures: list[dict] = []
        self._seen: set[str] = set()
        self._follow: list[tuple[float, str, int]] = []  # (when, ip, which follow-up)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="overlap-evidence", daemon=True)

    def __enter__(self) -> "OverlapEvidence":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            holders = self.monitor.holders_now()
            for ip, nodes in sorted(holders.items()):
                if len(nodes) >= self.holders and ip not in self._seen and len(self._seen) < self.limit:
                    self._seen.add(ip)
                    self._capture(ip, sorted(nodes), 0)
                    self._follow += [(now + d, ip, i + 1) for i, d in enumerate(FOLLOW_UPS)]
            for item in [f for f in self._follow if f[0] <= time.monotonic()]:
                self._follow.remove(item)
                nodes = sorted(self.monitor.holders_now().get(item[1], ()))
                if len(nodes) >= self.holders:
                    self._capture(item[1], nodes, item[2])

    def _capture(self, ip: str, nodes: list[str], which: int) -> None:
        began = time.monotonic()
        entry: dict = {"ip": ip, "nodes": nodes, "follow_up": which, "at": round(began - self.written, 3),
                       "wall": time.strftime("%H:%M:%S", time.gmtime()) + f".{int(time.time() % 1 * 1000):03d}Z"}
        try:
            entry["addresses"] = {n: _run(["ip", "netns", "exec", self.namespaces[n], "ip", "-d", "-o", "addr",
                                           "show", "dev", "eth0"]) for n in nodes}
            entry["etcd"] = self._etcd(ip, nodes)
            entry["daemons"] = {n: self._daemon(n, ip) for n in nodes}
            entry["addresses_after"] = {n: _run(["ip", "netns", "exec", self.namespaces[n], "ip", "-o", "addr",
                                                 "show", "dev", "eth0", "to", f"{ip}/32"]) for n in nodes}
        except Exception as e:  # noqa: BLE001 - evidence is best effort; the run goes on
            entry["error"] = repr(e)
        entry["took"] = round(time.monotonic() - began, 3)
        entry["still_overlapping"] = len(self.monitor.holders_now().get(ip, ())) >= self.holders
        self.captures.append(entry)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def _etcd(self, ip: str, nodes: list[str]) -> dict:
        out: dict = {}
        lock = f"{self.root}/networkd/vips/{ip}.lock"
        reply = etcd_post(self.etcd, "/v3/kv/range", {"key": b64(lock)})
        out["lock"] = [{k: (base64.b64decode(v).decode() if k in ("key", "value") else v) for k, v in kv.items()}
                       for kv in reply.get("kvs", [])]
        out["revision"] = reply.get("header", {}).get("revision")
        members = {}
        for n in nodes:
            key = f"{self.root}/networkd/vips/members/{n}"
            kvs = etcd_post(self.etcd, "/v3/kv/range", {"key": b64(key)}).get("kvs", [])
            members[n] = [{"lease": kv.get("lease"), "create_revision": kv.get("create_revision"),
                           "mod_revision": kv.get("mod_revision")} for kv in kvs]
        out["members"] = members
        leases = {}
        ids = {kv.get("lease") for kv in out["lock"]} | {m["lease"] for v in members.values() for m in v}
        for lease in sorted(i for i in ids if i):
            reply = etcd_post(self.etcd, "/v3/lease/timetolive", {"ID": lease, "keys": True})
            leases[lease] = {"TTL": reply.get("TTL"), "grantedTTL": reply.get("grantedTTL"),
                             "keys": [base64.b64decode(k).decode() for k in reply.get("keys", [])
                                      if b".lock" in base64.b64decode(k)]}
        out["leases"] = leases
        return out

    def _daemon(self, node: str, ip: str) -> dict:
        ns = self.namespaces[node]
        out: dict = {}
        text = _api(ns, "/v1/status")
        try:
            status = json.loads(text)
            out["status"] = {"session": status.get("session"), "vips": status.get("vips"),
                             "etcd": status.get("etcd")}  # with each watched prefix's revision: a stale one?
        except ValueError:
            out["status"] = text[:3000]
        text = _api(ns, "/v1/vips")
        try:
            body = json.loads(text)
            entries = body if isinstance(body, list) else body.get("vips", body)
            out["vip"] = [e for e in entries if isinstance(e, dict) and e.get("ip") == ip]
        except ValueError:
            out["vip"] = text[:3000]
        return out


def stale_views(etcd_endpoint: str, root: str, namespaces: dict[str, str]) -> dict:
    """At the end of a run (at rest): per daemon, the VIPs whose holder in its lock snapshot is not the
    lock's holder in etcd, and those it says it holds (``held_by_me``) whose lock is not its own.

    A daemon whose lock watch went silent (no error, no events) keeps an old snapshot until the
    periodic re-read (300 s): it would neither see its own lock deleted nor another node take it.
    """
    prefix = f"{root}/networkd/vips/"
    locks = {key[len(prefix):-len(".lock")]: holder
             for key, holder in etcd_range(etcd_endpoint, prefix).items() if key.endswith(".lock")}
    out: dict = {"nodes": {}}
    for node, ns in sorted(namespaces.items()):
        text = _api(ns, "/v1/vips", 10)
        try:
            body = json.loads(text)
        except ValueError:
            out["nodes"][node] = {"error": text[:300]}
            continue
        entries = body if isinstance(body, list) else body.get("vips", [])
        wrong_view = {e["ip"]: [e.get("holder"), locks.get(e["ip"])] for e in entries
                      if e.get("floating") and e.get("holder") != locks.get(e["ip"])}
        not_ours = {e["ip"]: locks.get(e["ip"]) for e in entries if e.get("held_by_me") and locks.get(e["ip"]) != node}
        status = _api(ns, "/v1/status", 5)
        try:
            revisions = {p["prefix"]: p["revision"] for p in json.loads(status)["etcd"]["prefixes"]}
        except (ValueError, KeyError, TypeError):
            revisions = status[:300]
        if wrong_view or not_ours:
            out["nodes"][node] = {"wrong_view": wrong_view, "held_by_me_not_ours": not_ours, "revisions": revisions}
    return out
