"""Network namespaces as test "nodes", joined by a bridge in its own namespace.

Nothing here touches the host's interfaces: the bridge lives in a namespace
of its own, and each node gets a veth pair whose far end is in that bridge
namespace.
"""

from __future__ import annotations

import subprocess
import uuid


def sh(*args: str, check: bool = True, netns: str | None = None) -> subprocess.CompletedProcess:
    cmd = list(args)
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


class Namespace:
    def __init__(self, name: str):
        self.name = name
        sh("ip", "netns", "add", name)
        self.run("ip", "link", "set", "lo", "up")

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh(*args, check=check, netns=self.name)

    def delete(self) -> None:
        # Kill whatever our tests left running inside, then drop the namespace.
        pids = sh("ip", "netns", "pids", self.name, check=False).stdout.split()
        for pid in pids:
            sh("kill", "-9", pid, check=False)
        sh("ip", "netns", "del", self.name, check=False)


class Lan:
    """A bridge (inside its own namespace) with node namespaces plugged into it.

    ``add_node("n1", "10.77.0.11/24")`` gives a namespace with interface
    ``eth0`` holding that address.
    """

    def __init__(self, prefix: str | None = None):
        self.prefix = prefix or f"nd{uuid.uuid4().hex[:5]}"
        self.hub = Namespace(f"{self.prefix}-hub")
        self.hub.run("ip", "link", "add", "br0", "type", "bridge")
        self.hub.run("ip", "link", "set", "br0", "up")
        self.nodes: dict[str, Namespace] = {}

    def add_node(self, name: str, cidr: str, ifname: str = "eth0") -> Namespace:
        ns = Namespace(f"{self.prefix}-{name}")
        index = len(self.nodes)
        outer = f"{self.prefix}v{index}"
        sh("ip", "link", "add", outer, "netns", self.hub.name, "type", "veth",
           "peer", "name", ifname, "netns", ns.name)
        self.hub.run("ip", "link", "set", outer, "master", "br0")
        self.hub.run("ip", "link", "set", outer, "up")
        ns.run("ip", "addr", "add", cidr, "dev", ifname)
        ns.run("ip", "link", "set", ifname, "up")
        self.nodes[name] = ns
        return ns

    def delete(self) -> None:
        for ns in self.nodes.values():
            ns.delete()
        self.hub.delete()
