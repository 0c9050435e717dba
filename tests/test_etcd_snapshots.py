"""PrefixWatcher and Session against a real etcd server."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor

from networkd.etcd.client import EtcdClient, EtcdUnavailable
from networkd.etcd.reflector import PrefixWatcher
from networkd.etcd.session import Session
from networkd.options import parse_endpoints
from tests.support.tcpproxy import TCPProxy
from tests.support.waiting import eventually, sleep


def client_for(*endpoints: str) -> EtcdClient:
    return EtcdClient(parse_endpoints(",".join(endpoints)), call_timeout=1.0)


class Recorder:
    def __init__(self):
        self.snapshots = []

    def __call__(self, snapshot):
        self.snapshots.append(snapshot)

    @property
    def last(self):
        return self.snapshots[-1] if self.snapshots else None

    def values(self):
        return dict(self.last.values) if self.last else None


class Watching:
    """``async with Watching(endpoint, prefix) as (watcher, seen)``: a started
    PrefixWatcher with a Recorder subscribed, stopped and closed afterwards."""

    def __init__(self, endpoint: str, prefix: str, start: bool = True):
        self.client = client_for(*endpoint.split(","))
        self.watcher = PrefixWatcher(self.client, prefix, reactor)
        self.seen = Recorder()
        self.watcher.subscribe(self.seen)
        self.start = start

    async def __aenter__(self):
        if self.start:
            self.watcher.startService()
        return self.watcher, self.seen

    async def __aexit__(self, *exc):
        await self.watcher.stopService()
        await self.client.close()


@pytest_twisted.ensureDeferred
async def test_initial_snapshot_then_every_change(etcd_server, etcd_root):
    etcd_server.put(f"{etcd_root}/config/domains/a.lain", '{"ips":["10.0.0.1"]}')
    etcd_server.put(f"{etcd_root}/config/other", "not in the prefix")
    async with Watching(etcd_server.endpoint, f"{etcd_root}/config/domains/") as (watcher, seen):
        await eventually(lambda: seen.last, message="first snapshot")
        assert seen.values() == {"a.lain": '{"ips":["10.0.0.1"]}'}

        etcd_server.put(f"{etcd_root}/config/domains/b.lain", "b")
        await eventually(lambda: seen.values() == {"a.lain": '{"ips":["10.0.0.1"]}', "b.lain": "b"})
        etcd_server.delete(f"{etcd_root}/config/domains/a.lain")
        await eventually(lambda: seen.values() == {"b.lain": "b"})
        assert seen.last.revision == etcd_server.revision()

        late = Recorder()
        watcher.subscribe(late)
        assert late.values() == {"b.lain": "b"}, "a new subscriber gets the current snapshot at once"


@pytest_twisted.ensureDeferred
async def test_snapshots_name_their_changed_keys_and_a_prefix_is_read_in_pages(etcd_server, etcd_root, monkeypatch):
    """A snapshot says which keys changed since the one before (None after a whole read),
    so a subscriber with a big table (the DNS zone) updates only those; a re-read goes
    a page at a time at one revision (7 keys a page here: 29 keys, 5 pages)."""
    from networkd.etcd import reflector

    monkeypatch.setattr(reflector, "LIST_PAGE", 7)  # for the re-reads: the first one is one request
    ops = "\n".join(f"put {etcd_root}/k{i:02} v{i}" for i in range(30)) + "\n\n\n"
    etcd_server.ctl("txn", input="\n" + ops)
    etcd_server.put(f"{etcd_root}0", "beside the prefix")
    async with Watching(etcd_server.endpoint, f"{etcd_root}/") as (watcher, seen):
        await eventually(lambda: seen.last)
        first = seen.last
        assert dict(first.values) == {f"k{i:02}": f"v{i}" for i in range(30)}
        assert first.revision == etcd_server.revision() and first.changed is None
        etcd_server.put(f"{etcd_root}/k01", "new")
        etcd_server.delete(f"{etcd_root}/k02")
        await eventually(lambda: "k02" not in seen.values())
        later = seen.snapshots[seen.snapshots.index(first) + 1:]
        assert set().union(*(s.changed for s in later)) == {"k01", "k02"}
        assert [s.generation for s in later] == list(range(first.generation + 1, first.generation + 1 + len(later)))
        assert seen.last.changes_since(seen.last.generation - 2) is None, "only relative to the snapshot just before"
        assert seen.last.changes_since(seen.last.generation - 1) == seen.last.changed
        etcd_server.put(f"{etcd_root}/k03", "lost")  # as if its event never came: a whole read finds it
        watcher._values.put("k03", "v3")
        count = len(seen.snapshots)
        watcher.resync()
        await eventually(lambda: len(seen.snapshots) > count and seen.values()["k03"] == "lost")
        assert seen.last.changed is None, "after a whole read that differs: compare everything"
        expected = {f"k{i:02}": f"v{i}" for i in range(30) if i not in (1, 2, 3)} | {"k01": "new", "k03": "lost"}
        assert seen.values() == expected and seen.last.revision == etcd_server.revision()


@pytest_twisted.ensureDeferred
async def test_burst_is_coalesced_into_few_snapshots(etcd_server, etcd_root):
    async with Watching(etcd_server.endpoint, f"{etcd_root}/") as (watcher, seen):
        await eventually(lambda: seen.last)
        before = len(seen.snapshots)
        # One etcd transaction of 50 puts: one revision, one watch response.
        ops = "\n".join(f'put {etcd_root}/k{i} v{i}' for i in range(50)) + "\n\n\n"
        etcd_server.ctl("txn", input="\n" + ops)
        await eventually(lambda: len(seen.values()) == 50)
        assert len(seen.snapshots) - before == 1


@pytest_twisted.ensureDeferred
async def test_separate_puts_while_a_subscriber_is_slow_become_few_snapshots(etcd_server, etcd_root):
    """A subscriber that takes 50 ms a snapshot (a big zone rebuilt) must not get one snapshot per put
    of a burst of separate puts: the next one waits as long as the last one took, and gathers them."""
    import time as clock

    async with Watching(etcd_server.endpoint, f"{etcd_root}/") as (watcher, seen):
        await eventually(lambda: seen.last)
        watcher.subscribe(lambda snapshot: clock.sleep(0.05))
        before = len(seen.snapshots)
        client = client_for(etcd_server.endpoint)
        try:
            for i in range(40):
                await client.put(f"{etcd_root}/k{i}".encode(), b"v")
        finally:
            await client.close()
        await eventually(lambda: len(seen.values()) == 40, timeout=20)
        published = len(seen.snapshots) - before
        assert published <= 20, f"{published} snapshots for 40 separate puts"
        assert seen.values() == {f"k{i}": "v" for i in range(40)}


@pytest_twisted.ensureDeferred
async def test_survives_etcd_restart_without_losing_writes(private_etcd, etcd_root):
    async with Watching(private_etcd.endpoint, f"{etcd_root}/") as (watcher, seen):
        private_etcd.put(f"{etcd_root}/before", "1")
        await eventually(lambda: seen.values() == {"before": "1"})

        private_etcd.stop()
        await eventually(lambda: not watcher.status.connected, timeout=10, message="loss noticed")
        await sleep(3)
        assert seen.values() == {"before": "1"}, "the last snapshot is kept while etcd is away"
        assert watcher.status.last_error

        private_etcd.start()
        private_etcd.put(f"{etcd_root}/after", "2")
        await eventually(lambda: seen.values() == {"before": "1", "after": "2"}, timeout=15)
        assert watcher.status.connected
        assert {f"{etcd_root}/{k}": v for k, v in seen.values().items()} == private_etcd.get_prefix(f"{etcd_root}/")


@pytest_twisted.ensureDeferred
async def test_compaction_while_disconnected_relists(private_etcd, etcd_root):
    proxy = TCPProxy(private_etcd.client_port)
    try:
        async with Watching(proxy.endpoint, f"{etcd_root}/", start=False) as (watcher, seen):
            for i in range(5):
                private_etcd.put(f"{etcd_root}/k{i}", f"v{i}")
            watcher.startService()
            await eventually(lambda: seen.values() and len(seen.values()) == 5)

            proxy.cut()
            await eventually(lambda: not watcher.status.connected, timeout=10)
            private_etcd.delete(f"{etcd_root}/k0")
            private_etcd.put(f"{etcd_root}/k1", "changed")
            private_etcd.put(f"{etcd_root}/new", "x")
            private_etcd.ctl("compact", str(private_etcd.revision()))
            proxy.heal()

            expected = {k[len(etcd_root) + 1:]: v for k, v in private_etcd.get_prefix(f"{etcd_root}/").items()}
            await eventually(lambda: seen.values() == expected, timeout=15)
            assert watcher.status.relists >= 1, "the watcher had to read the prefix again"
    finally:
        proxy.close()


@pytest_twisted.ensureDeferred
async def test_resync_reads_everything_again(etcd_server, etcd_root):
    async with Watching(etcd_server.endpoint, f"{etcd_root}/") as (watcher, seen):
        etcd_server.put(f"{etcd_root}/a", "1")
        await eventually(lambda: seen.values() == {"a": "1"})
        count = len(seen.snapshots)
        watcher.resync()
        await eventually(lambda: len(seen.snapshots) > count)
        assert seen.values() == {"a": "1"}


@pytest_twisted.ensureDeferred
async def test_fails_over_to_the_next_endpoint(etcd_server, etcd_root):
    from tests.support.ports import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    etcd_server.put(f"{etcd_root}/x", "y")
    watching = Watching(f"{dead},{etcd_server.endpoint}", f"{etcd_root}/")
    async with watching as (watcher, seen):
        await eventually(lambda: seen.values() == {"x": "y"}, timeout=10)
        assert watching.client.failovers >= 1


@pytest_twisted.ensureDeferred
async def test_an_outage_is_logged_once_and_its_end_once_not_per_attempt(etcd_server, etcd_root):
    from tests.support.logcapture import LogCapture
    from tests.support.ports import free_port

    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    etcd_server.put(f"{etcd_root}/x", "y")
    client = client_for(*dead, etcd_server.endpoint)
    client.outage_settle = 0.2  # the end is said once calls were answered this long, none failing
    try:
        with LogCapture() as logs:
            for _ in range(5):
                try:
                    got = await client.get(f"{etcd_root}/x".encode())
                    break
                except EtcdUnavailable:
                    continue
            assert got is not None and got.value == b"y"
            assert not logs.matching("answers"), "not yet: etcd may only answer for a moment"
            await sleep(0.3)
        assert client.failovers == 2
        assert len(logs.matching("failing over")) == 1, logs.matching("failing over")
        assert len(logs.matching("answers; 2 fail-over(s)")) == 1
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_guarded_create_and_delete(etcd_server, etcd_root):
    client = client_for(etcd_server.endpoint)
    try:
        lease = await client.grant_lease(5)
        other = await client.grant_lease(5)
        key = f"{etcd_root}/lock".encode()
        assert await client.put_if_absent(key, b"me", lease) is True
        assert await client.put_if_absent(key, b"you", other) is False
        assert (await client.get(key)).value == b"me"
        created, there = await client.create_or_get(key, b"you", other)  # who beat us, and when
        assert created is False and there.value == b"me" and there.lease == lease
        assert there.mod_revision == (await client.get(key)).mod_revision
        assert await client.delete_if_lease(key, other) is False
        assert (await client.get(key)).value == b"me"
        assert await client.delete_if_lease(key, lease) is True
        assert await client.get(key) is None
        await client.revoke_lease(lease)
        await client.revoke_lease(other)
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_keep_alive_timestamp_stops_while_etcd_is_down(private_etcd):
    client = client_for(private_etcd.endpoint)
    session = Session(client, ttl=3, reactor=reactor)
    back = []
    session.on_reconnect(lambda seconds: back.append((seconds, session.last_ack)))
    session.startService()
    try:
        await eventually(lambda: session.last_ack is not None)
        first = session.last_ack
        await eventually(lambda: session.last_ack > first, timeout=3, message="keep-alive advances")

        private_etcd.stop()
        await sleep(1.5)
        frozen = session.last_ack
        await sleep(2)
        assert session.last_ack == frozen, "no acknowledgement while etcd is down"
        assert session.ack_age() > 2
        assert session.last_error

        assert back == [], "not back while etcd is down"
        private_etcd.start()
        await eventually(lambda: session.last_ack and session.last_ack > frozen, timeout=15)
        await sleep(1.2)  # more acknowledgements: reported once, at the first
        assert len(back) == 1 and back[0][0] >= 2.5 and back[0][1] > frozen, back
    finally:
        await session.stopService()
        await client.close()


@pytest_twisted.ensureDeferred
async def test_unreachable_etcd_is_a_named_error():
    from tests.support.ports import free_port

    client = client_for(f"http://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(EtcdUnavailable):
            await client.get_prefix(b"/x/")
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_periodic_reread_repairs_an_event_the_watch_lost(etcd_server, etcd_root):
    """Anti-entropy: even if an event never arrives, the snapshot converges on etcd's content."""
    client = client_for(etcd_server.endpoint)
    watcher = PrefixWatcher(client, f"{etcd_root}/", reactor, relist_every=1.0)
    seen = Recorder()
    watcher.subscribe(seen)
    deliver = watcher._on_event
    watcher._on_event = lambda event: None if event.key.endswith(b"/lost") else deliver(event)
    watcher.startService()
    try:
        etcd_server.put(f"{etcd_root}/a", "1")
        await eventually(lambda: seen.values() == {"a": "1"})
        count = len(seen.snapshots)
        await sleep(1.5)
        assert len(seen.snapshots) == count, "an unchanged re-read publishes nothing"

        # The watch drops this event (the filter above): only a re-read can bring it.  (No check
        # that it is missing at first: a re-read may come within any moment after the put.)
        etcd_server.put(f"{etcd_root}/lost", "x")
        await eventually(lambda: seen.values() == {"a": "1", "lost": "x"}, timeout=5)
    finally:
        await watcher.stopService()
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_watch_waiting_out_its_backoff_retries_at_once_when_etcd_answers_again(etcd_server, etcd_root):
    """After a partition heal the lock watch must not wait out a long backoff (a node back from a partition
    could not take a VIP handed to it): ``retry_now`` (called on a keep-alive acknowledged) ends the wait."""
    from networkd.backoff import Backoff

    proxy = TCPProxy(etcd_server.client_port)
    client = client_for(proxy.endpoint)
    watcher = PrefixWatcher(client, f"{etcd_root}/", reactor, backoff=Backoff(5.0, 5.0, rng=lambda: 0.5))
    changes = []
    watcher.on_status(changes.append)
    try:
        watcher.startService()
        await eventually(lambda: watcher.status.connected, timeout=10)
        proxy.cut()
        await eventually(lambda: not watcher.status.connected, timeout=10)
        await sleep(0.3)  # now in a 5 s wait
        proxy.heal()
        watcher.retry_now()
        await eventually(lambda: watcher.status.connected, timeout=1.0, message="the watch is back within 1 s")
        assert changes == [True, False, True]
    finally:
        await watcher.stopService()
        await client.close()
        proxy.close()


