"""A prefix read again whole without one long reactor turn (issue 13): ReRead and Discard,
and, against real etcd, that the snapshots a subscriber keeps stay as they were."""

from __future__ import annotations

import pytest_twisted

from networkd.etcd import reflector
from networkd.etcd.reread import DISCARD_LOOKS, DISCARD_PIECE, Discard, ReRead
from tests.support.waiting import eventually
from tests.test_etcd_snapshots import Watching


class StepReactor:
    """callLater kept until the test runs it: one reactor turn per ``step``."""

    def __init__(self):
        self.calls = []

    def callLater(self, delay, f, *args):
        call = Call(f, args, delay)
        self.calls.append(call)
        return call

    def step(self):
        call = self.calls.pop(0)
        call.active_ = False
        call.f(*call.args)


class Call:
    def __init__(self, f, args, delay):
        self.f, self.args, self.delay, self.active_ = f, args, delay, True

    def active(self):
        return self.active_

    def cancel(self):
        self.active_ = False


def pair(key: bytes, value: bytes):
    return key.decode(), value.decode()


def read(held, pages):
    reread = ReRead(held, pair)
    reread.add(None, None)
    for key, value in pages:
        reread.add(key.encode(), value.encode())
    return reread


def test_a_reread_compares_key_by_key_as_the_pages_come():
    held = {f"k{i}": f"v{i}" for i in range(100)}
    same = read(held, [(f"k{i}", f"v{i}") for i in reversed(range(100))])
    assert not same.changed() and same.values == held
    assert all(same.values[k] is held[k] for k in held), "equal values are the held strings (freed as they come)"
    assert read(held, [(f"k{i}", f"v{i}") for i in range(99)]).changed(), "a key deleted"
    assert read(held, [(f"k{i}", f"v{i}") for i in range(101)]).changed(), "a key added"
    assert read(held, [(f"k{i}", "x" if i == 50 else f"v{i}") for i in range(100)]).changed(), "a value changed"
    assert read(held, [(f"k{i}", f"v{i}") for i in range(99)] + [("k0", "v0")]).changed(), "a key twice is one key"
    retried = read(held, [("gone", "1")] + [(f"k{i}", f"v{i}") for i in range(50)])
    retried.add(None, None)  # the read failed and starts again
    for i in range(100):
        retried.add(f"k{i}".encode(), f"v{i}".encode())
    assert not retried.changed() and retried.values == held


def test_a_big_dict_is_freed_a_slice_per_turn_and_only_once_nothing_else_holds_it():
    steps = StepReactor()
    discard = Discard(steps)
    table = {i: str(i) for i in range(5 * DISCARD_PIECE)}
    kept = {i: str(i) for i in range(10)}
    holder = [kept]  # someone else (a subscriber's snapshot) still holds this one
    discard.later(kept)
    discard.later(table)
    del table
    steps.step()
    for _ in range(2):
        assert steps.calls[0].delay > 0, "a held dict is looked at again a while later"
        steps.step()
    assert holder[0] == {i: str(i) for i in range(10)}, "a dict held elsewhere is never emptied"
    assert discard.pending() == 2
    for _ in range(DISCARD_LOOKS - 3):
        steps.step()
    assert discard.pending() == 1 and holder[0] == {i: str(i) for i in range(10)}, "let go after a while, intact"
    turns = 0
    while steps.calls:
        steps.step()
        turns += 1
    assert discard.pending() == 0 and turns == 5, "5 slices of DISCARD_PIECE keys"


@pytest_twisted.ensureDeferred
async def test_rereads_leave_every_published_snapshot_as_it_was(etcd_server, etcd_root, monkeypatch):
    """The dict a re-read does not keep is emptied in slices: never one a subscriber still holds."""
    from networkd.etcd import reread

    monkeypatch.setattr(reflector, "LIST_PAGE", 7)
    monkeypatch.setattr(reread, "DISCARD_LOOKS", 3)  # the kept snapshots' dicts are let go sooner
    ops = "\n".join(f"put {etcd_root}/k{i:02} v{i}" for i in range(30)) + "\n\n\n"
    etcd_server.ctl("txn", input="\n" + ops)
    async with Watching(etcd_server.endpoint, f"{etcd_root}/") as (watcher, seen):
        await eventually(lambda: seen.last)
        expected = {f"k{i:02}": f"v{i}" for i in range(30)}
        for round_ in range(2):
            count = len(seen.snapshots)
            watcher.resync()  # unchanged: the same values published again, the read's own dict freed
            await eventually(lambda: len(seen.snapshots) > count and not watcher._discard.pending())
            watcher._on_event = lambda event: None  # the watch loses the next event...
            etcd_server.put(f"{etcd_root}/k{round_:02}", "lost")
            await eventually(lambda: watcher.status.revision < etcd_server.revision())
            del watcher._on_event
            expected[f"k{round_:02}"] = "lost"
            count = len(seen.snapshots)
            watcher.resync()  # ...a re-read finds it: the published dict goes, once no snapshot holds it
            await eventually(lambda: len(seen.snapshots) > count and seen.values() == expected)
        await eventually(lambda: not watcher._discard.pending())
        assert [dict(s.values) for s in seen.snapshots[:2]] == [{f"k{i:02}": f"v{i}" for i in range(30)}] * 2
        assert all(len(s.values) == 30 for s in seen.snapshots), "no snapshot kept by a subscriber was emptied"
