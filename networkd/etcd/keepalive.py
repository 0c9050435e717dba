"""Lease keep-alives on one long-lived stream per connection.

aetcd's ``refresh_lease`` opens a new LeaseKeepAlive stream for every
request: a new HTTP/2 stream, its call objects, a task consuming the
request iterator and grpc's callbacks into the event loop.  At one
keep-alive every TTL/6 (now 2/9 of it) that was the largest part of what a daemon at rest
spends (py-spy, 1,000 VIP configs: ~40 % of its samples).  etcd's own
client keeps one stream open and writes each request on it
(clientv3 ``lease.go``, ``sendKeepAliveLoop``); so do we.

One request at a time: the session sends the next keep-alive only after the
previous one was answered or given up.  A request given up (a timeout, a
cancellation, an error) closes the stream, since its late reply would be
read as the answer to the next request; the next keep-alive opens a new
one.  A new connection (fail-over, a dropped channel) gets a new stream.
"""

from __future__ import annotations

import asyncio

import grpc
from aetcd import exceptions as aetcd_errors
from aetcd import rpc


class StreamEnded(ConnectionError):
    """etcd closed the keep-alive stream without an error status."""


class KeepAliveStream:
    """``refresh(client, lease)``: the LeaseKeepAliveResponse, on a stream reused across calls.

    A stream answers in order, so a reply is the answer to our request only if
    no other request is outstanding on it.  A refresh that finds the stream
    busy (the previous one given up by its caller but not yet unwound: a
    cancellation is delivered a loop turn later) takes a new stream; the old
    one is cancelled, and its late reply can answer nobody.  This matters for
    safety: the session dates the lease from the send time of the request it
    believes answered."""

    def __init__(self):
        self._client = None
        self._call = None
        self._busy = False  # a request is outstanding on ``_call``
        self.opened = 0  # streams opened so far (tests, diagnostics)

    async def refresh(self, client, lease: int):
        await client.connect()  # at once when connected: the stubs exist from then on
        call = self._call
        if call is None or call.done() or self._client is not client or self._busy:
            call = self._stream(client)  # (ended since: etcd restarted, a fail-over, a request given up)
        self._busy = True
        try:
            await call.write(rpc.LeaseKeepAliveRequest(ID=lease))
            reply = await call.read()
        except rpc.AioRpcError as e:
            self._drop(call)
            aetcd_errors._handle_exception(e)  # aetcd's errors, as for every other call
            raise
        except asyncio.InvalidStateError as e:  # it ended between our check and the write
            self._drop(call)
            raise StreamEnded(f"etcd ended the lease keep-alive stream ({e})") from e
        except BaseException:
            self._drop(call)
            raise
        if reply is grpc.aio.EOF:
            self._drop(call)
            raise StreamEnded("etcd ended the lease keep-alive stream")
        if getattr(reply, "ID", lease) != lease:
            # etcd answers each request with its lease's ID: another one means the reply is not ours to
            # date the lease from (the session would fence on the wrong deadline).  Not to be trusted.
            self._drop(call)
            raise StreamEnded(f"etcd answered a keep-alive of lease {lease:x} for lease {reply.ID:x}")
        if call is self._call:
            self._busy = False
        return reply

    def _stream(self, client):
        self.close()
        self._client = client
        self._call = client.leasestub.LeaseKeepAlive(metadata=client.metadata)
        self.opened += 1
        return self._call

    def _drop(self, call) -> None:
        """Close ``call`` after a failure; the stream in use stays if it is another one."""
        if call is self._call:
            self.close()
        elif not call.done():
            call.cancel()

    def close(self) -> None:
        call, self._call, self._client, self._busy = self._call, None, None, False
        if call is not None and not call.done():
            call.cancel()
