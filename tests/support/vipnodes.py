"""Test nodes for VIPs: namespaces on a bridge, each reaching etcd, each with a daemon.

etcd listens on the host's 127.0.0.1, which a daemon inside a node namespace
cannot reach.  ``NsForwarder`` opens a listening socket *inside* the node's
namespace (a short-lived thread joins the namespace with setns(2); a socket
stays in the namespace it was made in) and relays its connections, from the
host side, to etcd.  So every node uses ``--etcd http://127.0.0.1:PORT`` in
its own namespace, and ``cut()``/``heal()`` partition one node from etcd.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import threading
import time

from tests.support.daemon import Daemon
from tests.support.tcpproxy import TCPProxy

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def socket_in_netns(netns: str, host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket that belongs to network namespace ``netns``."""

    def make():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(64)
        return s

    return in_netns(netns, make)


class NsForwarder(TCPProxy):
    """127.0.0.1:port inside ``netns`` -> 127.0.0.1:target_port on the host; can be cut."""

    def __init__(self, netns: str, target_port: int):
        super().__init__(target_port, listener=socket_in_netns(netns))


def pod_group(app: str, proc: str, placements: list[tuple[int, str, str, str]], proctype: str = "proc",
              states: dict | None = None) -> str:
    """A deployd pod group value: placements of (instance, node name, node ip, container ip);
    ``states``: instance -> extra pod fields, e.g. ``{"State": 3, "Healthst": 0}`` (deployd's runtime state)."""
    return json.dumps({
        "Spec": {"Name": f"{app}.{proctype}.{proc}", "Namespace": app},
        "Pods": [
            {"InstanceNo": instance, **(states or {}).get(instance, {}), "Containers": [
                {"NodeName": node, "NodeIp": node_ip, "ContainerIp": container_ip, "ContainerPort": 80}]}
            for instance, node, node_ip, container_ip in placements
        ],
    })


def vip_value(app: str, proc: str, ports: list[dict], excluded: list[str] | None = None) -> str:
    value = {"app": app, "proc": proc, "ports": ports}
    if excluded is not None:
        value["excluded_nodes"] = excluded
    return json.dumps(value)


class Node:
    """One namespace with its etcd forwarder and (once started) its daemon."""

    def __init__(self, name: str, ns, ip: str, etcd_port: int, etcd_root: str, firewall: str, ttl: int = 3):
        self.name = name
        self.ns = ns
        self.ip = ip
        self.forwarder = NsForwarder(ns.name, etcd_port)
        self.etcd_root = etcd_root
        self.firewall = firewall
        self.ttl = ttl
        self.daemon: Daemon | None = None
        self.api_port: int | None = None
        self.extra_args: list[str] = []  # more daemon options, e.g. --notify-script

    def args(self) -> list[str]:
        return [
            "--etcd", self.forwarder.endpoint, "--etcd-root", self.etcd_root,
            "--hostname", self.name, "--interface", "eth0", "--node-ip", self.ip,
            "--no-dns", "--no-resolv-conf", "--api-listen", "127.0.0.1:3000",  # inside the namespace: always free
            "--lock-ttl", str(self.ttl), "--firewall-backend", self.firewall, *self.extra_args,
        ]

    def start(self, wait: bool = True) -> Daemon:
        self.daemon = Daemon(self.args(), netns=self.ns.name).start()
        if wait:
            self.daemon.wait_for_log("DNAT rules in place", timeout=20)
        return self.daemon

    def addresses(self) -> set[str]:
        """The /32 addresses on eth0, parsed exactly."""
        out = self.ns.run("ip", "-o", "-4", "addr", "show", "dev", "eth0").stdout
        found = set()
        for line in out.splitlines():
            parts = line.split()
            if "inet" in parts:
                cidr = parts[parts.index("inet") + 1]
                ip, _, prefix = cidr.partition("/")
                if prefix == "32":
                    found.add(ip)
        return found

    def nat(self) -> list[str]:
        """Our chains' rules as iptables-save prints them, for the back end in use."""
        save = "iptables-legacy-save" if self.firewall == "legacy" else "iptables-nft-save"
        out = self.ns.run(save, "-t", "nat").stdout
        return sorted(line for line in out.splitlines() if line.startswith("-A lain-"))

    def dnat(self) -> set[tuple[str, str, str]]:
        """(chain, match 'ip:port/proto', target 'ip:port') of every DNAT rule of ours."""
        rules = set()
        for line in self.nat():
            t = line.split()
            d = t[t.index("-d") + 1].split("/")[0]
            rules.add((t[1], f"{d}:{t[t.index('--dport') + 1]}/{t[t.index('-p') + 1]}",
                       t[t.index("--to-destination") + 1]))
        return rules

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.kill()
        self.forwarder.close()


class AddressSampler:
    """Samples which nodes carry ``ip`` every ``interval`` seconds, over netlink in each namespace."""

    def __init__(self, nodes: list["Node"], ip: str, interval: float = 0.01):
        self.ip = ip
        self.interval = interval
        self._namespaces = {n.name: n.ns.name for n in nodes}
        self._ipr: dict = {}
        self.samples: list[tuple[float, frozenset[str]]] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def holders_now(self) -> frozenset[str]:
        found = set()
        for name, ipr in self._ipr.items():
            for msg in ipr.get_addr(family=socket.AF_INET):
                if msg.get_attr("IFA_ADDRESS") == self.ip and msg["prefixlen"] == 32:
                    found.add(name)
        return frozenset(found)

    def _run(self) -> None:
        # pyroute2's sync API runs an event loop of its own: only in a thread without one.
        from pyroute2 import IPRoute

        try:
            self._ipr = {name: IPRoute(netns=ns) for name, ns in self._namespaces.items()}
            self._ready.set()
            while not self._stop.is_set():
                self.samples.append((time.monotonic(), self.holders_now()))
                time.sleep(self.interval)
        finally:
            self._ready.set()
            for ipr in self._ipr.values():
                ipr.close()

    def __enter__(self) -> "AddressSampler":
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(2)

    def overlaps(self) -> list[tuple[float, frozenset[str]]]:
        return [s for s in self.samples if len(s[1]) > 1]

    def first(self, predicate, after: float = 0.0) -> float | None:
        for t, holders in self.samples:
            if t >= after and predicate(holders):
                return t
        return None


