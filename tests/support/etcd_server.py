"""A real etcd server (Debian's etcd-server) on 127.0.0.1, for tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time

from tests.support.ports import free_port

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"


class EtcdServer:
    """Start, stop and restart one etcd member with its own data dir and ports."""

    def __init__(self, tls: dict | None = None, extra_args: tuple[str, ...] = ()):
        """``tls``: {"cert": path, "key": path, "ca": path} to serve https (client certs verified)."""
        self.tls = tls
        self.extra_args = tuple(extra_args)
        self.data_dir = tempfile.mkdtemp(prefix="networkd-etcd-")
        self.client_port = free_port()
        self.peer_port = free_port()
        self.process: subprocess.Popen | None = None
        self.log_path = os.path.join(self.data_dir, "etcd.log")

    @property
    def endpoint(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 15.0) -> "EtcdServer":
        if not os.path.exists(ETCD):
            raise RuntimeError("etcd is not installed (Debian package etcd-server)")
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [
                ETCD,
                "--name", "test",
                "--data-dir", os.path.join(self.data_dir, "data"),
                "--listen-client-urls", self.endpoint,
                "--advertise-client-urls", self.endpoint,
                "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
                "--initial-cluster", f"test=http://127.0.0.1:{self.peer_port}",
                "--heartbeat-interval", "50",
                "--election-timeout", "500",
                "--log-level", "warn",
                *self._tls_args(),
                *self.extra_args,
            ],
            stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "ETCD_UNSUPPORTED_ARCH": os.environ.get("ETCD_UNSUPPORTED_ARCH", "")},
        )
        log.close()
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.process.kill()  # a start that failed leaves no etcd behind (a bench's failure path did)
            self.process.wait()
            shutil.rmtree(self.data_dir, ignore_errors=True)
            raise
        return self

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if self.ctl("endpoint", "health", check=False, timeout=2).returncode == 0:
                    return
            except subprocess.TimeoutExpired:
                pass  # etcdctl hung on an etcd still starting (a loaded host): ask again
            time.sleep(0.1)
        raise RuntimeError(f"etcd did not become healthy: {self.log_tail()}")

    def _tls_args(self) -> list[str]:
        if not self.tls:
            return []
        return ["--cert-file", self.tls["cert"], "--key-file", self.tls["key"],
                "--trusted-ca-file", self.tls["ca"], "--client-cert-auth"]

    def _ctl_tls_args(self) -> list[str]:
        if not self.tls:
            return []
        return [f"--cacert={self.tls['ca']}", f"--cert={self.tls['client_cert']}", f"--key={self.tls['client_key']}"]

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def ctl(self, *args: str, check: bool = True, timeout: float = 10, input: str | None = None):
        """Run etcdctl (v3 API) against this server."""
        return subprocess.run(
            [ETCDCTL, f"--endpoints={self.endpoint}", "--dial-timeout=2s", "--command-timeout=5s",
             *self._ctl_tls_args(), *args],
            capture_output=True, text=True, check=check, timeout=timeout, input=input,
            env={**os.environ, "ETCDCTL_API": "3"},
        )

    def put(self, key: str, value: str) -> int:
        """Write a key (value via stdin, so it may start with '-'); returns the new revision."""
        self.ctl("put", key, input=value)
        return self.revision()

    def delete(self, key: str) -> None:
        self.ctl("del", key)

    def revision(self) -> int:
        import json

        out = self.ctl("endpoint", "status", "-w", "json").stdout
        return int(json.loads(out)[0]["Status"]["header"]["revision"])

    def get_prefix(self, prefix: str) -> dict[str, str]:
        import json, base64

        out = json.loads(self.ctl("get", "--prefix", prefix, "-w", "json").stdout)
        return {
            base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
            for kv in out.get("kvs", [])
        }

    def get_prefix_kvs(self, prefix: str) -> dict[str, tuple[str, int, int]]:
        """key -> (value, lease id or 0, mod revision): what ``etcdctl get --prefix -w json`` shows."""
        import json, base64

        out = json.loads(self.ctl("get", "--prefix", prefix, "-w", "json").stdout)
        return {
            base64.b64decode(kv["key"]).decode(): (
                base64.b64decode(kv.get("value", "")).decode(), int(kv.get("lease", 0)), int(kv["mod_revision"]))
            for kv in out.get("kvs", [])
        }

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""
