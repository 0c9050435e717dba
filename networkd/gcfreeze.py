"""What start-up built is kept out of the cycle collector's full passes.

A full collection walks every tracked object.  Once running, the daemon
holds some 50,000 that live as long as it does (Twisted, aetcd and grpc,
the service tree); under a flood of hostile DNS packets full passes ran
every few seconds, took 25-100 ms each on a busy host, and every query
waited behind them (issue 12 item 7).  ``freeze_startup`` moves them to
the permanent generation (``gc.freeze``), so later passes walk only what
was made since.  The daemon calls it once the reactor runs
(``networkd.app.makeService``); in-process tests do not.  No collection
first: one would hold the reactor for tens of ms while the first queries
wait (and delay the upstreams being read); what start-up left as garbage
is small and is kept for good instead.
"""

from __future__ import annotations

import gc

from twisted.logger import Logger

log = Logger()


def freeze_startup() -> int:
    """Freeze every tracked object (a few µs); how many are frozen."""
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("{frozen} start-up objects frozen out of garbage collection", frozen=frozen)
    return frozen
