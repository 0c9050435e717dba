"""Active probes of this node's containers (issue 11, item 2).

deployd learns of a dead process late and never of a hung one, so the node
asks its own container: by default a TCP connect to ``container_ip:dest``
for each TCP port of the VIP config (UDP-only configs rely on deployd's
state), or what the config's ``"health"`` object says (``tcp``, ``http``,
``none``).  A target is up after ``rise`` successes in a row and down after
``fall`` failures in a row; until then it is undecided (None).

Everything runs on the reactor, never a blocking call: a TCP check is a
non-blocking ``connect`` the reactor watches (``_Connect``), an HTTP check
``connectTCP`` with a timeout.  Each target is probed every ``interval`` at a phase of its
own (a hash of the target), so a thousand targets do not start together;
a probe still running when its next turn comes is not doubled.
"""

from __future__ import annotations

import errno
import os
import socket
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable

from twisted.internet import defer
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger

from networkd.vips.model import Container, VipConfig

log = Logger()

MAX_STATUS_LINE = 1024


@dataclass(frozen=True, order=True)
class Target:
    kind: str  # "tcp" | "http"
    ip: str
    port: int
    path: str = "/"
    expect: int = 200

    def __str__(self) -> str:
        return f"{self.kind}://{self.ip}:{self.port}{self.path if self.kind == 'http' else ''}"


def targets_of(config: VipConfig, container: Container) -> tuple[Target, ...]:
    """What to probe for ``config`` on ``container`` (empty: nothing to probe, deployd's state alone)."""
    health, ip = config.health, container.container_ip
    if health is None:
        return tuple(sorted({Target("tcp", ip, p.dest) for p in config.ports if p.proto == "tcp"}))
    if health.type == "tcp":
        return (Target("tcp", ip, health.port),)
    if health.type == "http":
        return (Target("http", ip, health.port, health.path, health.expect),)
    return ()


class ProbeFailed(Exception):
    pass


class _Probe(Protocol):
    def connectionMade(self):
        target = self.factory.target
        if target.kind == "tcp":
            self.factory.finish(None)
            self.transport.loseConnection()
            return
        self._buffer = b""
        self.transport.write(f"GET {target.path} HTTP/1.0\r\nHost: {target.ip}:{target.port}\r\n"
                             "User-Agent: networkd-probe\r\nConnection: close\r\n\r\n".encode())

    def dataReceived(self, data: bytes):
        self._buffer += data
        line, found, _ = self._buffer.partition(b"\r\n")
        if not found and len(self._buffer) < MAX_STATUS_LINE:
            return
        parts = line.split(None, 2)
        expect = self.factory.target.expect
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            self.factory.finish(ProbeFailed(f"not an HTTP answer: {line[:60]!r}"))
        elif int(parts[1]) != expect:
            self.factory.finish(ProbeFailed(f"HTTP {int(parts[1])}, expected {expect}"))
        else:
            self.factory.finish(None)
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self.factory.finish(ProbeFailed("closed before an HTTP status line"))


class _ProbeFactory(ClientFactory):
    protocol = _Probe
    noisy = False  # no "Starting factory" line per probe

    def __init__(self, target: Target, done: defer.Deferred):
        self.target, self._done = target, done

    def finish(self, error: Exception | None) -> None:
        if self._done.called:
            return
        if error is None:
            self._done.callback(None)
        else:
            self._done.errback(error)

    def clientConnectionFailed(self, connector, reason):
        self.finish(ProbeFailed(_describe(reason.value)))


def _describe(error: BaseException) -> str:
    text = {"ConnectionRefusedError": "connection refused", "TCPTimedOutError": "connect timed out",
            "TimeoutError": "connect timed out", "NoRouteError": "no route to host"}.get(type(error).__name__)
    return text or (str(error).strip() or type(error).__name__)


class _Connect:
    """A TCP connect probe without a transport: a non-blocking ``connect`` the reactor watches for
    writability (connected or failed), then ``SO_ERROR`` and close.  About a third of the CPU of
    ``connectTCP`` per probe, which matters with a thousand targets a second."""

    def __init__(self, reactor, target: Target, done: defer.Deferred):
        self._reactor, self._done = reactor, done
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        error = self._sock.connect_ex((target.ip, target.port))
        if error == errno.EINPROGRESS:
            self._watched = True
            reactor.addWriter(self)
        else:
            self._watched = False
            self._finish(error)

    def fileno(self) -> int:
        return self._sock.fileno() if self._sock is not None else -1

    def logPrefix(self) -> str:
        return "probe"

    def doWrite(self):
        self._finish(self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))

    def connectionLost(self, reason):
        self._finish(errno.ECONNABORTED)

    def cancel(self) -> None:
        self._finish(errno.ETIMEDOUT)

    def _finish(self, error: int) -> None:
        if self._sock is None:
            return
        if self._watched:
            self._reactor.removeWriter(self)
            self._watched = False
        self._sock.close()
        self._sock = None
        if self._done.called:
            return
        if error == 0:
            self._done.callback(None)
        else:
            text = {errno.ECONNREFUSED: "connection refused", errno.ETIMEDOUT: "connect timed out",
                    errno.EHOSTUNREACH: "no route to host", errno.ENETUNREACH: "network unreachable"}
            self._done.errback(ProbeFailed(text.get(error) or os.strerror(error)))


