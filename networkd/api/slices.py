"""Large API bodies made in short reactor turns, and kept while their data is the same.

The API shares the reactor with DNS: a body of 40,000 names sorted and
serialized in one call holds every query back for tens of milliseconds.
A renderer here is a generator that does a bounded piece of work between two
``yield``s and *returns* the body as a list of byte chunks (written to the
client one by one, never joined); ``run_sliced`` drives it in turns of at
most ``budget`` seconds with the reactor free in between.  ``BodyCache`` keeps
the last body per route and data generation, so a scrape loop pays nothing
while the data does not change, and shares one render among concurrent
requests.
"""

from __future__ import annotations

import time
from typing import Callable, Generator, Hashable

from twisted.internet import defer
from twisted.python import failure

BUDGET = 0.001  # seconds of work per reactor turn (2 ms turns left a local name's p99 at 7 ms during dumps)

Body = list  # of bytes chunks
Renderer = Generator[None, None, Body]


def run_sliced(reactor, renderer: Renderer, budget: float | None = None) -> defer.Deferred:
    """Fire with what ``renderer`` returns, having run it ``budget`` (default ``BUDGET``) seconds per reactor turn."""
    budget = BUDGET if budget is None else budget
    done = defer.Deferred()
    clock = time.perf_counter  # the work's real cost (the reactor's clock may be a test's)

    def turn() -> None:
        deadline = clock() + budget
        try:
            while True:  # at least one piece a turn, however small the budget
                next(renderer)
                if clock() >= deadline:
                    break
        except StopIteration as stop:
            done.callback(stop.value)
            return
        except Exception:
            done.errback()
            return
        reactor.callLater(0, turn)

    turn()
    return done


class BodyCache:
    """The last rendered body per route, valid while the route's generation is the same.

    ``generation`` None means "unknown": never cached.  ``renders`` counts the
    renders started (what the tests look at)."""

    def __init__(self, reactor, budget: float | None = None):
        self._reactor = reactor
        self._budget = budget
        self._bodies: dict[str, tuple[Hashable, Body]] = {}
        self._running: dict[str, tuple[Hashable, defer.Deferred, list]] = {}
        self.renders = 0

    def get(self, route: str, generation: Hashable, make: Callable[[], Renderer]) -> defer.Deferred:
        """The body for ``route`` at ``generation``; ``make`` is called only when it must be rendered."""
        kept = self._bodies.get(route)
        if generation is not None and kept is not None and kept[0] == generation:
            return defer.succeed(kept[1])
        running = self._running.get(route)
        if generation is not None and running is not None and running[0] == generation:
            waiter = defer.Deferred()
            running[2].append(waiter)
            return waiter
        self.renders += 1
        waiter = defer.Deferred()
        waiters = [waiter]
        work = run_sliced(self._reactor, make(), self._budget)
        if generation is not None:
            self._running[route] = (generation, work, waiters)

        def finished(result):
            if self._running.get(route, (None, None))[1] is work:
                del self._running[route]
            failed = isinstance(result, failure.Failure)
            if generation is not None and not failed:
                self._bodies[route] = (generation, result)
            for w in waiters:
                w.errback(result) if failed else w.callback(result)

        work.addBoth(finished)
        return waiter
