"""The tests' SIGSTOP helper: it returns only once every thread of the process has stopped."""

import signal
import subprocess
import sys

from tests.support.freezing import freeze, stopped

SPINNING_THREADS = """
import threading, time
def spin():
    while True:
        pass
for _ in range(4):
    threading.Thread(target=spin, daemon=True).start()
print("spinning", flush=True)
time.sleep(60)
"""


def test_freeze_returns_with_every_thread_stopped_and_sigcont_resumes_them():
    process = subprocess.Popen([sys.executable, "-c", SPINNING_THREADS], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "spinning"  # four threads on the CPU, or waiting for it
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
