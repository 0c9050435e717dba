"""Waiting for a condition inside a Twisted test without blocking the reactor."""

from __future__ import annotations

import inspect
import time

from twisted.internet import reactor, task


async def eventually(predicate, timeout: float = 10.0, interval: float = 0.02, message: str = ""):
    """Await until ``predicate()`` is truthy; return its value or fail after ``timeout``.

    ``predicate`` may be an ``async def``: its coroutine is awaited each time.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {message or predicate}")
        await task.deferLater(reactor, interval, lambda: None)


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, message: str = ""):
    """Poll ``predicate`` (blocking; the daemons are other processes); return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {message or predicate}")
        time.sleep(interval)
