"""SerialJob: one pass at a time, requests coalesced, failures retried with backoff (driven clock)."""

from __future__ import annotations

from twisted.internet import defer, task

from networkd.backoff import Backoff
from networkd.serial import ErrorLog, SerialJob, notify
from tests.support.logcapture import LogCapture


class Job:
    """Each call returns a Deferred the test fires; records what state it saw."""

    def __init__(self):
        self.state = 0
        self.seen = []
        self.pending = []

    def __call__(self):
        self.seen.append(self.state)
        d = defer.Deferred()
        self.pending.append(d)
        return d


def job_and_clock(**kw):
    clock, job = task.Clock(), Job()
    return clock, job, SerialJob(clock, job, "test job", backoff=Backoff(1.0, 8.0, rng=lambda: 0.5), **kw)


def test_requests_while_busy_fold_into_one_more_pass_with_the_newest_state():
    clock, job, serial = job_and_clock()
    first = serial.request()
    job.state = 1
    second, third = serial.request(), serial.request()
    job.state = 2
    assert job.seen == [0] and serial.busy
    job.pending.pop(0).callback(None)
    assert first.result is True and not second.called
    assert job.seen == [0, 2], "one more pass, reading the newest state"
    job.pending.pop(0).callback(None)
    assert second.result is True and third.result is True and not serial.busy
    assert serial.passes == 2


def test_a_failed_pass_is_logged_and_retried_with_backoff_then_clears_last_error():
    clock, job, serial = job_and_clock()
    with LogCapture() as logs:
        done = serial.request()
        job.pending.pop(0).errback(RuntimeError("disk full"))
    assert done.result is False and serial.last_error == "disk full" and logs.has("test job failed: disk full")
    clock.advance(0.9)
    assert len(job.seen) == 1
    clock.advance(0.1)
    assert len(job.seen) == 2, "retried after the backoff"
    job.pending.pop(0).errback(RuntimeError("still"))
    clock.advance(1.9)
    assert len(job.seen) == 2, "the backoff doubles"
    clock.advance(0.1)
    job.pending.pop(0).callback(None)
    assert serial.last_error is None and serial.failures == 2
    clock.advance(60)
    assert len(job.seen) == 3, "no retry after a success"


def test_a_request_after_a_failure_runs_at_once_and_cancels_the_retry():
    clock, job, serial = job_and_clock()
    serial.request()
    job.pending.pop(0).errback(RuntimeError("x"))
    serial.request()
    assert len(job.seen) == 2
    job.pending.pop(0).callback(None)
    clock.advance(10)
    assert len(job.seen) == 2


def test_coroutines_and_plain_values_and_exceptions_are_jobs_too():
    clock = task.Clock()
    calls = []

    async def coro():
        calls.append("coro")

    def boom():
        raise ValueError("bad")

    assert SerialJob(clock, coro, "c").request().result is True
    assert SerialJob(clock, lambda: 42, "v").request().result is True
    with LogCapture():
        failing = SerialJob(clock, boom, "e", retry=False)
        assert failing.request().result is False
    assert failing.last_error == "bad" and calls == ["coro"]
    clock.advance(100)
    assert failing.passes == 1, "retry=False: only requests run it"


def test_stop_waits_for_the_pass_under_way_and_runs_nothing_after():
    clock, job, serial = job_and_clock()
    serial.request()
    waiting = serial.request()
    stopped = serial.stop()
    assert not stopped.called
    job.pending.pop(0).callback(None)
    assert stopped.called and waiting.result is False and job.seen == [0]
    assert serial.request().result is False


def test_notify_calls_every_listener_even_after_one_fails():
    seen = []

    def bad(x):
        raise RuntimeError("listener broke")

    with LogCapture() as logs:
        notify([seen.append, bad, seen.append], 7, what="ack listener")
    assert seen == [7, 7] and logs.has("ack listener")


def test_error_log_says_each_error_once_until_it_changes():
    from twisted.logger import Logger

    errors = ErrorLog(Logger(), "skipped {key}: {error}")
    with LogCapture() as logs:
        errors.update({"/a": "bad JSON"})
        errors.update({"/a": "bad JSON", "/b": "bad IP"})
        errors.update({"/a": "not an object"})
        errors.update({})
        errors.update({"/a": "not an object"})
    lines = [line for line in logs.lines if "skipped" in line]
    assert len(lines) == 4, lines


def test_later_the_earliest_time_wins_and_a_pass_that_starts_sooner_serves_it():
    clock, job, serial = job_and_clock()
    serial.later(5.0)
    serial.later(1.0)
    serial.later(3.0)
    clock.advance(0.9)
    assert job.seen == []
    clock.advance(0.1)
    assert len(job.seen) == 1, "one pass, at the earliest time asked for"
    job.pending.pop(0).callback(None)
    clock.advance(10)
    assert len(job.seen) == 1, "the later times were served by it"
    serial.later(2.0)
    serial.request()
    job.pending.pop(0).callback(None)
    clock.advance(10)
    assert len(job.seen) == 2, "a request before the time serves it too"


def test_later_from_inside_a_pass_runs_after_it_and_while_busy_folds_into_one_more():
    clock, job, serial = job_and_clock()
    serial.request()
    serial.later(0.5)  # e.g. the job saw it must look again after a grace period
    job.pending.pop(0).callback(None)
    clock.advance(0.5)
    assert len(job.seen) == 2
    serial.later(0.1)
    clock.advance(0.1)  # fires while the second pass is still busy
    assert len(job.seen) == 2 and serial.busy
    job.state = 7
    job.pending.pop(0).callback(None)
    assert job.seen == [0, 0, 7], "one more pass, at once, with the newest state"


def test_a_failure_retry_never_postpones_a_sooner_later_and_stop_cancels_both():
    clock, job, serial = job_and_clock()
    serial.request()
    serial.later(0.2)
    job.pending.pop(0).errback(RuntimeError("x"))  # the backoff says 1 s; 0.2 s was asked for
    clock.advance(0.2)
    assert len(job.seen) == 2
    job.pending.pop(0).errback(RuntimeError("y"))
    serial.later(30)
    serial.stop()
    clock.advance(60)
    assert len(job.seen) == 2


def test_a_request_folded_into_a_failed_pass_runs_at_once_with_no_retry_left_behind():
    clock, job, serial = job_and_clock()
    serial.request()
    serial.request()
    job.pending.pop(0).errback(RuntimeError("x"))
    assert len(job.seen) == 2, "the folded request runs at once"
    clock.advance(5)
    assert len(job.seen) == 2 and serial.busy, "no retry started a pass beside it"
    job.pending.pop(0).callback(None)
    clock.advance(60)
    assert len(job.seen) == 2 and serial.last_error is None
