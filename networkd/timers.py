"""The reactor sleeps until the next call that is due, not until a cancelled one.

Twisted's reactors work out how long they may sleep from the head of their heap
of timed calls, and a cancelled call (or one pushed later with ``reset``) stays
there until its old time comes: the reactor wakes, finds nothing to run, and
sleeps again.  Timers that are re-armed on every lease keep-alive (address
renewals, the fencing deadline, coalesced passes) made about half of an idle
node's wake-ups such empty ones.  ``runUntilCurrent`` already drops cancelled
calls and re-files pushed ones when they reach the head; this does the same
before the sleep is computed, so the sleep ends when something is due.
"""

from __future__ import annotations

import heapq
import types


def sleep_until_due(reactor) -> None:
    """Make ``reactor.timeout()`` skip cancelled and pushed-back calls at the head of its heap."""
    if getattr(reactor, "_sleeps_until_due", False):
        return
    stock = reactor.timeout

    def timeout(self):
        self._insertNewDelayedCalls()
        calls = self._pendingTimedCalls
        while calls and (calls[0].cancelled or calls[0].delayed_time > 0):
            call = heapq.heappop(calls)
            if call.cancelled:
                self._cancellations -= 1
            else:
                call.activate_delay()
                heapq.heappush(calls, call)
        return stock()

    reactor.timeout = types.MethodType(timeout, reactor)
    reactor._sleeps_until_due = True
    if hasattr(reactor, "_reschedule") and hasattr(reactor, "_timerHandle"):
        _rearm_on_cancel(reactor)


def _rearm_on_cancel(reactor) -> None:
    """Twisted's asyncio reactor arms one asyncio timer for its earliest call and re-arms it only when
    that timer fires or a sooner call comes: a cancelled earliest call still woke the loop, for nothing
    (one empty wake-up per lease keep-alive, whose 0.5 s bound is cancelled by the answer).  When the
    call cancelled was the one armed for, the timer is armed for the next call due, or none."""
    stock = reactor._cancelCallLater

    def cancel_call(self, call) -> None:
        stock(call)
        armed, loop = self._scheduledAt, self._asyncioEventloop
        if armed is None or self._timerHandle is None or call.getTime() - self.seconds() > armed - loop.time() + 0.001:
            return  # a later call than the one armed for: the timer stays
        call.cancelled = 1  # (DelayedCall.cancel sets it right after this) so that timeout() skips it
        due = self.timeout()
        if due is None:
            self._timerHandle.cancel()
            self._timerHandle = self._scheduledAt = None
        elif loop.time() + due > armed + 0.001:
            self._reschedule()

    reactor._cancelCallLater = types.MethodType(cancel_call, reactor)
