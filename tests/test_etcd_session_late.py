"""The session and late keep-alive answers (networkd.etcd.session): a keep-alive given up at its bound
and answered later dates the lease from when it was sent, never later, and only when that helps."""

from __future__ import annotations

from twisted.internet import defer, task

from networkd.etcd.session import Session


class HeldClient:
    """grant_lease answers at once; each keep_alive waits for the test (``pending``)."""

    def __init__(self):
        self.late = None
        self.window = None
        self.pending: list[defer.Deferred] = []

    def hear_late_keep_alives(self, listener, window):
        self.late, self.window = listener, window
        return True

    def grant_lease(self, ttl):
        return defer.succeed(0x42)

    def keep_alive(self, lease, timeout=None):
        d = defer.Deferred()
        self.pending.append(d)
        return d


def started(ttl: int = 3):
    clock, client = task.Clock(), HeldClient()
    session = Session(client, ttl=ttl, reactor=clock)
    acks = []
    session.on_ack(lambda lease: acks.append(clock.seconds()))
    session.startService()
    return clock, client, session, acks


def test_a_late_answer_dates_the_lease_from_its_sending():
    clock, client, session, acks = started()
    assert client.window == 3 and session.last_ack == 0.0, "granted at 0"
    clock.advance(session.interval)  # the first keep-alive goes out at 2/3 s ...
    sent = clock.seconds()
    clock.advance(0.5)  # ... and is given up at its bound (0.5 s)
    client.pending[0].errback(defer.TimeoutError())
    clock.advance(0.2)  # sent again (after a backoff) and waiting too
    assert len(client.pending) == 2
    clock.advance(0.2)
    client.late(0x42, 3, clock.seconds() - sent)  # the first is answered 0.9 s after its sending
    assert session.last_ack == sent and session.late_acks == 1 and len(acks) == 2
    assert session.last_error is None


def test_late_answers_that_do_not_help_are_ignored():
    clock, client, session, acks = started()
    clock.advance(session.interval)
    client.pending[0].callback(3)  # acknowledged, sent at 2/3 s
    assert session.last_ack == session.interval
    clock.advance(0.1)
    client.late(0x42, 3, 0.3)  # sent before the last acknowledged one
    client.late(0x43, 3, 0.05)  # another lease's
    client.late(0x42, 0, 0.05)  # "gone": for the keep-alive loop to find out
    assert session.late_acks == 0 and session.last_ack == session.interval and len(acks) == 2
    clock.advance(3.0)
    client.late(0x42, 3, 2.3)  # sent after the last one, but past the fencing deadline (TTL - 0.75 s)
    assert session.late_acks == 0 and session.last_ack == session.interval
    client.late(0x42, 3, 2.0)  # within it: taken
    assert session.late_acks == 1 and session.last_ack == clock.seconds() - 2.0


def test_no_late_answers_after_the_session_stopped():
    clock, client, session, acks = started()
    clock.advance(session.interval)
    client.pending[0].callback(3)
    stopping = session.stopService()
    client.late(0x42, 3, 0.01)
    assert session.late_acks == 0
    del stopping


def test_a_late_answer_close_to_the_deadline_asks_again_at_once():
    """An election: the first keep-alive is answered 1.0 s after its sending, which leaves 1.25 s to the
    fencing deadline (too little for much of a whole-second address lifetime), while the next one waits
    at another member.  That one is given up and a keep-alive sent again at once (the client sends it to
    the member that just answered), not after a backoff or whenever the other member answers."""
    clock, client, session, acks = started()
    clock.advance(session.interval)
    sent = clock.seconds()
    clock.advance(0.5)
    client.pending[0].errback(defer.TimeoutError())  # given up at its bound
    clock.advance(0.2)
    assert len(client.pending) == 2, "sent again, waiting at another member"
    clock.advance(0.3)
    client.late(0x42, 3, clock.seconds() - sent)  # 1.0 s old: deadline 1.25 s away
    assert session.last_ack == sent and session.asked_again == 1
    assert client.pending[1].called, "the one in flight is given up"
    assert len(client.pending) == 3, "and one sent at once"
    client.pending[2].callback(3)
    assert session.last_ack == clock.seconds() and session.last_error is None


def test_a_late_answer_with_time_left_lets_the_one_in_flight_be():
    clock, client, session, acks = started()
    clock.advance(session.interval)
    sent = clock.seconds()
    clock.advance(0.5)
    client.pending[0].errback(defer.TimeoutError())
    clock.advance(0.1)
    assert len(client.pending) == 2
    client.late(0x42, 3, clock.seconds() - sent)  # 0.6 s old: deadline 1.65 s away
    assert session.last_ack == sent and session.asked_again == 0
    assert not client.pending[1].called and len(client.pending) == 2
