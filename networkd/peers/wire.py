"""Peer messages on the wire: JSON, signed with HMAC-SHA256 under a shared secret, replay-checked.

A datagram is ``<64 hex digits of HMAC-SHA256 over BODY> <BODY>``, BODY being
the exact JSON bytes.  Every body carries ``type``, ``from`` (the sender's
hostname), ``nonce`` (16 random bytes, hex) and ``ts`` (the sender's wall
clock).  Wall time serves only the replay window: a message more than
``WINDOW`` seconds off, or whose nonce was seen within the window, is
refused.  No deadline is ever computed from it (those use each node's own
monotonic clock: networkd.peers.failsafe).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Callable

WINDOW = 30.0  # seconds a message may be off our wall clock; nonces are remembered this long
MAX_DATAGRAM = 8192
MAC_HEX = 64


class Refused(Exception):
    """A message we must not act on; the text says why (logged with its source)."""


def read_secret(path: str) -> bytes:
    """The shared secret from ``--peer-secret-file``: must exist and not be empty."""
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise ValueError(f"--peer-secret-file: cannot read {path!r}: {e.strerror}") from None
    if not secret:
        raise ValueError(f"--peer-secret-file: {path!r} is empty")
    return secret


class Wire:
    """Signs what we send; verifies what we receive (MAC, then time window, then nonce)."""

    def __init__(self, secret: bytes, hostname: str, wall: Callable[[], float],
                 random: Callable[[int], bytes] = os.urandom):
        self._secret, self.hostname, self._wall, self._random = secret, hostname, wall, random
        self._seen: dict[str, float] = {}  # nonce -> its timestamp, while inside the window

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._secret, body, hashlib.sha256).hexdigest().encode()

    def encode(self, kind: str, **fields) -> tuple[bytes, str]:
        """(datagram, its nonce)."""
        nonce = self._random(16).hex()
        body = json.dumps({"type": kind, "from": self.hostname, "nonce": nonce, "ts": self._wall(), **fields},
                          separators=(",", ":"), sort_keys=True).encode()
        return self._mac(body) + b" " + body, nonce

    def decode(self, data: bytes) -> dict:
        """The message, or Refused(why)."""
        if len(data) > MAX_DATAGRAM:
            raise Refused(f"datagram of {len(data)} bytes is too big")
        mac, sep, body = data.partition(b" ")
        if not sep or len(mac) != MAC_HEX:
            raise Refused("unsigned message (no MAC)")
        if not hmac.compare_digest(mac, self._mac(body)):
            raise Refused("bad MAC (wrong secret, or altered)")
        try:
            message = json.loads(body)
        except ValueError:
            raise Refused("signed, but not JSON") from None
        if not isinstance(message, dict):
            raise Refused("signed, but not a JSON object")
        nonce, ts = message.get("nonce"), message.get("ts")
        if not isinstance(nonce, str) or not isinstance(ts, (int, float)) or not isinstance(message.get("from"), str):
            raise Refused("no nonce, timestamp or sender")
        now = self._wall()
        if abs(now - ts) > WINDOW:
            off = f"{now - ts:.1f}s old" if now > ts else f"{ts - now:.1f}s ahead of our clock"
            raise Refused(f"timestamp {off}, outside the replay window of {WINDOW:g}s")
        self._forget(now)
        if nonce in self._seen:
            raise Refused(f"replayed nonce {nonce[:8]}…")
        self._seen[nonce] = ts
        return message

    def _forget(self, now: float) -> None:
        if len(self._seen) > 64:
            self._seen = {n: ts for n, ts in self._seen.items() if abs(now - ts) <= WINDOW}
