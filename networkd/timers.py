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
