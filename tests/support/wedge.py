"""``python -m tests.support.wedge [twistd networkd options]``: the daemon, with a way to block its reactor.

Test-only, so the daemon itself carries no such hook.  SIGUSR1 schedules,
through ``reactor.callFromThread``, a call that sleeps
``$NETWORKD_TEST_BLOCK_SECONDS`` (default 3) inside the reactor: for that
long no timer fires and no socket is read, as when a part of networkd hangs
in a blocking call.  The process stays alive and keeps its sockets (unlike
SIGSTOP, which systemd would not see as a hang of the daemon's own).
``$NETWORKD_TEST_BLOCK_LOG`` gets a line ``blocked <monotonic>`` as the block
begins and ``unblocked <monotonic>`` as it ends (CLOCK_MONOTONIC is
system-wide, so the test compares it with its own clock).
"""

from __future__ import annotations

import os
import signal
import sys
import time


def _mark(what: str) -> None:
    with open(os.environ["NETWORKD_TEST_BLOCK_LOG"], "a") as f:
        f.write(f"{what} {time.monotonic():.6f}\n")


def _block() -> None:
    _mark("blocked")
    time.sleep(float(os.environ.get("NETWORKD_TEST_BLOCK_SECONDS", "3")))
    _mark("unblocked")


def main() -> None:
    from networkd.app import install_asyncio_reactor

    reactor = install_asyncio_reactor()
    signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(_block))
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "networkd", *sys.argv[1:]]
    run()


if __name__ == "__main__":
    main()
