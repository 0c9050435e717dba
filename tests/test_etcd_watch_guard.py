"""A watch that carries another prefix's events is a broken stream, not news (networkd/etcd/client.py).

aetcd's Watcher hands the "created" answer of a watch request that was given up (our call timed
out while etcd was slow) to the next watch request waiting on the same stream: that watch then
receives the first one's events.  Shown here on aetcd's own Watcher with a scripted stream, and
what networkd does with such a watch: its events never reach the watcher, the watch ends as an
outage (a fresh client), so the snapshot's revision is not moved past events it never saw.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import pytest_twisted
from aetcd import rpc
from aetcd.watcher import Watcher
from twisted.internet import defer, reactor

from networkd.etcd.client import EtcdClient, EtcdUnavailable
from networkd.options import parse_endpoints


class ScriptedStream:
    """A WatchStub whose answers the test sends."""

    def __init__(self):
        self.answers: asyncio.Queue = asyncio.Queue()
        self.requests = []

    def Watch(self, requests, metadata=None):  # noqa: N802 - grpc's name
        async def read():
            async for request in requests:
                self.requests.append(request)

        asyncio.ensure_future(read())

        async def answers():
            while True:
                yield await self.answers.get()

        return answers()


def event(key: bytes, revision: int):
    return rpc.Event(type=rpc.Event.EventType.PUT, kv=rpc.KeyValue(key=key, value=b"n1", mod_revision=revision))


def on_asyncio(coroutine) -> defer.Deferred:
    """Run an asyncio coroutine from a Twisted test (the reactor is asyncio's loop)."""
    return defer.Deferred.fromFuture(asyncio.ensure_future(coroutine))


@pytest_twisted.ensureDeferred
async def test_aetcd_gives_a_given_up_watchs_answer_and_events_to_the_next_one():
    async def scenario():
        stream, seen = ScriptedStream(), []
        watcher = Watcher(stream, timeout=None)

        async def locks(e):
            seen.append(("locks", e))

        async def configs(e):
            seen.append(("configs", e))

        first = asyncio.ensure_future(watcher.add_callback(b"/locks/", locks, range_end=b"/locks0"))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(watcher.add_callback(b"/configs/", configs, range_end=b"/configs0"))
        await asyncio.sleep(0.01)
        first.cancel()  # given up: etcd had not answered in time
        await asyncio.sleep(0.01)
        await stream.answers.put(rpc.WatchResponse(created=True, watch_id=0))  # the answer to the first request
        await stream.answers.put(rpc.WatchResponse(watch_id=0, events=[event(b"/locks/10.0.0.1.lock", 500)]))
        await asyncio.sleep(0.01)
        try:
            return second.done() and second.result().watch_id, [(who, e.kv.key) for who, e in seen]
        finally:
            await watcher.shutdown()

    watch_id, seen = await on_asyncio(scenario())
    assert watch_id == 0, "the second request got the first one's watch"
    assert seen == [("configs", b"/locks/10.0.0.1.lock")], "and its events"


class Events:
    """An aetcd Watch: yields the given events, then stays quiet as a live watch does."""

    def __init__(self, events):
        self.events = events

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        for e in self.events:
            yield e
        await asyncio.Event().wait()

    async def cancel(self):
        pass


@pytest_twisted.ensureDeferred
async def test_a_watch_carrying_another_prefixs_events_ends_as_an_outage_and_delivers_none_of_them():
    mine = SimpleNamespace(kind="PUT", kv=SimpleNamespace(key=b"/configs/10.0.0.2", value=b"{}", mod_revision=400))
    foreign = SimpleNamespace(kind="PUT", kv=SimpleNamespace(key=b"/locks/10.0.0.1.lock", value=b"n1",
                                                             mod_revision=500))

    class Aetcd:
        async def watch_prefix(self, prefix, start_revision=None):
            return Events([mine, foreign])

    client = EtcdClient(parse_endpoints("http://127.0.0.1:1"), call_timeout=1.0)
    fake = Aetcd()
    client._current = lambda: fake
    client._client = fake
    delivered = []
    handle = await client.watch_prefix(b"/configs/", 400, delivered.append)
    with pytest.raises(EtcdUnavailable, match="another watch's events"):
        await handle.done.addTimeout(5, reactor)  # (without the check it would run on, quiet, for ever)
    assert [e.key for e in delivered] == [b"/configs/10.0.0.2"], "the other prefix's event is not passed on"
    assert client._client is None, "the stream is not trusted again: a fresh client next time"
