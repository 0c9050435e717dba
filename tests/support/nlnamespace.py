"""A namespace with an ``eth0`` in which networkd's netlink sockets are made: real kernel, in-process."""

from __future__ import annotations

import uuid
from contextlib import contextmanager

from networkd.vips import netlink as netlink_module
from tests.support.netns import Namespace
from tests.support.vipnodes import in_netns


@contextmanager
def netlink_namespace(monkeypatch, prefix: str = "ndnl"):
    """Yields a Namespace with ``eth0`` up (a veth, its peer ``eth1`` up too); while inside, every
    Netlink socket networkd opens is opened in that namespace (a socket stays where it was made)."""
    ns = Namespace(f"{prefix}{uuid.uuid4().hex[:6]}")
    try:
        ns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        ns.run("ip", "link", "set", "eth0", "up")
        ns.run("ip", "link", "set", "eth1", "up")
        make = netlink_module._socket
        monkeypatch.setattr(netlink_module, "_socket", lambda groups=0: in_netns(ns.name, lambda: make(groups)))
        yield ns
    finally:
        ns.delete()
