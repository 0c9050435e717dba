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
