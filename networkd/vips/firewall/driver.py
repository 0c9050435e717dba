"""The driver the VIP reconciler uses: our chains kept equal to the desired DNATs.

Passes run through a SerialJob: one blocking back-end call at a time, in a
thread, off the reactor; requests made meanwhile fold into one more pass,
which reads the desired rules when it starts, so it applies the newest
state; a failed pass is retried with backoff.  Nothing is ever raised to
the caller: ``last_error`` says what went wrong.
"""

from __future__ import annotations

from typing import Callable, Iterable

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from networkd.serial import SerialJob
from networkd.vips.firewall.backends import FirewallError
from networkd.vips.firewall.rules import nat_rules
from networkd.vips.planner import DnatRule

log = Logger()


class Firewall:
    """Keeps our chains equal to ``desired()``.

    A pass writes without reading first while the kernel holds what our last
    successful pass wrote; after a failure, on ``sync(verify=True)`` (the
    periodic anti-entropy check) and on ``reset()`` it reads the chains back
    first and rewrites them only if they drifted (``reset``: always).
    """

    def __init__(self, reactor, backend, desired: Callable[[], Iterable[DnatRule]], to_thread=None):
        self.backend = backend
        self._desired = desired
        self._to_thread = to_thread or (lambda f, *a: threads.deferToThread(f, *a))
        self._job = SerialJob(reactor, self._pass, "iptables pass", failed=self._log_failure)
        self._reset = True  # rebuild our chains from scratch on the next pass (startup)
        self._verify = False
        self._trusted = False  # True while our last pass succeeded: the kernel has what we wrote
        self.applied: frozenset[DnatRule] = frozenset()
        self.writes = 0

    @property
    def last_error(self) -> str | None:
        return self._job.last_error

    @property
    def stopped(self) -> bool:
        return self._job.stopped

    def reset(self) -> None:
        """Rebuild our chains from scratch on the next pass (startup)."""
        self._reset = True
        self.sync()

    def sync(self, verify: bool = False) -> defer.Deferred:
        """Fires True (False if it failed) once a pass that started after this call ended.

        ``verify`` reads the kernel's rules back and rewrites them only if
        they drifted (anti-entropy).
        """
        self._verify = self._verify or verify
        return self._job.request()

    def stop(self) -> defer.Deferred:
        """No more passes or retries; fires when the pass under way (if any) ended."""
        return self._job.stop()

    async def _pass(self) -> None:
        dnats = frozenset(self._desired())
        reset, self._reset = self._reset, False
        verify, self._verify = self._verify or not self._trusted, False
        if not reset and not verify and dnats == self.applied:
            return
        self._trusted = False  # until this pass succeeded
        try:
            wrote = await self._to_thread(self._apply, dnats, reset, verify)
        except BaseException:
            self._reset = self._reset or reset
            raise
        self._trusted = True
        self.applied = dnats
        if wrote:
            self.writes += 1
            log.info("iptables ({backend}): {n} DNAT rules in place", backend=self.backend.name, n=len(dnats))

    def _apply(self, dnats: frozenset[DnatRule], reset: bool, verify: bool) -> bool:
        """In a thread: write our chains (read them first unless trusted); True if written."""
        rules = nat_rules(dnats)
        if not reset and not verify:
            self.backend.write(rules, [])  # our chains and jumps are in place: replace the chains
            return True
        state = self.backend.read()
        if not reset and state.matches(rules):
            return False
        self.backend.write(rules, state.missing_jumps)
        return True

    def _log_failure(self, error: BaseException) -> None:
        if isinstance(error, FirewallError):
            log.warn("iptables pass failed: {e}", e=self.last_error)
        else:
            log.failure("iptables pass failed", Failure(error))
