"""A process's time on a CPU, to the nanosecond, for the idle-CPU figures of the benches.

``utime + stime`` in ``/proc/PID/stat`` is sampled by the scheduler tick
(100 Hz here): a process at rest uses half a tick a second, so a 110 s
window holds ~55 ticks and the figure moves by ±13 % from run to run on
counting alone.  ``/proc/PID/task/*/schedstat`` gives each thread's
measured run time (the scheduler's ``sum_exec_runtime``) instead.
"""

from __future__ import annotations

import os


class RunTime:
    """Seconds on a CPU of every thread ``pid`` has had since this was made (threads that
    ended keep what they had when last seen).  Raises OSError once the process is gone."""

    def __init__(self, pid: int):
        self.pid = pid
        self._threads: dict[int, int] = {}  # tid -> ns when last seen

    def _read(self, names: bool) -> dict[int, str]:
        out = {}
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{tid}/schedstat") as f:
                    self._threads[int(tid)] = int(f.read().split()[0])
                if names:
                    with open(f"/proc/{self.pid}/task/{tid}/comm") as f:
                        out[int(tid)] = f.read().strip()
            except (OSError, ValueError, IndexError):  # the thread ended meanwhile
                continue
        return out

    def threads(self) -> dict[int, tuple[str, float]]:
        """tid -> (thread name, seconds on a CPU), read now (live threads)."""
        names = self._read(names=True)
        return {tid: (name, self._threads[tid] / 1e9) for tid, name in names.items()}

    def seconds(self) -> float:
        """Every thread's time on a CPU so far."""
        self._read(names=False)
        return sum(self._threads.values()) / 1e9
