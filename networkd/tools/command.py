"""What the operator's commands share: option parsing with one-line errors, exit codes."""

from __future__ import annotations

import sys

from twisted.python import usage

# Exit codes of `networkd check` and `networkd status`.
OK, PROBLEM, CANNOT = 0, 1, 2


def parse(options: usage.Options, argv: list[str], prog: str) -> usage.Options:
    """Parse ``argv`` into ``options``; a usage error is one line on stderr and exit 2."""
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        sys.stderr.write(f"{prog}: error: {e}\n")
        sys.exit(CANNOT)
    return options


def run_on_reactor(main) -> None:
    """Run ``main(reactor)`` (a coroutine function returning an exit code) and exit with its code."""
    from twisted.internet import defer, task

    from networkd.app import install_asyncio_reactor

    install_asyncio_reactor()

    async def wrapper(reactor):
        raise SystemExit(await main(reactor))

    task.react(lambda reactor: defer.Deferred.fromCoroutine(wrapper(reactor)))
