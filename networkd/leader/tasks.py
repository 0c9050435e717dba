"""The leader's tasks: keep the published keys equal to what the sources say.

Level-triggered: on any change of a source (deployd's or swarm's leader
key, the tinydns workers), of a target (someone edited the published key)
or of leadership, the whole desired set is computed again and only the keys
whose value differs are written, each guarded by the leader key, one pass
at a time (networkd.serial.SerialJob).  A pass with a failed write is
retried with backoff; nothing is written while not the leader.
"""

from __future__ import annotations

from twisted.application import service
from twisted.logger import Logger

from networkd.backoff import Backoff
from networkd.leader import publish
from networkd.serial import ErrorLog, SerialJob

log = Logger()

# task -> (what it reads, what it writes), as Keys prefix names
WIRING = {
    "deployd": (("deployd_leader",), ("domains",)),
    "swarm": (("swarm_leader",), ("domains",)),
    "tinydns": (("tinydns_workers",), ("domain_servers",)),
    "webrouter": (("vips", "apps"), ("tinydns_fqdns",)),
}
TASKS = tuple(WIRING)


class LeaderTasks(service.Service):
    name = "leader tasks"

    def __init__(self, *, reactor, election, locks, keys, watch, tasks, domain: str | None = None,
                 backoff: Backoff | None = None):
        self._reactor = reactor
        self._election = election
        self._locks = locks
        self._keys = keys
        self.tasks = tuple(t for t in TASKS if t in tasks)
        self.zones = ["lain"] + ([domain] if domain and domain != "lain" else [])
        self._job = SerialJob(reactor, self._pass, "leader task", backoff=backoff or Backoff(0.5, 10.0),
                              failed=lambda e: log.warn("leader could not publish: {e}; retrying", e=e))
        self._snapshots: dict = {}
        self._pending = None
        self._written: dict = {}  # target key -> (value, revision) of our last write
        self._invalid = ErrorLog(log, "leader task: skipping {key}: {error}")
        self._sources = list(dict.fromkeys(getattr(keys, name) for t in self.tasks for name in WIRING[t][0]))
        self._targets = list(dict.fromkeys(getattr(keys, name) for t in self.tasks for name in WIRING[t][1]))
        # Asked for now, not in startService: a watcher added to a MultiService
        # while it starts its children would be started twice.
        self._watchers = {prefix: watch(prefix) for prefix in self._sources + self._targets}

    @property
    def invalid_keys(self) -> dict:
        return self._invalid.errors

    @property
    def last_error(self) -> str | None:
        return self._job.last_error

    @property
    def published(self) -> dict:
        """Target key -> the value we last wrote (for /v1/status)."""
        return {key: value for key, (value, _) in self._written.items()}

    def startService(self):
        super().startService()
        self._election.on_change(lambda _leader: self.kick())
        for prefix, watcher in self._watchers.items():
            watcher.subscribe(lambda snapshot, prefix=prefix: self._on_snapshot(prefix, snapshot))

    def stopService(self):
        super().stopService()
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        return self._job.stop()

    def _on_snapshot(self, prefix: str, snapshot) -> None:
        self._snapshots[prefix] = snapshot
        self.kick()

    def kick(self) -> None:
        """Reconcile soon (a burst of changes makes one pass)."""
        if self.running and (self._pending is None or not self._pending.active()):
            self._pending = self._reactor.callLater(0, self._request)

    def _request(self) -> None:
        self._pending = None
        self._job.request()

    # -- the pass ------------------------------------------------------------

    def desired(self) -> tuple[dict, dict]:
        """({target key: value}, {source key: error}) from the current snapshots."""
        keys, wanted, invalid = self._keys, {}, {}
        for task, source, name in (("deployd", keys.deployd_leader, "deployd.lain"),
                                   ("swarm", keys.swarm_leader, "swarm.lain")):
            if task in self.tasks:
                raw = self._values(source).get("")
                publish.leader_domain(source, raw, keys.domains + name, wanted, invalid)
        if "tinydns" in self.tasks:
            publish.tinydns_zones(keys.tinydns_workers, self._values(keys.tinydns_workers),
                                  [keys.domain_servers + zone for zone in self.zones], wanted, invalid)
        if "webrouter" in self.tasks:
            publish.tinydns_records(keys.tinydns_fqdns, self._values(keys.vips), self._values(keys.apps),
                                    self.zones, wanted)
        return wanted, invalid

    def _values(self, prefix: str):
        snapshot = self._snapshots.get(prefix)
        return {} if snapshot is None else snapshot.values

    def _target(self, key: str):
        """(value in the target snapshot, that snapshot's revision)."""
        for prefix in self._targets:
            if key.startswith(prefix):
                snapshot = self._snapshots[prefix]
                return snapshot.values.get(key[len(prefix):]), snapshot.revision
        return None, 0

    def _up_to_date(self, key: str, value: str) -> bool:
        """Already so in etcd, or written by us and not yet seen by the watch."""
        current, revision = self._target(key)
        if publish.same_json(current, value):
            return True
        mine = self._written.get(key)
        return mine is not None and mine[0] == value and revision < mine[1]

    async def _pass(self) -> None:
        if not self.running or any(p not in self._snapshots for p in self._sources + self._targets):
            return  # not everything read yet: a partial view would publish wrong values
        wanted, invalid = self.desired()
        self._invalid.update(invalid)
        lease = self._election.lease
        failed = []
        for key, value in sorted(wanted.items()):
            if lease is None or not self.running or self._up_to_date(key, value):
                continue
            try:
                revision = await self._locks.put_while_held(self._election.key, lease, key, value)
            except Exception as e:
                failed.append(f"{key}: {e}")
                continue
            if revision:
                self._written[key] = (value, revision)
                log.info("leader published {key} = {value}", key=key, value=value)
            else:
                log.warn("not written, no longer the leader: {key}", key=key)
        if failed:
            raise RuntimeError("; ".join(failed))