class Cluster:
    """Node namespaces on one bridge, each with an etcd forwarder and a daemon."""

    def __init__(self, lan, etcd, etcd_root: str, firewall: str, ttl: int = 3):
        self.lan = lan
        self.etcd = etcd
        self.root = etcd_root
        self.firewall = firewall
        self.ttl = ttl
        self.nodes: dict[str, Node] = {}

    def add(self, name: str, host: int) -> Node:
        ip = f"10.77.0.{host}"
        ns = self.lan.add_node(name, f"{ip}/24")
        node = Node(name, ns, ip, self.etcd.client_port, self.root, self.firewall, self.ttl)
        self.nodes[name] = node
        return node

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def start(self, *names: str) -> None:
        for name in names or list(self.nodes):
            self.nodes[name].start(wait=False)
        for name in names or list(self.nodes):
            self.nodes[name].daemon.wait_for_log("DNAT rules in place", timeout=20)

    def put_vip(self, key: str, value: str) -> None:
        self.etcd.put(f"{self.root}/config/vips/{key}", value)

    def delete_vip(self, key: str) -> None:
        self.etcd.delete(f"{self.root}/config/vips/{key}")

    def put_pods(self, app: str, proc: str, placements, states: dict | None = None) -> None:
        """placements: (instance, node name, container ip); states: instance -> pod fields (State, Healthst)."""
        full = [(i, n, self.nodes[n].ip if n in self.nodes else "", cip) for i, n, cip in placements]
        self.etcd.put(f"{self.root}/deployd/pod_groups/{app}/{app}.proc.{proc}",
                      pod_group(app, proc, full, states=states))

    def holders_of(self, ip: str) -> set[str]:
        return {name for name, node in self.nodes.items() if ip in node.addresses()}

    def lock_holder(self, ip: str) -> str | None:
        return self.etcd.get_prefix(f"{self.root}/networkd/vips/{ip}.lock").get(f"{self.root}/networkd/vips/{ip}.lock")

    def app_keys(self) -> dict[str, str]:
        """``<app>/<proc>/<ip>:<port>`` -> hostname, as etcd has them."""
        prefix = f"{self.root}/networkd/apps/"
        return {k[len(prefix):]: v for k, v in self.etcd.get_prefix(prefix).items()}

    def close(self) -> None:
        for node in self.nodes.values():
            try:
                node.stop()
            finally:
                node.close()

    def logs(self) -> str:
        return "\n".join(f"==== {n}\n{node.daemon.log() if node.daemon else ''}" for n, node in self.nodes.items())


def join_netns(netns: str) -> None:
    """Move the calling thread (only it) into network namespace ``netns``."""
    fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({netns}): {os.strerror(errno)}")
    finally:
        os.close(fd)


def in_netns(netns: str | None, make):
    """``make()`` run in a thread that joined ``netns`` (here when None): the sockets it makes stay there."""
    if netns is None:
        return make()
    result: dict = {}

    def run():
        try:
            join_netns(netns)
            result["value"] = make()
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


class ArpWatch:
    """Inside one node: when ``ip`` was added (netlink) and every ARP frame about it sent on eth0.

    ``added``: monotonic times of RTM_NEWADDR for ip/32; ``frames``: (time, op) with op 1 =
    request, 2 = reply, for frames whose sender IP is ``ip``.
    """

    RTMGRP_IPV4_IFADDR = 0x10
    RTM_NEWADDR = 20

    def __init__(self, netns: str, ip: str, interface: str = "eth0"):
        self.ip = socket.inet_aton(ip)
        self.added: list[float] = []
        self.frames: list[tuple[float, int]] = []

        def make():
            nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            nl.bind((0, self.RTMGRP_IPV4_IFADDR))
            # ETH_P_ALL: only those sockets also see the frames this host sends
            raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            raw.bind((interface, 0x0003))
            return nl, raw

        self._nl, self._raw = in_netns(netns, make)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import select
        import struct

        while not self._stop.is_set():
            ready, _, _ = select.select([self._nl, self._raw], [], [], 0.05)
            now = time.monotonic()
            for sock in ready:
                try:
                    data = sock.recv(65536)
                except OSError:  # ENETDOWN while the link is down
                    continue
                if sock is self._raw:
                    if len(data) >= 42 and data[12:14] == b"\x08\x06" and data[28:32] == self.ip:
                        self.frames.append((now, struct.unpack("!H", data[20:22])[0]))
                    continue
                offset = 0
                while offset + 16 <= len(data):
                    length, kind = struct.unpack_from("=IH", data, offset)
                    if length < 16:
                        break
                    if kind == self.RTM_NEWADDR:
                        body = data[offset + 16: offset + length]
                        prefixlen = body[1]
                        attrs = body[8:]
                        while len(attrs) >= 4:
                            alen, atype = struct.unpack_from("=HH", attrs)
                            if alen < 4:
                                break
                            if atype in (1, 2) and attrs[4:8] == self.ip and prefixlen == 32:
                                self.added.append(now)
                                break
                            attrs = attrs[(alen + 3) & ~3:]
                    offset += (length + 3) & ~3

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1)
        self._nl.close()
        self._raw.close()
