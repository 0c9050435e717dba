"""What the HTTP API shows, handed to it once: ``ApiParts``.

networkd/app.py builds one when it adds the API (last, so every part
exists) and passes it to the API service; the API reads nothing else.  A
part is None while it is disabled (``--no-dns``, ``--no-vips``, no leader
task) or not built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from networkd.views import DnsPart, VipPart


@dataclass(frozen=True)
class ApiParts:
    reactor: Any
    client: Any  # EtcdClient: its endpoint and fail-overs are shown; the health probe reads through it
    etcd_root: str
    hostname: str
    node_ip: str | None
    dns_listen: Any  # ListenAddress, shown as given
    # prefix -> PrefixWatcher: a read-only view of the root's own map (live)
    watchers: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    session: Any | None = None  # the lease Session, once a part borrowed it
    dns: DnsPart | None = None
    vips: VipPart | None = None
    resolv_conf: Any | None = None  # ResolvConfGuardian
    leader: Any | None = None  # LeaderElection
    leader_tasks: Any | None = None  # LeaderTasks

    @property
    def probe_key(self) -> bytes:
        """What the health probe reads when nothing watches etcd."""
        return self.etcd_root.encode() + b"/"
