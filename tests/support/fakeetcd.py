"""One fake etcd client, lease session and watcher set for the clock-driven VIP tests.

``FakeEtcd`` keeps keys in a dict and records lock writes in a ``Journal``
(reads carry revision 1, like every ``Watchers`` snapshot); ``FakeSession``
acknowledges keep-alives when the test says so, on the test's clock.
"""

from __future__ import annotations

from twisted.internet import defer

from networkd.etcd.client import KeyValue
from networkd.etcd.reflector import Snapshot

LEASE = 0x42


class Journal(list):
    """Every host and etcd change, in order."""


class FakeSession:
    ttl = 3
    interval = 1.0  # the tests acknowledge keep-alives once a second
    bound = 0.5  # how long one keep-alive may take (TTL/6 at the tests' TTL 3)

    def __init__(self, clock):
        self._clock = clock
        self.lease = LEASE
        self.last_ack = clock.seconds()
        self.acks, self.losses, self.reconnects = [], [], []

    def ack_age(self):
        return None if self.last_ack is None else self._clock.seconds() - self.last_ack

    def on_ack(self, cb):
        self.acks.append(cb)

    def on_lost(self, cb):
        self.losses.append(cb)

    def on_reconnect(self, cb):
        self.reconnects.append(cb)

    def ack(self):
        self.last_ack = self._clock.seconds()
        for cb in self.acks:
            cb(self.lease)


class FakeEtcd:
    def __init__(self, journal):
        self.journal = journal
        self.kv = {}

    def put_if_absent(self, key, value, lease):
        if key in self.kv:
            return defer.succeed(False)
        self.kv[key] = (value, lease)
        self.journal.append(("lock", key.decode().rsplit("/", 1)[-1]))
        return defer.succeed(True)

    def create_or_get(self, key, value, lease):
        if key in self.kv:
            held, on = self.kv[key]
            return defer.succeed((False, KeyValue(key, held, 1, on)))
        return self.put_if_absent(key, value, lease).addCallback(lambda created: (created, None))

    def delete_if_lease(self, key, lease, created=0):
        if self.kv.get(key, (None, None))[1] == lease:
            del self.kv[key]
            self.journal.append(("unlock", key.decode().rsplit("/", 1)[-1]))
            return defer.succeed(True)
        return defer.succeed(False)

    def put(self, key, value, lease=None):
        self.kv[key] = (value, lease)
        return defer.succeed(None)

    def get(self, key):
        if key not in self.kv:
            return defer.succeed(None)
        value, lease = self.kv[key]
        return defer.succeed(KeyValue(key, value, 1, lease or 0))


class Watchers:
    def __init__(self):
        self.subscribers = {}

    def __call__(self, prefix):
        watchers = self

        class W:
            def subscribe(self, cb):
                watchers.subscribers[prefix] = cb

        return W()

    def publish(self, prefix, values):
        self.subscribers[prefix](Snapshot(prefix, 1, values))
