"""The three snapshots the VIP manager works from, parsed and validated.

VIP configs, deployd pod groups and the lock prefix arrive whole
(networkd.etcd.reflector); each is parsed here into what the planner
takes.  A bad key is logged once per distinct error and shown in the API;
the others apply.  A pod group whose new value is bad keeps its last good
containers, so one malformed write from deployd does not take VIPs away
([BUG 10]).
"""

from __future__ import annotations

from typing import Callable

from twisted.logger import Logger

from networkd.serial import ErrorLog
from networkd.vips.model import Container, InvalidValue, VipConfig, parse_pod_group, parse_vips
from networkd.vips.planner import MEMBERS, ContainerIndex, lock_holders, member_health, member_ready

log = Logger()


class VipInputs:
    def __init__(self, keys):
        self._keys = keys
        self.configs: dict[str, VipConfig] = {}
        self.containers: ContainerIndex = ContainerIndex()
        self.holders: dict[str, str] = {}  # ip -> hostname, from the lock snapshot
        self.locks_revision = 0  # that snapshot's etcd revision
        self.locks_deleted = None  # its keys deleted since the snapshot before, at which revision
        self.members: frozenset[str] = frozenset()  # live daemons (presence keys)
        self.member_health: dict[str, frozenset[str] | None] = {}  # daemon -> VIPs it is healthy for (None: says not)
        self.member_ready: dict[str, bool | None] = {}  # daemon -> ready to receive a VIP (None: says nothing)
        self._member_values: dict[str, str] = {}
        self.seen = {"configs": False, "pods": False, "locks": False}
        self._config_errors = ErrorLog(log, "VIP config skipped: {error}")
        self._pod_errors = ErrorLog(log, "pod group skipped: {error}")
        self._pods_good: dict[str, list[Container]] = {}
        self.on_change: Callable[[], None] = lambda: None  # after a configs or locks snapshot (vips.history)

    @property
    def invalid_keys(self) -> dict[str, str]:
        return self._config_errors.errors

    @property
    def pod_errors(self) -> dict[str, str]:
        return self._pod_errors.errors

    @property
    def complete(self) -> bool:
        """Every snapshot arrived at least once: safe to decide about locks."""
        return all(self.seen.values())

    def configs_snapshot(self, snapshot) -> None:
        self.configs, invalid = parse_vips(snapshot.values, self._keys.vips)
        self._config_errors.update(invalid)
        self.seen["configs"] = True
        self.on_change()

    def pods_snapshot(self, snapshot) -> None:
        errors, current = {}, {}
        for key, raw in snapshot.values.items():
            try:
                current[key] = parse_pod_group(key, raw)
            except InvalidValue as e:
                full = self._keys.pod_groups + key
                errors[full] = f"{full}: {e}"
                if key in self._pods_good:
                    current[key] = self._pods_good[key]
        self._pod_errors.update(errors)
        self._pods_good = current
        self.containers = ContainerIndex(c for cs in current.values() for c in cs)
        self.seen["pods"] = True

    def locks_snapshot(self, snapshot) -> None:
        self.holders, self.members = lock_holders(snapshot.values)
        values = {name: snapshot.values.get(MEMBERS + name, "") for name in self.members}
        if values != self._member_values:  # parsed again only when a members value changed
            self._member_values, self.member_health = values, {n: member_health(v) for n, v in values.items()}
            self.member_ready = {n: member_ready(v) for n, v in values.items()}
        self.locks_revision = snapshot.revision
        self.locks_deleted = getattr(snapshot, "deleted", None)  # which lock went with its holder's lease (networkd.vips.locks)
        self.seen["locks"] = True
        self.on_change()

    @property
    def member_values(self) -> dict[str, str]:
        """Each live member's raw members value (its peer address: networkd.peers.failsafe)."""
        return self._member_values

    def floating_ips(self):
        return (c.ip for c in self.configs.values() if c.floating)
