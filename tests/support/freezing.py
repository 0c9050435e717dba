"""Stopping a process for a test: SIGSTOP, then wait until it has really stopped.

``kill`` returns before every thread of a Go program such as etcd has stopped:
a keep-alive sent right after it was answered 0.9 ms later in 1 of ~20 runs
(`tests/test_etcd_gateway.py`).  A test that asserts what happens while etcd
is stopped waits for every thread's state in /proc to say so.
"""

from __future__ import annotations

import os
import signal
import time


def _states(pid: int) -> list[str]:
    states = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # (a thread that ended meanwhile)
    return states


def stopped(pid: int) -> bool:
    """Every thread of ``pid`` is stopped (state T, or t under a tracer)."""
    return all(state in ("T", "t") for state in _states(pid))


def freeze(pid: int, timeout: float = 5.0) -> None:
    """SIGSTOP ``pid`` and return once every thread of it has stopped (a thread inside a system call,
    an fsync say, stops when the call returns)."""
    os.kill(pid, signal.SIGSTOP)
    give_up = time.monotonic() + timeout
    while not stopped(pid):
        if time.monotonic() > give_up:
            raise AssertionError(f"process {pid} did not stop within {timeout}s of SIGSTOP: {_states(pid)}")
        time.sleep(0.0002)
