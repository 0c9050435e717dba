"""The peer channel over real UDP on 127.0.0.1: only signed, fresh, never-seen messages are answered.

A promiser (networkd.peers.failsafe.Failsafe) listens; a client channel
with its own Wire sends to it.  Unsigned, wrongly signed, stale and
replayed messages get no answer and are logged with their source and why.
"""

from __future__ import annotations

import json
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.python import usage

from networkd.api.peerstatus import peer_status
from networkd.options import Options
from networkd.peers.channel import PeerChannel
from networkd.peers.failsafe import Failsafe
from networkd.peers.wire import Wire
from tests.support.logcapture import LogCapture
from tests.support.ports import free_port
from tests.support.waiting import eventually, sleep

SECRET = b"correct horse battery staple"


class FakeSession:
    ttl, interval, bound = 3, 2 / 3, 0.5

    def __init__(self, reachable: bool):
        self.lease = 0x1234 if reachable else None
        self.last_ack = time.monotonic() if reachable else None
        self.last_error = None if reachable else "etcd unreachable"

    def ack_age(self):
        return None if self.last_ack is None else time.monotonic() - self.last_ack


class NoLocks:
    def held(self):
        return frozenset()

    def campaigning(self, ip):
        return False


class NoInputs:
    members, member_values = frozenset(), {}


def promiser(port: int, reachable: bool = False) -> Failsafe:
    return Failsafe(reactor=reactor, clock=time.monotonic, wall=time.time, session=FakeSession(reachable),
                    locks=NoLocks(), inputs=NoInputs(), hostname="promiser", promise=3.0, secret=SECRET,
                    listen=("127.0.0.1", port), changed=lambda: None)


class Client:
    """A peer channel of a would-be holder, recording every answer it gets."""

    def __init__(self, secret: bytes = SECRET, wall=time.time):
        self.answers: list[dict] = []
        self.channel = PeerChannel(Wire(secret, "holder", wall), reactor,
                                   lambda message, address: self.answers.append(message))
        self.port = free_port()
        self.channel.listen("127.0.0.1", self.port)

    def raw(self, data: bytes, to: int) -> None:
        self.channel.transport.write(data, ("127.0.0.1", to))


@pytest.fixture
def logs():
    with LogCapture() as capture:
        yield capture


@pytest_twisted.ensureDeferred
async def test_only_signed_fresh_unseen_messages_are_answered(logs):
    port = free_port()
    side = promiser(port)
    side.start()
    good, wrong, stale = Client(), Client(b"another secret"), Client(wall=lambda: time.time() - 60)
    try:
        source = f"127.0.0.1:{good.port}"
        # A good request: answered with a promise, which the promiser now keeps.
        data, nonce = good.channel.wire.encode("promise?", vips=["10.9.0.1"], seconds=3)
        good.raw(data, port)
        answer = (await eventually(lambda: good.answers, 5, message="an answer"))[0]
        assert (answer["type"], answer["re"], answer["vips"], answer["seconds"]) == ("promise", nonce, ["10.9.0.1"], 3)
        assert side.promises.blocked() == {"10.9.0.1"}
        assert [p["to"] for p in peer_status(side)["promises_given"]] == ["holder"]

        # The same bytes again: a replay.
        good.raw(data, port)
        # Unsigned: the JSON body alone.
        good.raw(data.partition(b" ")[2], port)
        # Signed with another secret; signed with a clock a minute behind.
        wrong.channel.send(("127.0.0.1", port), "promise?", vips=["10.9.0.2"], seconds=3)
        stale.channel.send(("127.0.0.1", port), "promise?", vips=["10.9.0.3"], seconds=3)
        await eventually(lambda: side.channel.refused >= 4, 5, message="four refusals")
        await sleep(0.2)
        assert len(good.answers) == 1 and not wrong.answers and not stale.answers
        assert side.promises.blocked() == {"10.9.0.1"}, "a refused message must not make a promise"
        refused = logs.matching("refused")
        for why, src in (("replayed nonce", source), ("unsigned message", source),
                         ("bad MAC", f"127.0.0.1:{wrong.port}"), ("timestamp 60.0s old", f"127.0.0.1:{stale.port}")):
            assert any(why in line and src in line for line in refused), (why, src, refused)
        assert peer_status(side)["refused_messages"] == 4
    finally:
        for client in (good, wrong, stale):
            client.channel.close()
        side.stop()


@pytest_twisted.ensureDeferred
async def test_a_promiser_that_reaches_etcd_refuses_and_says_why():
    port = free_port()
    side = promiser(port, reachable=True)
    side.start()
    client = Client()
    try:
        nonce = client.channel.send(("127.0.0.1", port), "promise?", vips=["10.9.0.1"], seconds=3)
        answer = (await eventually(lambda: client.answers, 5, message="an answer"))[0]
        assert (answer["type"], answer["re"], answer["why"]) == ("refuse", nonce, "I can reach etcd")
        assert side.promises.blocked() == frozenset()
    finally:
        client.channel.close()
        side.stop()


def test_peer_secret_file_must_exist_and_not_be_empty(tmp_path):
    base = ["--no-vips", "--no-dns", "--node-ip", "10.1.2.3"]
    missing = tmp_path / "missing"
    with pytest.raises(usage.UsageError, match=f"--peer-secret-file: cannot read '{missing}'"):
        Options().parseOptions([*base, "--peer-secret-file", str(missing)])
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(usage.UsageError, match=f"--peer-secret-file: '{empty}' is empty"):
        Options().parseOptions([*base, "--peer-secret-file", str(empty)])
    good = tmp_path / "secret"
    good.write_text("s3cret\n")
    options = Options()
    options.parseOptions([*base, "--peer-secret-file", str(good)])
    assert options["peer-secret"] == b"s3cret"
    assert str(options["peer-listen"]) == "10.1.2.3:3010"


def test_members_value_publishes_the_peer_address():
    from networkd.peers.channel import member_peer
    from networkd.vips.planner import member_value

    value = member_value("10.1.2.3", ["10.9.0.1"], peer="10.1.2.3:3010")
    assert json.loads(value)["peer"] == "10.1.2.3:3010"
    assert member_peer(value) == ("10.1.2.3", 3010)
    assert member_peer(member_value("10.1.2.3", [])) is None  # failsafe off there: it cannot promise
    assert member_peer("10.1.2.3") is None  # an older daemon's value

