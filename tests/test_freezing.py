"""The tests' SIGSTOP helper: it returns only once every thread of the process has stopped."""

import signal
import subprocess
import sys

from tests.support.freezing import freeze, stopped


def test_freeze_returns_with_every_thread_stopped_and_sigcont_resumes_them():
    busy_threads = "import threading\nfor _ in range(4):\n    threading.Thread(target=lambda: [0 for _ in iter(int, 1)]).start()\n"
    process = subprocess.Popen([sys.executable, "-c", busy_threads + "import time; time.sleep(60)"])
    try:
        assert not stopped(process.pid)
        freeze(process.pid)
        assert stopped(process.pid), "every thread stopped when freeze returns"
        process.send_signal(signal.SIGCONT)
        for _ in range(1000):
            if not stopped(process.pid):
                break
        assert not stopped(process.pid)
    finally:
        process.kill()
        process.wait(5)
