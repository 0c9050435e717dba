"""Lease-bound locks: guarded create, guarded release.

A lock borrows the process lease (networkd.etcd.session); it is never
refreshed by writing it again ([BUG 16]): the lease keeps it alive, and
when the lease dies etcd deletes it.  Claiming is a transaction guarded by
``create_revision == 0``; releasing deletes the key only while it is still
attached to our lease, and "already gone" counts as released ([BUG 17]).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred


class LeaseLocks:
    def __init__(self, client):
        self._client = client

    @property
    def endpoint(self):
        """The etcd endpoint calls go to now (named in errors that have no text of their own)."""
        return getattr(self._client, "endpoint", None)

    def acquire(self, key: str, owner: str, lease: int) -> Deferred:
        """Fires True if we created the lock on ``lease``, False if it exists."""
        return self._client.put_if_absent(key.encode(), owner.encode(), lease)

    def contest(self, key: str, owner: str, lease: int) -> Deferred:
        """Fires (True, our lock's KeyValue or None) if we created the lock on ``lease``, else (False,
        the lock's KeyValue or None).  Ours carries its create revision: pass it to ``release``."""
        return self._client.create_or_get(key.encode(), owner.encode(), lease)

    def release(self, key: str, lease: int, created: int = 0) -> Deferred:
        """Delete the lock if it is still on ``lease`` and, given ``created`` (its create revision),
        still the one we took then.

        Fires True if we deleted it, False if it was already gone or no
        longer ours: both mean it is released.  The create revision matters
        because a delete may be applied long after it was sent (its call was
        cancelled with its connection, it is tried again, the first one still
        reaches etcd): by then we may have taken the lock again on the same
        lease, and a delete guarded by the lease alone would remove that new
        lock behind our back (etcd's own mutex compares the create revision).
        """
        return self._client.delete_if_lease(key.encode(), lease, created)

    def read(self, key: str) -> Deferred:
        """Fires with the lock's KeyValue (``.value`` owner, ``.lease``), or None."""
        return self._client.get(key.encode())

    def read_prefix(self, prefix: str) -> Deferred:
        """Fires with (revision, [KeyValue]) of every key under ``prefix``: many locks, one read."""
        return self._client.get_prefix(prefix.encode())

    def announce(self, key: str, value: str, lease: int) -> Deferred:
        """Write a presence key on ``lease`` (it vanishes with the lease); fires with its revision."""
        return self._client.put(key.encode(), value.encode(), lease)

    def withdraw(self, key: str, lease: int) -> Deferred:
        """Delete a presence key if it is still on ``lease``; True if we deleted it."""
        return self._client.delete_if_lease(key.encode(), lease)

    def put_while_held(self, lock: str, lease: int, key: str, value: str) -> Deferred:
        """Write ``key`` only while ``lock`` is still ours (on ``lease``); fires
        with the revision of the write, 0 if not written."""
        return self._client.put_if_lease(lock.encode(), lease, key.encode(), value.encode())
