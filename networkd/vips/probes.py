"""Active probes of this node's containers (issue 11, item 2).

deployd learns of a dead process late and never of a hung one, so the node
asks its own container: by default a TCP connect to ``container_ip:dest``
for each TCP port of the VIP config (UDP-only configs rely on deployd's
state), or what the config's ``"health"`` object says (``tcp``, ``http``,
``none``).  A target is up after ``rise`` successes in a row and down after
``fall`` failures in a row; until then it is undecided (None).

Everything runs on the reactor, never a blocking call.  A TCP check is a
non-blocking ``connect``; the connects still in flight sit in one epoll set
that the reactor watches as a single descriptor (networkd.vips.tcpcheck), and
the result goes straight to the target's counters: no Deferred, protocol or
reactor registration per probe, so a thousand checks a second cost little.
An HTTP check is ``connectTCP`` with a timeout.  Each target is probed every
``interval`` at a phase of its own (a hash of the target), so a thousand
targets do not start together; a probe still running when its next turn
comes is not doubled.  Targets are a set: VIPs served by the same container
port share one probe.
"""

from __future__ import annotations

import errno
import math
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable

from twisted.internet import defer
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger

from networkd.vips.model import Container, VipConfig
from networkd.vips.tcpcheck import ERRORS, Connects

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
    """One TCP connect probe as a Deferred (``probe_once``): the same check, outside a Prober."""

    def __init__(self, reactor, target: Target, done: defer.Deferred):
        self._done = done
        self._connects = Connects(reactor, self._finish)
        self._fd = self._connects.start(None, target.ip, target.port)

    def cancel(self) -> None:
        if self._fd is not None:
            self._connects.cancel(self._fd, ERRORS[errno.ETIMEDOUT])

    def _finish(self, _, error: str | None) -> None:
        self._fd = None
        self._connects.close()  # its only connect is done: off the reactor
        if not self._done.called:
            if error is None:
                self._done.callback(None)
            else:
                self._done.errback(ProbeFailed(error))


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
    running: defer.Deferred | int | None = None  # a probe in flight: a Deferred, or a connect's handle
    tracked: bool = True  # False once forgotten: a late answer is ignored


SLOTS = 20  # phases per interval at most: one timer for all targets, not one (and one more for a timeout) per probe
PER_SLOT = 32  # targets a phase takes before another phase is used: a few targets share one wake-up (~2 ms at most)
_TIMEOUT = object()


