"""The heap is trimmed once after start-up, and never again (no timer at rest)."""

from __future__ import annotations

from twisted.internet.task import Clock

from networkd.memtrim import TRIM_AFTER, malloc_trim, trim_after_startup


def test_trims_once_after_startup_then_no_timer_is_left():
    clock = Clock()
    calls = []
    trim_after_startup(clock, trim=lambda: calls.append(clock.seconds()) or True)
    clock.advance(TRIM_AFTER - 0.1)
    assert calls == []
    clock.advance(0.1)
    assert calls == [TRIM_AFTER]
    assert clock.getDelayedCalls() == [], "nothing wakes the daemon at rest"


def test_malloc_trim_runs_here():
    """glibc's (this machine's): True or False; None would mean it was not found."""
    assert malloc_trim() in (True, False)


def test_the_daemon_schedules_it(monkeypatch):
    """makeService hands the reactor a trim once it runs (beside the gc freeze)."""
    import networkd.app as app

    scheduled = []

    class FakeReactor(Clock):
        def callWhenRunning(self, f, *args):
            scheduled.append(getattr(f, "__name__", f))

    monkeypatch.setattr(app, "install_asyncio_reactor", lambda: FakeReactor())
    monkeypatch.setattr(app, "build", lambda *a, **k: object())
    monkeypatch.setattr(app, "make_client", lambda options, reactor=None: None)
    app.makeService({"etcd-keepalives": "gateway"})
    assert "trim_after_startup" in scheduled and "freeze_startup" in scheduled
