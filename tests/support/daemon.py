"""Run networkd as a subprocess (``twistd -n networkd``), the way operators do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


class Daemon:
    """One networkd process; ``stop()`` sends SIGTERM and returns the exit status."""

    def __init__(self, args: list[str], netns: str | None = None, env: dict | None = None):
        self.args = args
        self.netns = netns
        self.workdir = tempfile.mkdtemp(prefix="networkd-daemon-")
        self.log_path = os.path.join(self.workdir, "networkd.log")
        self.process: subprocess.Popen | None = None
        self.env = {**os.environ, "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1", **(env or {})}

    def command(self) -> list[str]:
        cmd = [TWISTD, "--nodaemon", "--pidfile=", "networkd", *self.args]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        return cmd

    def start(self) -> "Daemon":
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.command(), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, env=self.env
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_for_log(self, text: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if not self.running():
                raise AssertionError(f"networkd exited ({self.process.returncode}) before logging {text!r}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"networkd did not log {text!r} within {timeout}s:\n{self.log()}")

    def signal(self, signum: int) -> None:
        if self.running():
            os.kill(self.process.pid, signum)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait; SIGKILL if it hangs.  Returns the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    def kill(self) -> None:
        if self.running():
            self.process.kill()
            self.process.wait(5)

    def log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""
