"""The etcd key layout, under a configurable root (default ``/lain``).

Same paths as the Go networkd, in the v3 keyspace, so LAIN tooling and docs
keep working.  Prefixes end with ``/`` so that ``vips`` never matches
``vips_old``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    root: str = "/lain"

    @property
    def vips(self) -> str:
        """VIP configs: ``<root>/config/vips/<ip>[:<port>]`` = JSON."""
        return f"{self.root}/config/vips/"

    @property
    def domains(self) -> str:
        """Local DNS names: ``<root>/config/domains/<name>`` = {"ips": [...], "type": ...}."""
        return f"{self.root}/config/domains/"

    @property
    def domain_servers(self) -> str:
        """Forwarding zones: ``<root>/config/domain_servers/<zone>`` = {"servers": ["IP#PORT"]}."""
        return f"{self.root}/config/domain_servers/"

    @property
    def pod_groups(self) -> str:
        """deployd pod groups: ``<root>/deployd/pod_groups/<app>/<podgroup>`` = JSON."""
        return f"{self.root}/deployd/pod_groups/"

    @property
    def vip_locks(self) -> str:
        """VIP locks: ``<root>/networkd/vips/<ip>.lock`` = holder hostname, on its lease."""
        return f"{self.root}/networkd/vips/"

    def vip_lock(self, ip: str) -> str:
        return f"{self.vip_locks}{ip}.lock"

    @property
    def apps(self) -> str:
        """App keys: ``<root>/networkd/apps/<app>/<proc>/<ip>:<port>`` = hostname, on the writer's lease.

        One per port-scoped VIP key a node serves; the cluster's publishers
        (tinydns forwarding zones, webrouter) read them.
        """
        return f"{self.root}/networkd/apps/"

    def app_key(self, app: str, proc: str, ip: str, port: int) -> str:
        return f"{self.apps}{app}/{proc}/{ip}:{port}"

    @property
    def leader(self) -> str:
        """The networkd leader lock: ``<root>/networkd/leader`` = hostname, on its lease."""
        return f"{self.root}/networkd/leader"

    @property
    def deployd_leader(self) -> str:
        """deployd's own leader key, ``IP:PORT`` (written by deployd)."""
        return f"{self.root}/deployd/leader"

    @property
    def swarm_leader(self) -> str:
        """The swarm manager's leader key, ``IP:PORT`` (written by swarm)."""
        return f"{self.root}/swarm/docker/swarm/leader"

    @property
    def tinydns_workers(self) -> str:
        """The app keys of tinydns: ``<root>/networkd/apps/tinydns/worker/<IP>:<PORT>``."""
        return f"{self.apps}tinydns/worker/"

    @property
    def tinydns_fqdns(self) -> str:
        """tinydns data: ``<root>/config/tinydns_fqdns/<name>`` = JSON list of tinydns-data lines."""
        return f"{self.root}/config/tinydns_fqdns/"