class Prober:
    """Keeps the tracked targets probed; ``changed()`` is called when one goes up or down.

    One timer walks the interval in SLOTS steps while there is a target (over
    empty slots in one go); each target is probed in the step of its phase.
    Targets use as few phases as PER_SLOT allows (ten targets: one phase, so
    one wake-up an interval and their answers read together, not ten of
    each); a thousand spread over all SLOTS, so none bursts.  A
    probe still running ``timeout`` after its start is cancelled at the next
    step (so a timeout is up to interval/SLOTS late).  TCP checks go through
    ``Connects`` (unless ``probe`` replaces every check, as tests do); HTTP
    checks are Deferreds.
    """

    def __init__(self, reactor, *, interval: float = 1.0, timeout: float = 1.0, rise: int = 2, fall: int = 3,
                 changed: Callable[[], None] = lambda: None, probe: Callable | None = None):
        self._reactor, self.interval, self.timeout, self.rise, self.fall = reactor, interval, timeout, rise, fall
        self._changed = changed
        self._probe = probe or (lambda target: probe_once(reactor, target, timeout))
        self._connects = None if probe is not None else Connects(reactor, self._connected)
        self.states: dict[Target, TargetState] = {}
        self.results = {"success": 0, "failure": 0}  # probes run, for /metrics
        self._slots: list[dict[Target, TargetState]] = [{} for _ in range(SLOTS)]
        self._phases = 0  # how many of the slots are in use (by the number of targets)
        self._running: dict[int, TargetState] = {}  # id(state) -> state, in the order the probes started
        self._cursor = 0  # the slot the timer runs next
        self._call = None

    def track(self, targets: Iterable[Target]) -> None:
        """Probe exactly ``targets`` from now on (new ones start undecided, gone ones are forgotten)."""
        wanted = set(targets)
        for target in set(self.states) - wanted:
            state = self.states.pop(target)
            self._slots[state.slot].pop(target, None)
            self._forget(target, state)
        added = wanted - set(self.states)
        for target in added:
            self.states[target] = TargetState()
        phases = min(SLOTS, max(1, math.ceil(len(self.states) / PER_SLOT)))
        if phases != self._phases:  # as few phases as the targets need, each one wake-up an interval
            self._phases = phases
            self._slots = [{} for _ in range(SLOTS)]
            added = self.states
        for target in added:
            state = self.states[target]
            state.slot = zlib.crc32(str(target).encode()) % phases
            self._slots[state.slot][target] = state
        if self.states and self._call is None:
            self._call = self._reactor.callLater(self.interval / SLOTS, self._step)
        elif not self.states:
            self._cancel_timer()
            if self._connects is not None:
                self._connects.close()

    def up(self, target: Target) -> bool | None:
        state = self.states.get(target)
        return None if state is None else state.up

    def stop(self) -> None:
        states, self.states = self.states, {}
        self._slots = [{} for _ in range(SLOTS)]
        self._phases = 0
        self._cancel_timer()
        for target, state in states.items():
            self._forget(target, state)
        if self._connects is not None:
            self._connects.close()

    def _cancel_timer(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _forget(self, target: Target, state: TargetState) -> None:
        state.tracked = False
        self._running.pop(id(state), None)
        if state.running is not None:
            running, state.running = state.running, None
            if isinstance(running, defer.Deferred):
                running.cancel()
            else:
                self._connects.cancel(running, None)  # reported, and ignored: no longer in self.states

    def _step(self) -> None:
        self._call = None
        now = self._reactor.seconds()
        expired = []
        for state in self._running.values():  # in the order they started: stop at the first still in time
            if now - state.started < self.timeout - 1e-9:
                break
            expired.append(state)
        for state in expired:
            running = state.running
            if isinstance(running, defer.Deferred):
                running.cancel()  # fails it: a timeout
            elif running is not None:
                self._connects.cancel(running, _TIMEOUT)
        slot, self._cursor = self._slots[self._cursor], (self._cursor + 1) % SLOTS
        for target, state in list(slot.items()):
            if state.running is None:  # the previous probe has not finished: no second one beside it
                self._start(target, state, now)
        if self._connects is not None and self._running:
            self._connects.collect()  # the answers already in, in this turn rather than one more wake-up
        if self.states:
            self._schedule(now)

    def _schedule(self, now: float) -> None:
        """The next step: skip empty slots (a few targets need not wake the reactor SLOTS times per
        interval), but not past the step at which the oldest probe in flight times out."""
        step = self.interval / SLOTS
        limit = next(iter(self._running.values())).started + self.timeout if self._running else math.inf
        ahead = 1  # the step ``ahead`` steps from now runs slot ``_cursor``
        while ahead < SLOTS and not self._slots[self._cursor] and now + ahead * step < limit - 1e-9:
            self._cursor = (self._cursor + 1) % SLOTS
            ahead += 1
        self._call = self._reactor.callLater(ahead * step, self._step)

    def _start(self, target: Target, state: TargetState, now: float) -> None:
        state.started = now
        if self._connects is not None and target.kind == "tcp":
            self._running[id(state)] = state
            try:
                handle = self._connects.start((target, state), target.ip, target.port)
            except Exception as e:  # a probe that cannot even start (EMFILE...) counts as failed
                self._connected((target, state), _describe(e))
                return
            if handle is not None:  # else the answer was known at once, and is already counted
                state.running = handle
            return
        try:
            running = self._probe(target)
        except Exception as e:  # a probe that cannot even start counts as failed
            running = defer.fail(ProbeFailed(_describe(e)))
        state.started, state.running = now, running
        self._running[id(state)] = state
        running.addCallbacks(lambda _: self._result(target, state, None), lambda f: self._failed(target, state, f))

    def _connected(self, key, error) -> None:
        target, state = key
        self._result(target, state, f"no answer within {self.timeout:g}s" if error is _TIMEOUT else error)

    def _failed(self, target: Target, state: TargetState, failure) -> None:
        error = failure.value
        if isinstance(error, defer.CancelledError) or str(error) == "connect timed out":
            text = f"no answer within {self.timeout:g}s"
        else:
            text = str(error) or type(error).__name__
        self._result(target, state, text)

    def _result(self, target: Target, state: TargetState, error: str | None) -> None:
        if not state.tracked:
            return None  # forgotten (or cancelled) meanwhile
        self._running.pop(id(state), None)
        state.running = None
        state.probes += 1
        if error is None:
            self.results["success"] += 1
            state.successes, state.failures = state.successes + 1, 0
            turn = state.up is not True and state.successes >= self.rise
        else:
            self.results["failure"] += 1
            if error == "connect timed out":
                error = f"no answer within {self.timeout:g}s"
            state.last_error = error
            state.successes, state.failures = 0, state.failures + 1
            turn = state.up is not False and state.failures >= self.fall
        if turn:
            state.up, state.since = error is None, self._reactor.seconds()
            log.info("probe {target}: {state}{why}", target=str(target), state="up" if state.up else "down",
                     why="" if state.up else f" ({state.last_error})")
            self._changed()
        return None
