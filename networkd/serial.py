"""One pass at a time, coalesced, retried with backoff: the loop every writer here needs.

A part that makes the outside world match its state (iptables, resolv.conf,
etcd keys) asks for a pass whenever its state changes.  ``SerialJob`` runs
the job once; requests made while it runs are folded into one more pass,
which reads the newest state when it starts; a pass that fails is run again
after a backoff, unless something asks again sooner.  The job never sees
the requests: it does the whole job every time (level-triggered).  A job
that must look again later (a grace period, a rate limit) asks for it with
``later(delay)``: one timer, the earliest time wins, and any pass that starts
sooner serves it.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger

from networkd.backoff import Backoff

log = Logger()


class SerialJob:
    """Runs ``job()`` (returning a value, a Deferred or a coroutine) one pass at a time.

    ``last_error`` is the newest failure as text (None after a success), for
    the API; ``failed(error)`` says how to log it (default: a warning).
    """

    def __init__(self, reactor, job: Callable[[], Any], what: str, *, backoff: Backoff | None = None,
                 retry: bool = True, failed: Callable[[BaseException], None] | None = None):
        self._reactor = reactor
        self._job = job
        self.what = what
        self._backoff = backoff or Backoff(0.2, 5.0)
        self._retry_failed = retry
        self._log_failure = failed or self._warn
        self._busy: defer.Deferred | None = None
        self._again = False
        self._waiters: list[defer.Deferred] = []
        self._timer = None  # the one pending "pass later": a retry or a later()
        self.last_error: str | None = None
        self.passes = 0
        self.failures = 0
        self.stopped = False

    @property
    def busy(self) -> bool:
        return self._busy is not None

    def request(self) -> defer.Deferred:
        """Ask for a pass; fires True (or False if it failed) once a pass begun after this call ends."""
        waiter = defer.Deferred()
        if self.stopped:
            waiter.callback(False)
            return waiter
        self._waiters.append(waiter)
        if self._busy is not None:
            self._again = True
        else:
            self._start()
        return waiter

    def later(self, delay: float) -> None:
        """Ask for a pass in ``delay`` seconds; the earliest time asked for wins.

        A pass that starts before then serves it: a level-triggered job asks
        again if it still has to wait.
        """
        if not self.stopped:
            self._wake(delay)

    def stop(self) -> defer.Deferred:
        """No more passes; fires when the one under way (if any) ended."""
        self.stopped = True
        self._cancel_timer()
        if self._busy is None:
            return defer.succeed(None)
        done = defer.Deferred()
        self._busy.addBoth(lambda _: done.callback(None))
        return done

    def _wake(self, delay: float) -> None:
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self._reactor.seconds() + delay:
                return
            self._timer.cancel()
        self._timer = self._reactor.callLater(delay, self._timer_fired)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timer_fired(self) -> None:
        self._timer = None
        if self.stopped:
            return
        if self._busy is not None:
            self._again = True
        else:
            self._start()

    def _start(self) -> None:
        self._cancel_timer()
        self._again = False
        waiters, self._waiters = self._waiters, []
        self.passes += 1
        running = defer.maybeDeferred(self._call)
        self._busy = running
        running.addCallbacks(self._succeeded, self._failed_pass, callbackArgs=(waiters,), errbackArgs=(waiters,))

    def _call(self):
        result = self._job()
        if hasattr(result, "__await__") and not isinstance(result, defer.Deferred):
            return defer.Deferred.fromCoroutine(result)
        return result

    def _succeeded(self, _, waiters) -> None:
        self._busy = None
        self.last_error = None
        self._backoff.reset()
        self._finish(waiters, True)

    def _failed_pass(self, failure, waiters) -> None:
        self._busy = None
        self.failures += 1
        self.last_error = str(failure.value) or type(failure.value).__name__
        try:
            self._log_failure(failure.value)
        except Exception:
            log.failure("logging a failure of {what}", what=self.what)
        if not self._again and not self.stopped and self._retry_failed:
            # Before the waiters hear of it: a pass one of them asks for cancels it.
            self._wake(self._backoff.next())  # a later() asked for sooner stays
        self._finish(waiters, False)

    def _finish(self, waiters, ok: bool) -> None:
        for waiter in waiters:
            waiter.callback(ok)
        if self._again and not self.stopped:
            self._start()
        elif self.stopped:
            for waiter in self._waiters:
                waiter.callback(False)
            self._waiters = []

    def _warn(self, error: BaseException) -> None:
        log.warn("{what} failed: {e}; trying again", what=self.what, e=self.last_error)


def notify(listeners, *args, what: str = "listener") -> None:
    """Call each listener; one that raises is logged and the others still run."""
    for listener in list(listeners):
        try:
            listener(*args)
        except Exception:
            log.failure("{what} {listener} failed", what=what, listener=getattr(listener, "__qualname__", listener))


class ErrorLog:
    """Logs an invalid key once per distinct error, not on every snapshot."""

    def __init__(self, logger: Logger, template: str):
        self._log = logger
        self._template = template
        self.errors: dict[str, str] = {}

    def update(self, errors: dict[str, str]) -> None:
        """``errors``: key -> error text, the whole current set."""
        for key, error in errors.items():
            if self.errors.get(key) != error:
                self._log.error(self._template, key=key, error=error)
        self.errors = dict(errors)
