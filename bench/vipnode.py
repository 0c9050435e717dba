"""One namespaced node holding VIPs, and its workload: what bench/hold.py and bench/scale.py share.

``VipNode`` builds, in network namespaces (nothing on the host changes), node
"n1" (10.77.0.11 on eth0, the bridge in a namespace of its own) whose
127.0.0.1:<port> reaches the host's etcd through a forwarder (a listening
socket made inside the namespace, relayed from the host side: see
tests/support/vipnodes.py), and optionally every container address local
inside it with a listener on port 80.  ``build_workload`` makes the pod
groups and VIP configs (local ones on n1, the others on "ghost", a node with
no daemon); ``EtcdWriter`` writes them in transactions of 128 puts through
etcd's HTTP gateway over one kept-alive connection.

Clients that must talk to the daemon inside the namespace (DNS on its
127.0.0.1, the API) either make their sockets there (tests/support/vipnodes.py ``in_netns``: a
short-lived thread joins the namespace, and a socket stays in the namespace
it was made in) or join it for their whole thread (``join_netns``: setns(2)
with CLONE_NEWNET changes only the calling thread, ctypes because os.setns
needs Python 3.12).  ``AddressWatch`` times when the local VIPs appear on
eth0 from netlink events, without polling.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.support.daemon import Daemon  # noqa: E402
from tests.support.netns import Lan  # noqa: E402
from tests.support.vipnodes import Cluster, in_netns, pod_group, vip_value  # noqa: E402

NODE, NODE_HOST = "n1", 11
GHOST, GHOST_IP = "ghost", "10.77.0.99"  # a node name with no daemon
CONTAINERS = "10.79.0.0/16"


# -- the workload -----------------------------------------------------------------


def vip_ip(i: int) -> str:
    return f"10.78.{i // 250}.{i % 250 + 1}"


def build_workload(root: str, configs: int, local: int, per_app: int, node_ip: str):
    """(etcd key -> value for pod groups, same for VIP configs, the set of local VIP IPs).

    Local and remote VIPs are interleaved in the address range, ``per_app`` per app."""
    if not 0 <= local <= configs or configs > 250 * 250:
        raise ValueError(f"need 0 <= local ({local}) <= configs ({configs}) <= 62500")
    local_ips, remote_ips = [], []
    for i in range(configs):  # spread the local ones evenly over the range
        (local_ips if (i + 1) * local // configs > i * local // configs else remote_ips).append(vip_ip(i))
    pods, vips = {}, {}
    for kind, ips, node, nip in (("l", local_ips, NODE, node_ip), ("r", remote_ips, GHOST, GHOST_IP)):
        for k in range(0, len(ips), per_app):
            n = k // per_app
            app = f"hold-{kind}{n:03d}"
            container_ip = f"10.79.{n // 250 + (0 if kind == 'l' else 100)}.{n % 250 + 1}"
            pods[f"{root}/deployd/pod_groups/{app}/{app}.proc.web"] = pod_group(
                app, "web", [(1, node, nip, container_ip)])
            for ip in ips[k:k + per_app]:
                vips[f"{root}/config/vips/{ip}"] = vip_value(app, "web", [{"src": "80", "proto": "tcp", "dest": "80"}])
    return pods, vips, set(local_ips)


# -- etcd writes through one kept-alive HTTP connection ------------------------------


class EtcdWriter:
    def __init__(self, endpoint: str):
        host, port = endpoint.split("//", 1)[1].rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)

    def _post(self, path: str, body: dict) -> dict:
        self.conn.request("POST", path, body=json.dumps(body).encode(),
                          headers={"Content-Type": "application/json"})
        answer = self.conn.getresponse()
        reply = json.loads(answer.read())
        if answer.status != 200:
            raise RuntimeError(f"etcd {path}: {answer.status} {reply}")
        return reply

    def put(self, key: str, value: str) -> None:
        self._post("/v3/kv/put", {"key": b64(key), "value": b64(value)})

    def put_all(self, items, batch: int = 128) -> None:
        """Write ``items`` ((key, value) pairs or a dict) in transactions of ``batch`` puts
        (etcd's --max-txn-ops defaults to 128)."""
        items = list(items.items()) if isinstance(items, dict) else list(items)
        for k in range(0, len(items), batch):
            reply = self._post("/v3/kv/txn", {"success": [
                {"requestPut": {"key": b64(key), "value": b64(value)}} for key, value in items[k:k + batch]]})
            if not reply.get("succeeded"):
                raise RuntimeError(f"etcd txn failed: {reply}")

    def close(self) -> None:
        self.conn.close()


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def etcd_post(endpoint: str, path: str, body: dict, timeout: float = 10.0) -> dict:
    """One request to etcd's HTTP gateway (JSON, keys and values base64), its JSON answer."""
    request = urllib.request.Request(f"{endpoint}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return json.loads(answer.read())


def etcd_range(endpoint: str, prefix: str) -> dict[str, str]:
    """key -> value under ``prefix``, through etcd's HTTP gateway (one unary Range)."""
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    reply = etcd_post(endpoint, "/v3/kv/range", {"key": b64(prefix), "range_end": b64(end)})
    return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
            for kv in reply.get("kvs", [])}


# -- the node -----------------------------------------------------------------------


LISTENER = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 80))
s.listen(4096)
while True:
    s.accept()[0].close()