def probe_once(reactor, target: Target, timeout: float) -> defer.Deferred:
    """Fires None when ``target`` answers, fails with ProbeFailed(why) when not; never blocks."""
    if target.kind == "tcp":
        probe = None
        done = defer.Deferred(lambda _: probe is not None and probe.cancel())
        probe = _Connect(reactor, target, done)
        return done
    connector = None

    def cancel(_):
        if connector is not None:
            connector.disconnect()

    done = defer.Deferred(cancel)
    connector = reactor.connectTCP(target.ip, target.port, _ProbeFactory(target, done), timeout=timeout)
    return done


@dataclass
class TargetState:
    up: bool | None = None  # None: neither rise successes nor fall failures yet
    successes: int = 0  # in a row
    failures: int = 0  # in a row
    last_error: str | None = None
    since: float | None = None  # when ``up`` last changed
    probes: int = 0
    slot: int = 0  # its phase: which of the SLOTS of the interval it is probed in
    started: float = 0.0
    running: defer.Deferred | None = None


SLOTS = 20  # phases per interval: one timer for all targets, not one (and one more for a timeout) per probe


class Prober:
    """Keeps the tracked targets probed; ``changed()`` is called when one goes up or down.

    One timer walks the interval in SLOTS steps while there is a target; each
    target is probed in the step of its phase, and a probe still running
    ``timeout`` after its start is cancelled at the next step (so a timeout is
    up to interval/SLOTS late).
    """

    def __init__(self, reactor, *, interval: float = 1.0, timeout: float = 1.0, rise: int = 2, fall: int = 3,
                 changed: Callable[[], None] = lambda: None, probe: Callable | None = None):
        self._reactor, self.interval, self.timeout, self.rise, self.fall = reactor, interval, timeout, rise, fall
        self._changed = changed
        self._probe = probe or (lambda target: probe_once(reactor, target, timeout))
        self.states: dict[Target, TargetState] = {}
        self.results = {"success": 0, "failure": 0}  # probes run, for /metrics
        self._slots: list[set[Target]] = [set() for _ in range(SLOTS)]
        self._running: dict[Target, TargetState] = {}
        self._cursor = 0  # the slot the timer runs next
        self._call = None

    def track(self, targets: Iterable[Target]) -> None:
        """Probe exactly ``targets`` from now on (new ones start undecided, gone ones are forgotten)."""
        wanted = set(targets)
        for target in set(self.states) - wanted:
            state = self.states.pop(target)
            self._slots[state.slot].discard(target)
            self._forget(target, state)
        added = wanted - set(self.states)
        for target in added:
            state = self.states[target] = TargetState(slot=zlib.crc32(str(target).encode()) % SLOTS)
            self._slots[state.slot].add(target)
        if self.states and self._call is None:
            self._call = self._reactor.callLater(self.interval / SLOTS, self._step)
        elif not self.states:
            self._cancel_timer()

    def up(self, target: Target) -> bool | None:
        state = self.states.get(target)
        return None if state is None else state.up

    def stop(self) -> None:
        states, self.states = self.states, {}
        self._slots = [set() for _ in range(SLOTS)]
        self._cancel_timer()
        for target, state in states.items():
            self._forget(target, state)

    def _cancel_timer(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _forget(self, target: Target, state: TargetState) -> None:
        self._running.pop(target, None)
        if state.running is not None:
            running, state.running = state.running, None
            running.cancel()

    def _step(self) -> None:
        self._call = None
        now = self._reactor.seconds()
        expired = []
        for state in self._running.values():  # in the order they started: stop at the first still in time
            if now - state.started < self.timeout - 1e-9:
                break
            expired.append(state)
        for state in expired:
            if state.running is not None:
                state.running.cancel()  # fails it: a timeout
        slot, self._cursor = self._slots[self._cursor], (self._cursor + 1) % SLOTS
        for target in list(slot):
            state = self.states[target]
            if state.running is None:  # the previous probe has not finished: no second one beside it
                self._start(target, state, now)
        if self.states:
            self._call = self._reactor.callLater(self.interval / SLOTS, self._step)

    def _start(self, target: Target, state: TargetState, now: float) -> None:
        try:
            running = self._probe(target)
        except Exception as e:  # a probe that cannot even start counts as failed
            running = defer.fail(ProbeFailed(_describe(e)))
        state.started, state.running = now, running
        self._running[target] = state
        running.addCallbacks(lambda _: self._result(target, state, None),
                             lambda f: self._result(target, state, f.value))

    def _result(self, target: Target, state: TargetState, error: BaseException | None) -> None:
        if self.states.get(target) is not state:
            return None  # forgotten (or cancelled) meanwhile
        self._running.pop(target, None)
        state.running = None
        state.probes += 1
        self.results["success" if error is None else "failure"] += 1
        if error is None:
            state.successes, state.failures = state.successes + 1, 0
            turn = state.up is not True and state.successes >= self.rise
        else:
            if isinstance(error, defer.CancelledError) or str(error) == "connect timed out":
                error = ProbeFailed(f"no answer within {self.timeout:g}s")
            state.last_error = str(error) or type(error).__name__
            state.successes, state.failures = 0, state.failures + 1
            turn = state.up is not False and state.failures >= self.fall
        if turn:
            state.up, state.since = error is None, self._reactor.seconds()
            log.info("probe {target}: {state}{why}", target=str(target), state="up" if state.up else "down",
                     why="" if state.up else f" ({state.last_error})")
            self._changed()
        return None
