"""The VIP demo's cluster: a private etcd, three "nodes" in network namespaces on one bridge,
each with a "container" namespace running a tiny HTTP server, one networkd per node, and
a client namespace to curl the VIPs from.  ``close()`` removes all of it.

Nothing here touches the host's interfaces, iptables or files: the bridge, the nodes, the
containers and the client are namespaces of their own (tests/support/netns.py); etcd
listens on the host's 127.0.0.1 and each node reaches it through a relay inside its
namespace (tests/support/vipnodes.py); resolv.conf and hosts are temp files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.support.etcd_server import EtcdServer  # noqa: E402
from tests.support.netns import Lan, Namespace, sh  # noqa: E402
from tests.support.vipnodes import Cluster, vip_value  # noqa: E402

NODES = ("n1", "n2", "n3")
VIPS = ("10.77.0.100", "10.77.0.101")
CLIENT_IP = "10.77.0.50"
APP, PROC = "hello", "web"

HTTP_SERVER = r"""
import http.server, sys
text = sys.argv[1].encode() + b"\n"
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Hello).serve_forever()
"""


def container_ip(index: int) -> str:
    return f"172.30.{index}.2"


class DemoCluster:
    def __init__(self, firewall: str = "nft"):
        self.prefix = f"ndm{uuid.uuid4().hex[:4]}"
        self.workdir = tempfile.mkdtemp(prefix="networkd-demo-")
        self.etcd: EtcdServer | None = None
        self.lan: Lan | None = None
        self.cluster: Cluster | None = None
        self.containers: dict[str, Namespace] = {}
        self.client: Namespace | None = None
        self.servers: list[subprocess.Popen] = []
        self.firewall = firewall

    # -- building ----------------------------------------------------------------

    def build(self) -> "DemoCluster":
        self.etcd = EtcdServer().start()
        self.lan = Lan(self.prefix)
        self.cluster = Cluster(self.lan, self.etcd, "/lain", self.firewall)
        for index, name in enumerate(NODES, start=1):
            node = self.cluster.add(name, 10 + index)
            node.ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")  # this namespace's own setting
            self._container(name, index, node.ns)
        self.client = self.lan.add_node("client", f"{CLIENT_IP}/24")
        return self

    def _container(self, node: str, index: int, node_ns: Namespace) -> None:
        """A namespace behind the node (veth, 172.30.<i>.0/24) serving HTTP on :8080."""
        ns = Namespace(f"{self.prefix}-c{index}")
        self.containers[node] = ns
        sh("ip", "link", "add", "ctr0", "netns", node_ns.name, "type", "veth", "peer", "name", "eth0",
           "netns", ns.name)
        node_ns.run("ip", "addr", "add", f"172.30.{index}.1/24", "dev", "ctr0")
        node_ns.run("ip", "link", "set", "ctr0", "up")
        ns.run("ip", "addr", "add", f"{container_ip(index)}/24", "dev", "eth0")
        ns.run("ip", "link", "set", "eth0", "up")
        ns.run("ip", "route", "add", "default", "via", f"172.30.{index}.1")
        log = open(os.path.join(self.workdir, f"container-{node}.log"), "ab")
        self.servers.append(subprocess.Popen(
            ["ip", "netns", "exec", ns.name, sys.executable, "-c", HTTP_SERVER,
             f"hello from the container on {node} ({container_ip(index)})"],
            stdout=log, stderr=subprocess.STDOUT))
        log.close()

    def node_args(self, name: str) -> list[str]:
        """The node's daemon: VIPs, and DNS on 127.0.0.1:53 inside its namespace (temp resolv.conf and hosts)."""
        node = self.cluster[name]
        resolv = os.path.join(self.workdir, f"resolv-{name}.conf")
        hosts = os.path.join(self.workdir, f"hosts-{name}")
        if not os.path.exists(resolv):
            with open(resolv, "w") as f:
                f.write("# networkd demo: no upstream, local names only\n")
            with open(hosts, "w") as f:
                f.write(f"{node.ip} {name}.demo\n")
        args = [a for a in node.args() if a not in ("--no-dns", "--no-resolv-conf")]
        return args + ["--dns-listen", "127.0.0.1:53", "--resolv-conf", resolv, "--no-resolv-conf",
                       "--hosts-file", hosts]

    def start_node(self, name: str):
        from tests.support.daemon import Daemon

        node = self.cluster[name]
        node.daemon = Daemon(self.node_args(name), netns=node.ns.name).start()
        with open(os.path.join(self.workdir, f"{name}.pid"), "w") as f:
            f.write(f"{node.daemon.pid}\n")
        return node.daemon

    def start(self) -> None:
        for name in NODES:
            self.start_node(name)
        for name in NODES:
            self.cluster[name].daemon.wait_for_log("DNAT rules in place", timeout=30)
        self.cluster.put_pods(APP, PROC, [(i, name, container_ip(i)) for i, name in enumerate(NODES, start=1)])
        for vip in VIPS:
            self.cluster.put_vip(vip, vip_value(APP, PROC, [{"src": 80, "proto": "tcp", "dest": 8080}]))
        self.etcd.put("/lain/config/domains/hello.lain", json.dumps({"ips": [VIPS[0]], "type": ""}))
        self.etcd.put("/lain/config/domains/*.apps.lain", json.dumps({"ips": list(VIPS), "type": ""}))
        self._write_kill_script()

    def _write_kill_script(self) -> None:
        path = os.path.join(self.workdir, "kill-holder")
        with open(path, "w") as f:
            f.write(f"""#!/bin/sh
# SIGKILL the networkd that holds VIP {VIPS[0]} now (the demo restarts it after the failover).
holder=$(ETCDCTL_API=3 etcdctl --endpoints={self.etcd.endpoint} get --print-value-only /lain/networkd/vips/{VIPS[0]}.lock)
[ -n "$holder" ] || {{ echo "nobody holds {VIPS[0]} right now" >&2; exit 1; }}
echo "killing $holder's networkd (pid $(cat {self.workdir}/$holder.pid))"
kill -9 "$(cat {self.workdir}/$holder.pid)"
""")
        os.chmod(path, 0o755)

    # -- looking -----------------------------------------------------------------

    def curl_vip(self, vip: str = VIPS[0], timeout: float = 0.5) -> str | None:
        """The body the VIP answers with from the client namespace, or None."""
        result = self.client.run("curl", "-sS", "--max-time", str(timeout), f"http://{vip}/", check=False)
        return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else None

    def answering_node(self, vip: str = VIPS[0]) -> str | None:
        body = self.curl_vip(vip)
        return next((n for n in NODES if body and f"container on {n} " in body), None)

    def holder(self, vip: str = VIPS[0]) -> str | None:
        return self.cluster.lock_holder(vip)

    def dig(self, node: str, name: str) -> list[str]:
        out = self.cluster[node].ns.run("dig", "+short", "+time=1", "+tries=1", "@127.0.0.1", name, check=False)
        return out.stdout.split()

    def api(self, node: str, path: str) -> str:
        return self.cluster[node].ns.run("curl", "-sS", "--max-time", "3", f"http://127.0.0.1:3000{path}",
                                         check=False).stdout

    def namespaces(self) -> list[str]:
        return sorted(name for name in sh("ip", "netns", "list").stdout.split() if name.startswith(self.prefix))

    # -- tearing down --------------------------------------------------------------

    def close(self) -> None:
        """Everything made, in reverse; each step runs even if another failed."""
        steps = [
            lambda: self.cluster and self.cluster.close(),
            *[(lambda p=p: (p.kill(), p.wait(5))) for p in self.servers],
            *[(lambda ns=ns: ns.delete()) for ns in self.containers.values()],
            lambda: self.lan and self.lan.delete(),
            lambda: self.etcd and self.etcd.destroy(),
            lambda: shutil.rmtree(self.workdir, ignore_errors=True),
        ]
        for step in steps:
            try:
                step()
            except Exception as e:  # keep tearing down
                print(f"demo cleanup: {e}", file=sys.stderr)