"""


def start_listener(ns) -> subprocess.Popen:
    """Every container address (CONTAINERS) local in namespace ``ns``, one listener on port 80 there."""
    ns.run("ip", "route", "add", "local", CONTAINERS, "dev", "lo")
    listener = subprocess.Popen(["ip", "netns", "exec", ns.name, sys.executable, "-c", LISTENER])
    time.sleep(0.3)
    return listener


class VipNode:
    """Node n1 in a namespace of its own on a bridge, reaching ``etcd``; ``close()`` undoes all."""

    def __init__(self, etcd, root: str, firewall: str = "nft", ttl: int = 3, log=print):
        self.log = log
        self.lan = self.cluster = self.listener = None
        try:
            self.lan = Lan()
            self.cluster = Cluster(self.lan, etcd, root, firewall, ttl=ttl)
            self.node = self.cluster.add(NODE, NODE_HOST)
        except BaseException:
            self.close()
            raise

    @property
    def netns(self) -> str:
        return self.node.ns.name

    @property
    def ip(self) -> str:
        return self.node.ip

    def start_listener(self) -> None:
        """Every container address local in the node's namespace, one listener on port 80."""
        self.listener = start_listener(self.node.ns)

    def start_dns_daemon(self, dns_port: int, extra: list[str], env: dict | None = None) -> Daemon:
        """The daemon with VIPs and DNS on 127.0.0.1:``dns_port`` inside the namespace, API on its
        127.0.0.1:3000; not waited for."""
        args = [a for a in self.node.args() if a != "--no-dns"]
        self.node.daemon = Daemon([*args, "--dns-listen", f"127.0.0.1:{dns_port}", *extra],
                                  netns=self.netns, env=env).start()
        return self.node.daemon

    def close(self, keep_log: bool = False) -> None:
        """Listener, daemon, namespaces (and whatever runs in them); each step even if another failed."""
        steps = []
        listener = self.listener
        if listener is not None:
            steps.append(("listener", lambda: (listener.kill(), listener.wait())))
        if self.cluster is not None:
            steps.append(("daemon", self.cluster.close))
            if not keep_log:
                steps += [(f"workdir of {name}", lambda d=node.daemon: d and shutil.rmtree(d.workdir, ignore_errors=True))
                          for name, node in self.cluster.nodes.items()]
        if self.lan is not None:
            lan = self.lan
            steps.append(("namespaces", lan.delete))

            def leftovers():  # namespaces made before Lan knew of them (a failure half-way through add_node)
                out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
                for line in out.splitlines():
                    name = line.split()[0] if line.split() else ""
                    if name.startswith(lan.prefix + "-"):
                        subprocess.run(["ip", "netns", "del", name], capture_output=True)

            steps.append(("leftover namespaces", leftovers))
        self.listener = self.cluster = self.lan = None
        for what, step in steps:
            try:
                step()
            except Exception as e:  # noqa: BLE001
                self.log(f"cleanup of {what} failed: {e!r}")


class AddressWatch:
    """When each of ``wanted`` (IPv4 /32s) came onto ``interface`` in ``netns``, from netlink events.

    Start it before the daemon: the namespace is fresh, so nothing is there yet.
    ``all_at``: the monotonic time when all of them were present at once (None until then)."""

    RTMGRP_IPV4_IFADDR = 0x10
    RTM_NEWADDR, RTM_DELADDR = 20, 21
    IFA_ADDRESS, IFA_LOCAL = 1, 2

    def __init__(self, netns: str, wanted: set[str], interface: str = "eth0"):
        self.wanted = {socket.inet_aton(ip) for ip in wanted}
        self.index = in_netns(netns, lambda: socket.if_nametoindex(interface))
        self.present: set[bytes] = set()
        self.all_at: float | None = None
        self.done = threading.Event()
        self._nl = in_netns(netns, self._open)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _open(self) -> socket.socket:
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        nl.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        nl.bind((0, self.RTMGRP_IPV4_IFADDR))
        return nl

    def _run(self) -> None:
        while not self._stop.is_set():
            if not select.select([self._nl], [], [], 0.05)[0]:
                continue
            data = self._nl.recv(1 << 20)
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if length < 16:
                    break
                if kind in (self.RTM_NEWADDR, self.RTM_DELADDR):
                    self._address(kind, data[offset + 16: offset + length])
                offset += (length + 3) & ~3
            if self.all_at is None and self.wanted <= self.present:
                self.all_at = time.monotonic()
                self.done.set()

    def _address(self, kind: int, body: bytes) -> None:
        _family, prefixlen, _flags, _scope, index = struct.unpack_from("=BBBBI", body)
        if prefixlen != 32 or index != self.index:
            return
        attrs = body[8:]
        while len(attrs) >= 4:
            alen, atype = struct.unpack_from("=HH", attrs)
            if alen < 4:
                break
            if atype in (self.IFA_ADDRESS, self.IFA_LOCAL) and attrs[4:8] in self.wanted:
                (self.present.add if kind == self.RTM_NEWADDR else self.present.discard)(attrs[4:8])
                return
            attrs = attrs[(alen + 3) & ~3:]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1)
        self._nl.close()
