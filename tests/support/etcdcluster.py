"""A real etcd cluster of several members on 127.0.0.1, whose members a test can kill and restart."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

from tests.support.etcd_server import ETCD, ETCDCTL
from tests.support.freezing import freeze
from tests.support.ports import free_port


class Member:
    def __init__(self, name: str, base: str):
        self.name = name
        self.data_dir = os.path.join(base, name)
        self.client_port, self.peer_port = free_port(), free_port()
        self.process: subprocess.Popen | None = None
        self.log_path = os.path.join(base, f"{name}.log")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


class EtcdCluster:
    """``size`` members; ``kill``/``revive`` one at a time.

    Elections are tuned as for a LAN (heartbeat 50 ms, election timeout 500 ms: a new leader within
    0.5-1 s); etcd's shipped 100/1000 ms can take up to 2 s, close to a TTL-3 fencing deadline."""

    def __init__(self, size: int = 3, election_timeout_ms: int = 500, heartbeat_ms: int = 50):
        self.base = tempfile.mkdtemp(prefix="networkd-etcd-cluster-")
        self.members = [Member(f"m{i}", self.base) for i in range(size)]
        self.election_timeout_ms, self.heartbeat_ms = election_timeout_ms, heartbeat_ms
        self._spawned: list[subprocess.Popen] = []  # every process ever started, for destroy()

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def client_port(self) -> int:  # for helpers that take one member
        return self.members[0].client_port

    def start(self, timeout: float = 30.0) -> "EtcdCluster":
        try:
            for member in self.members:
                self._spawn(member)
            self.wait_healthy(timeout)
        except BaseException:
            self.destroy()
            raise
        return self

    def _spawn(self, member: Member) -> None:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        with open(member.log_path, "ab") as log:
            member.process = subprocess.Popen(
                [ETCD, "--name", member.name, "--data-dir", member.data_dir,
                 "--listen-client-urls", member.endpoint, "--advertise-client-urls", member.endpoint,
                 "--listen-peer-urls", member.peer_url, "--initial-advertise-peer-urls", member.peer_url,
                 "--initial-cluster", initial, "--initial-cluster-state", "new",
                 "--initial-cluster-token", os.path.basename(self.base),
                 "--heartbeat-interval", str(self.heartbeat_ms), "--election-timeout", str(self.election_timeout_ms),
                 "--log-level", "warn"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        self._spawned.append(member.process)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = [m for m in self.members if m.process is not None and m.process.poll() is None]
            try:
                if len(live) == len(self.members) and self.leader() is not None and all(
                        self.ctl(m, "endpoint", "health", check=False, timeout=5).returncode == 0 for m in live):
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.2)
        raise RuntimeError("etcd cluster did not become healthy: " + " | ".join(self.log_tail(m) for m in self.members))

    def ctl(self, member: Member | None, *args: str, check: bool = True, timeout: float = 10, input: str | None = None):
        endpoints = member.endpoint if member is not None else ",".join(
            m.endpoint for m in self.members if m.process is not None)
        return subprocess.run([ETCDCTL, f"--endpoints={endpoints}", "--dial-timeout=2s", "--command-timeout=5s", *args],
                              capture_output=True, text=True, check=check, timeout=timeout, input=input,
                              env={**os.environ, "ETCDCTL_API": "3"})

    def leader(self) -> Member | None:
        """The member that says it is the leader, if one does."""
        for member in self.members:
            if member.process is None or member.process.poll() is not None:
                continue
            try:
                out = self.ctl(member, "endpoint", "status", "-w", "json", check=False, timeout=5)
            except subprocess.TimeoutExpired:
                continue
            if out.returncode != 0:
                continue
            status = json.loads(out.stdout)[0]["Status"]
            if status.get("leader") and status["leader"] == status["header"]["member_id"]:
                return member
        return None

    def kill(self, member: Member) -> None:
        member.process.send_signal(signal.SIGKILL)
        member.process.wait(5)
        member.process = None

    def freeze(self) -> None:
        """SIGSTOP every live member: the whole cluster stops answering at once (a paused VM, a stuck disk)."""
        for member in self.members:
            if member.process is not None and member.process.poll() is None:
                freeze(member.process.pid)

    def thaw(self) -> None:
        """SIGCONT every member (destroy() kills frozen members too: SIGKILL needs no SIGCONT)."""
        for member in self.members:
            if member.process is not None and member.process.poll() is None:
                member.process.send_signal(signal.SIGCONT)

    def revive(self, member: Member) -> None:
        """Start a killed member again on its data (it rejoins as it was)."""
        with open(member.log_path, "ab") as log:
            member.process = subprocess.Popen(
                [ETCD, "--name", member.name, "--data-dir", member.data_dir,
                 "--listen-client-urls", member.endpoint, "--advertise-client-urls", member.endpoint,
                 "--listen-peer-urls", member.peer_url, "--initial-advertise-peer-urls", member.peer_url,
                 "--heartbeat-interval", str(self.heartbeat_ms), "--election-timeout", str(self.election_timeout_ms),
                 "--log-level", "warn"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        self._spawned.append(member.process)

    def put(self, key: str, value: str) -> None:
        self.ctl(None, "put", key, input=value)

    def delete(self, key: str) -> None:
        self.ctl(None, "del", key)

    def get_prefix(self, prefix: str) -> dict[str, str]:
        import base64

        out = json.loads(self.ctl(None, "get", "--prefix", prefix, "-w", "json").stdout)
        return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
                for kv in out.get("kvs", [])}

    def log_tail(self, member: Member, n: int = 1500) -> str:
        try:
            with open(member.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def destroy(self) -> None:
        """Kill every member process this cluster ever started (no graceful stop needed), then the data."""
        for process in self._spawned:
            if process.poll() is None:
                process.kill()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for member in self.members:
            member.process = None
        shutil.rmtree(self.base, ignore_errors=True)
