"""The one place that reaches past the reactor to its asyncio loop
(networkd.dns.eventloop): it must still find the loop in this Twisted, and
fall back to addReader under any other reactor."""

from __future__ import annotations

import asyncio
import socket

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.testing import MemoryReactor

from networkd.dns.eventloop import ReadRegistration, asyncio_loop
from tests.support.waiting import eventually, sleep


class Reader:
    """An IReadDescriptor over one end of a socket pair, counting reads."""

    def __init__(self, sock: socket.socket, fail_first: bool = False):
        self.sock = sock
        self.reads = []
        self.fail_first = fail_first

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        self.reads.append(self.sock.recv(100))
        if self.fail_first and len(self.reads) == 1:
            raise RuntimeError("first read fails")

    def connectionLost(self, reason) -> None:
        pass

    def logPrefix(self) -> str:
        return "test"


def test_the_asyncio_loop_is_found_under_twisteds_asyncio_reactor():
    """If a Twisted release renames the private attribute, this fails (the
    UDP listener would quietly fall back to the slower addReader)."""
    loop = asyncio_loop(reactor)
    assert isinstance(loop, asyncio.AbstractEventLoop)
    assert loop.is_running() or loop is asyncio.get_event_loop()


def test_no_loop_under_another_reactor_and_addreader_is_used():
    other = MemoryReactor()
    assert asyncio_loop(other) is None
    a, b = socket.socketpair()
    try:
        reader = Reader(a)
        registration = ReadRegistration(other, reader, "test")
        registration.start()
        registration.start()  # idempotent
        assert other.getReaders() == [reader] and registration.active
        registration.stop()
        registration.stop()
        assert other.getReaders() == [] and not registration.active
    finally:
        a.close()
        b.close()


@pytest_twisted.ensureDeferred
async def test_reads_come_from_the_asyncio_loop_and_survive_an_exception():
    a, b = socket.socketpair()
    a.setblocking(False)
    reader = Reader(a, fail_first=True)
    registration = ReadRegistration(reactor, reader, "test")
    try:
        registration.start()
        assert reader not in reactor.getReaders(), "not through the reactor's addReader"
        b.send(b"one")
        await eventually(lambda: reader.reads == [b"one"], message="first read")
        b.send(b"two")  # the first read raised: logged, and reading goes on
        await eventually(lambda: reader.reads == [b"one", b"two"], message="second read")
        registration.stop()
        b.send(b"three")
        await sleep(0.1)
        assert reader.reads == [b"one", b"two"], "no reads once stopped"
        registration.start()
        await eventually(lambda: reader.reads == [b"one", b"two", b"three"], message="started again")
    finally:
        registration.stop()
        a.close()
        b.close()
