"""What this host should carry, derived from the input snapshots and memoized on them.

Snapshots are replaced whole when they change (networkd.vips.inputs), so the
identity of ``configs`` and ``containers`` says whether anything derived
from them can have changed.  A pass at rest (the anti-entropy pass, every
keep-alive's check) then costs set operations, not a walk over every VIP
config: with 1,000 VIPs held that walk was a third of the daemon's CPU.
"""

from __future__ import annotations

from networkd.vips.planner import DnatRule, dnat_rules, floating_configs, local_container, port_scoped_rules


class HostWants:
    def __init__(self, inputs, hostname: str, node_ip: str | None):
        self._inputs, self._hostname, self._node_ip = inputs, hostname, node_ip
        self._placeable: tuple = (None, None, frozenset())  # (configs, containers, VIPs placeable here)
        self._floating: tuple = (None, {})  # (configs, floating configs by IP)
        self._port_rules: tuple = (None, None, frozenset())  # (configs, containers, port-scoped rules)
        self._rules: tuple = (None, None, None, frozenset())  # (configs, containers, active, all rules)

    def _same(self, memo: tuple) -> bool:
        return memo[0] is self._inputs.configs and memo[1] is self._inputs.containers

    def floating(self) -> dict:
        """The floating VIP configs by IP (read, never changed, by the planner)."""
        if self._floating[0] is not self._inputs.configs:
            self._floating = (self._inputs.configs, floating_configs(self._inputs.configs))
        return self._floating[1]

    def placeable(self) -> frozenset[str]:
        """Floating VIPs whose app has a container on this host."""
        if not self._same(self._placeable):
            inputs = self._inputs
            ips = frozenset(ip for ip, c in self.floating().items()
                            if local_container(c, inputs.containers, self._hostname) is not None)
            self._placeable = (inputs.configs, inputs.containers, ips)
        return self._placeable[2]

    def rules(self, active: frozenset[str]) -> frozenset[DnatRule]:
        """Port-scoped DNAT plus the DNAT of the ``active`` floating VIPs."""
        if self._same(self._rules) and self._rules[2] == active:
            return self._rules[3]
        inputs = self._inputs
        if not self._same(self._port_rules):
            port_rules = port_scoped_rules(inputs.configs, inputs.containers, self._hostname, self._node_ip)
            self._port_rules = (inputs.configs, inputs.containers, port_rules)
        rules = set(self._port_rules[2])
        for ip in active:
            config = inputs.configs.get(ip)
            if config is not None and config.floating:
                rules.update(dnat_rules(config, local_container(config, inputs.containers, self._hostname),
                                        self._node_ip))
        self._rules = (inputs.configs, inputs.containers, active, frozenset(rules))
        return self._rules[3]