@pytest_twisted.ensureDeferred
async def test_snapshots_say_at_which_revision_each_key_was_deleted(etcd_server, etcd_root):
    """Keys on one lease go at one revision when it is revoked (or expires); keys deleted one by one go
    at their own.  The VIP lock keeper tells a holder's expiry from its release this way
    (networkd.vips.locks.EXPIRY_GRACE)."""
    prefix = f"{etcd_root}/networkd/vips/"
    lease = etcd_server.ctl("lease", "grant", "60").stdout.split()[1]
    for key in ("10.0.0.5.lock", "members/n2"):
        etcd_server.ctl("put", "--lease", lease, prefix + key, "n2")
    etcd_server.put(prefix + "10.0.0.6.lock", "n3")
    etcd_server.put(prefix + "members/n3", "10.9.0.3")
    async with Watching(etcd_server.endpoint, prefix) as (watcher, seen):
        await eventually(lambda: seen.last and len(seen.values()) == 4, message="first snapshot")
        assert seen.last.deleted is None, "a whole read: which keys went is not known"
        etcd_server.delete(prefix + "10.0.0.6.lock")
        etcd_server.delete(prefix + "members/n3")
        etcd_server.ctl("lease", "revoke", lease)
        await eventually(lambda: seen.values() == {}, message="all gone")
        deleted = {}
        for snapshot in seen.snapshots[1:]:
            deleted.update(snapshot.deleted)
        assert deleted["10.0.0.5.lock"] == deleted["members/n2"], "one lease: one revision"
        assert deleted["10.0.0.6.lock"] < deleted["members/n3"] < deleted["10.0.0.5.lock"]
        etcd_server.put(prefix + "members/n3", "back")
        await eventually(lambda: seen.values() == {"members/n3": "back"})
        assert "members/n3" not in seen.last.deleted, "put again: no longer deleted"
