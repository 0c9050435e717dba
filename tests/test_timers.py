"""The reactor sleeps until a call is due: a cancelled or pushed-back call does not wake it
(networkd.timers).  On Twisted's asyncio reactor, as the daemon runs it."""

from __future__ import annotations

import pytest

from networkd.timers import sleep_until_due


@pytest.fixture
def reactor(own_asyncio_reactor):
    return own_asyncio_reactor


def test_a_cancelled_call_no_longer_shortens_the_sleep(reactor):
    sleep_until_due(reactor)
    reactor.callLater(0.2, lambda: None).cancel()
    reactor.callLater(5.0, lambda: None)
    assert 4.9 < reactor.timeout() <= 5.0


def test_a_call_pushed_back_sleeps_until_its_new_time(reactor):
    sleep_until_due(reactor)
    call = reactor.callLater(0.2, lambda: None)
    call.reset(3.0)
    assert 2.9 < reactor.timeout() <= 3.0
    call.reset(1.0)  # sooner again: Twisted files it at once
    assert 0.9 < reactor.timeout() <= 1.0


def test_without_it_twisted_would_wake_for_the_cancelled_call(reactor):
    """What the module is for: the stock reactor sleeps only until the dead call's time."""
    reactor.callLater(0.2, lambda: None).cancel()
    reactor.callLater(5.0, lambda: None)
    assert reactor.timeout() <= 0.2


def _count_wakes(reactor) -> list:
    woken = []
    stock = reactor._onTimer
    reactor._onTimer = lambda: (woken.append(reactor.seconds()), stock())
    return woken


def _run(reactor, seconds: float) -> None:
    """Run the reactor's own loop for ``seconds`` (in a thread of its own: pytest-twisted's loop runs in
    this one; nothing else touches this reactor meanwhile)."""
    import asyncio
    import threading

    runner = threading.Thread(target=reactor._asyncioEventloop.run_until_complete, args=(asyncio.sleep(seconds),))
    runner.start()
    runner.join()


@pytest.mark.parametrize("later_first", [False, True])
def test_a_cancelled_call_does_not_wake_the_loop(reactor, later_first):
    """The asyncio loop itself: a call cancelled before its time (a keep-alive's bound, cancelled by the
    answer) is no wake-up; the loop wakes for the next call due, and for nothing when none is left."""
    sleep_until_due(reactor)
    woken = _count_wakes(reactor)
    ran = []
    if later_first:
        reactor.callLater(0.25, ran.append, "due")
    bound = reactor.callLater(0.05, ran.append, "cancelled")
    if not later_first:
        reactor.callLater(0.25, ran.append, "due")
    bound.cancel()
    _run(reactor, 0.2)
    assert woken == [] and ran == [], "nothing woke the loop before the call due"
    _run(reactor, 0.15)
    assert ran == ["due"] and len(woken) == 1
    reactor.callLater(0.05, ran.append, "cancelled too").cancel()
    _run(reactor, 0.15)
    assert len(woken) == 1 and reactor._timerHandle is None, "no call left: no timer"
    reactor.callLater(0.05, ran.append, "after")
    _run(reactor, 0.15)
    assert ran == ["due", "after"], "a new call arms the timer again"


def test_without_it_the_asyncio_loop_wakes_for_a_cancelled_call(own_asyncio_reactor):
    """What it is for: the stock reactor's timer still fires at the cancelled call's time."""
    woken = _count_wakes(own_asyncio_reactor)
    own_asyncio_reactor.callLater(0.05, lambda: None).cancel()
    own_asyncio_reactor.callLater(5.0, lambda: None)
    _run(own_asyncio_reactor, 0.2)
    assert len(woken) == 1
