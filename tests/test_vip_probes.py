"""Active probes of the local container (issue 11 item 2): rise/fall on a fake clock, the probe on real sockets."""

from __future__ import annotations

import json
import socket

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol

from networkd.vips.model import Container, HealthCheck, InvalidValue, parse_vip
from networkd.vips.probes import ProbeFailed, Prober, Target, probe_once, targets_of
from networkd.vips.tcpcheck import Connects

C = Container("hello", "web", 1, "n1", "10.9.0.1", "172.20.0.5")


def vip(**fields) -> str:
    return json.dumps({"app": "hello", "proc": "web", "ports": [{"src": "80", "dest": "8080"}], **fields})


# -- what is probed ---------------------------------------------------------------


def test_default_is_a_tcp_connect_to_each_tcp_dest_and_udp_only_is_not_probed():
    config = parse_vip("10.0.0.5", vip(ports=[{"src": 80, "dest": 8080}, {"src": 443, "dest": 8443},
                                              {"src": 53, "proto": "udp"}, {"src": 81, "dest": 8080}]))
    assert targets_of(config, C) == (Target("tcp", "172.20.0.5", 8080), Target("tcp", "172.20.0.5", 8443))
    udp = parse_vip("10.0.0.5", vip(ports=[{"src": 53, "proto": "udp"}]))
    assert targets_of(udp, C) == ()


def test_health_object_overrides():
    assert parse_vip("10.0.0.5", vip(health={"type": "tcp", "port": 9000})).health == HealthCheck("tcp", 9000)
    http = parse_vip("10.0.0.5", vip(health={"type": "http", "port": "9001", "path": "/healthz", "expect": 204}))
    assert targets_of(http, C) == (Target("http", "172.20.0.5", 9001, "/healthz", 204),)
    assert parse_vip("10.0.0.5", vip(health={"type": "http", "port": 9001})).health == HealthCheck("http", 9001)
    assert targets_of(parse_vip("10.0.0.5", vip(health={"type": "none"})), C) == ()
    assert parse_vip("10.0.0.5", vip(health=None)).health is None


@pytest.mark.parametrize("health, error", [
    ("tcp", "health must be an object"),
    ({"type": "icmp"}, "health.type 'icmp' is not tcp, http or none"),
    ({"port": 80}, "health.type None is not tcp, http or none"),
    ({"type": "tcp"}, "health.port is missing"),
    ({"type": "tcp", "port": 0}, "health.port 0 is not a port"),
    ({"type": "http", "port": 80, "path": "healthz"}, "health.path 'healthz' is not an absolute path"),
    ({"type": "http", "port": 80, "expect": "200"}, "health.expect '200' is not an HTTP status code"),
    ({"type": "http", "port": 80, "expect": 42}, "health.expect 42 is not an HTTP status code"),
    ({"type": "tcp", "port": 80, "path": "/"}, "health: 'path' is not a field of a tcp check"),
    ({"type": "none", "port": 80}, "health: 'port' is not a field of a none check"),
])
def test_bad_health_object_is_an_invalid_key_saying_why(health, error):
    with pytest.raises(InvalidValue, match=error.replace("[", r"\[")):
        parse_vip("10.0.0.5", vip(health=health))


# -- rise and fall on a fake clock -------------------------------------------------


class Scripted:
    """A probe whose answers the test decides: True (up), False (refused) or None (never answers)."""

    def __init__(self, clock):
        self.clock, self.answer, self.calls, self.pending = clock, True, [], []

    def __call__(self, target):
        self.calls.append((self.clock.seconds(), target))
        if self.answer is True:
            return defer.succeed(None)
        if self.answer is False:
            return defer.fail(ProbeFailed("connection refused"))
        d = defer.Deferred()
        self.pending.append(d)
        return d


def prober(**kw):
    clock = task.Clock()
    script = Scripted(clock)
    changes = []
    p = Prober(clock, interval=1.0, timeout=0.5, rise=2, fall=3, changed=lambda: changes.append(clock.seconds()),
               probe=script, **kw)
    return clock, script, p, changes


T = Target("tcp", "172.20.0.5", 8080)


def second(clock) -> None:
    clock.pump([0.05] * 20)


def test_up_after_rise_successes_down_after_fall_failures():
    clock, script, p, changes = prober()
    p.track([T])
    assert p.up(T) is None
    second(clock)  # the first probe at its phase (< interval), then every second
    assert p.up(T) is None and p.states[T].successes == 1
    second(clock)
    assert p.up(T) is True and len(changes) == 1
    script.answer = False
    second(clock)
    second(clock)
    assert p.up(T) is True and p.states[T].failures == 2 and p.states[T].last_error == "connection refused"
    second(clock)
    assert p.up(T) is False and len(changes) == 2
    script.answer = True
    second(clock)
    assert p.up(T) is False, "one success is not rise"
    script.answer = False
    second(clock)
    script.answer = True
    second(clock)
    second(clock)
    assert p.up(T) is True and len(changes) == 3, "rise counts successes in a row"
    assert [t for t, _ in script.calls] == sorted(t for t, _ in script.calls)


def test_a_probe_that_never_answers_fails_at_the_timeout_and_is_never_doubled():
    clock, script, p, changes = prober()
    script.answer = None
    p.track([T])
    for _ in range(4):
        second(clock)
    assert p.up(T) is False and p.states[T].last_error == "no answer within 0.5s"
    assert len(script.calls) == 4

    clock2, script2, slow, _ = prober()
    slow.timeout = 5.0  # longer than the interval: the next turn finds it running
    script2.answer = None
    slow.track([T])
    for _ in range(4):
        second(clock2)
    assert len(script2.calls) == 1, "no second probe beside a running one"


def test_targets_are_spread_over_the_interval_and_forgotten_when_untracked():
    clock, script, p, _ = prober()
    targets = [Target("tcp", f"172.20.{i // 250}.{i % 250}", 8080) for i in range(1000)]
    p.track(targets)
    clock.pump([0.01] * 101)
    first = sorted({target: t for t, target in reversed(script.calls)}.values())
    assert len(first) == 1000
    per_tenth = [sum(1 for t in first if k / 10 <= t < (k + 1) / 10) for k in range(10)]
    assert min(per_tenth) > 50, f"no burst: {per_tenth}"
    p.track(targets[:10])
    script.calls.clear()
    second(clock)
    assert len(script.calls) == 10 and len(clock.getDelayedCalls()) == 1, "one timer for all targets"
    p.stop()
    assert not clock.getDelayedCalls()


# -- the probe itself, on real sockets -----------------------------------------------


class Answer(Protocol):
    def __init__(self, reply: bytes | None):
        self.reply = reply

    def dataReceived(self, data):
        if self.reply is not None and b"\r\n\r\n" in data:
            self.transport.write(self.reply)
            self.transport.loseConnection()


def listen(host: str, reply: bytes | None = None):
    return reactor.listenTCP(0, Factory.forProtocol(lambda: Answer(reply)), interface=host)


def closed_port(host: str) -> int:
    s = socket.socket()
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def outcome(target: Target, timeout: float = 1.0) -> str | None:
    try:
        await probe_once(reactor, target, timeout).addTimeout(timeout, reactor)
    except ProbeFailed as e:
        return str(e)
    except defer.TimeoutError:
        return "timeout"
    return None


@pytest_twisted.ensureDeferred
async def test_tcp_and_http_probes_on_real_sockets():
    host = "127.0.0.7"
    ok = listen(host, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    bad = listen(host, b"HTTP/1.0 503 Service Unavailable\r\n\r\n")
    silent = listen(host)
    garbage = listen(host, b"SSH-2.0-OpenSSH\r\n")
    try:
        assert await outcome(Target("tcp", host, ok.getHost().port)) is None
        assert await outcome(Target("tcp", host, closed_port(host))) == "connection refused"
        assert await outcome(Target("http", host, ok.getHost().port, "/healthz", 200)) is None
        assert await outcome(Target("http", host, bad.getHost().port, "/healthz", 200)) == "HTTP 503, expected 200"
        assert await outcome(Target("http", host, bad.getHost().port, "/", 503)) is None
        assert await outcome(Target("http", host, silent.getHost().port), 0.3) == "timeout"
        assert (await outcome(Target("http", host, garbage.getHost().port))).startswith("not an HTTP answer")
    finally:
        for port in (ok, bad, silent, garbage):
            await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_prober_on_the_reactor_sees_a_listener_stop():
    host = "127.0.0.8"
    port = listen(host)
    target = Target("tcp", host, port.getHost().port)
    changes = []
    p = Prober(reactor, interval=0.05, timeout=0.5, rise=2, fall=3, changed=lambda: changes.append(p.up(target)))
    try:
        p.track([target])
        from tests.support.waiting import eventually

        await eventually(lambda: p.up(target) is True, 2, message="up")
        await port.stopListening()
        await eventually(lambda: p.up(target) is False, 2, message="down")
        assert changes == [True, False] and p.states[target].last_error == "connection refused"
    finally:
        p.stop()
        if port.connected:
            await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_connects_in_flight_are_one_reader_for_the_reactor_and_each_verdict_is_right(monkeypatch):
    """Listening, closed and silent (accept queue full: the SYN is dropped) targets, probed together:
    the connects in flight share one epoll descriptor the reactor reads, none is a reactor writer
    of its own, and each target gets its verdict."""
    from tests.support.waiting import eventually

    host = "127.0.0.9"
    sockets = []

    def listener(backlog):
        """A port of our own; ``backlog`` None: bound, not listening, so it refuses (and stays ours: no
        listener made later takes its number and answers for it)."""
        s = socket.socket()
        s.bind((host, 0))
        if backlog is not None:
            s.listen(backlog)
        sockets.append(s)
        return s.getsockname()[1]

    listening = [Target("tcp", host, listener(128)) for _ in range(30)]
    closed = [Target("tcp", host, listener(None)) for _ in range(30)]
    silent = []
    for _ in range(5):
        port = listener(0)
        for _ in range(2):  # fill its accept queue: further SYNs are dropped
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            filler.connect_ex((host, port))
            sockets.append(filler)
        silent.append(Target("tcp", host, port))
    registered = {"reader": set(), "writer": set()}
    for kind in registered:
        original = getattr(reactor, f"add{kind.title()}")

        def counting(selectable, original=original, kind=kind):
            registered[kind].add(id(selectable))
            return original(selectable)

        monkeypatch.setattr(reactor, f"add{kind.title()}", counting)
    p = Prober(reactor, interval=0.2, timeout=0.3, rise=2, fall=2)
    try:
        p.track(listening + closed + silent)
        await eventually(lambda: all(p.up(t) is not None for t in p.states), 5, message="every verdict")
        assert all(p.up(t) is True for t in listening)
        assert all(p.up(t) is False and p.states[t].last_error == "connection refused" for t in closed)
        assert all(p.up(t) is False and p.states[t].last_error == "no answer within 0.3s" for t in silent)
        assert not registered["writer"] and len(registered["reader"]) == 1, registered
    finally:
        p.stop()
        for s in sockets:
            s.close()


@pytest_twisted.ensureDeferred
async def test_answers_already_in_are_read_in_the_probes_turn_without_waking_the_reactor_again(monkeypatch):
    """A container on this node answers a connect within the syscall: its answer is read right after
    the step's connects, not in a reactor wake-up of its own (one a second more at rest)."""
    from tests.support.waiting import eventually

    host = "127.0.0.10"
    sockets = []
    for _ in range(10):
        s = socket.socket()
        s.bind((host, 0))
        s.listen(128)
        sockets.append(s)
    targets = [Target("tcp", host, s.getsockname()[1]) for s in sockets]
    woken = []
    read = Connects.doRead
    monkeypatch.setattr(Connects, "doRead", lambda self: (woken.append(1), read(self)))
    p = Prober(reactor, interval=0.05, timeout=0.5, rise=2, fall=2)
    try:
        p.track(targets)
        await eventually(lambda: sum(p.states[t].probes for t in targets) >= 100, 5, message="ten rounds")
        assert all(p.up(t) is True for t in targets)
        assert len(woken) <= 1, f"the reactor woke {len(woken)} times for answers of ten rounds"
    finally:
        p.stop()
        for s in sockets:
            s.close()


def test_only_floating_vips_with_a_container_here_are_probed():
    from networkd.keys import Keys
    from networkd.vips.health import ProbeSettings, VipHealth
    from networkd.vips.inputs import VipInputs
    from networkd.vips.wants import HostWants
    from tests.support.vipnodes import pod_group

    class Snapshot:
        def __init__(self, values):
            self.values, self.revision = values, 1

    keys = Keys("/lain")
    inputs = VipInputs(keys)
    inputs.configs_snapshot(Snapshot({
        "10.0.0.5": vip(), "10.0.0.6": vip(proc="db"), "10.0.0.7": vip(health={"type": "none"}),
        "10.0.0.8:80": vip(), "10.0.0.9": vip(ports=[{"src": 53, "proto": "udp"}]),
        "10.0.0.10": vip(health={"type": "http", "port": 9000, "path": "/ok"}),
    }))
    inputs.pods_snapshot(Snapshot({"hello/hello.proc.web": pod_group(
        "hello", "web", [(1, "n1", "10.9.0.1", "172.20.0.5"), (2, "n2", "10.9.0.2", "172.20.0.6")])}))
    class Locks:
        presence_value, refreshed = None, 0

        def refresh_presence(self):
            self.refreshed += 1

    clock = task.Clock()
    health = VipHealth(clock, inputs, HostWants(inputs, "n1", "10.9.0.1"), Locks(), "n1", "10.9.0.1",
                       ProbeSettings(), lambda: None)
    health.sync()
    assert health.targets == {"10.0.0.5": (Target("tcp", "172.20.0.5", 8080),), "10.0.0.7": (), "10.0.0.9": (),
                              "10.0.0.10": (Target("http", "172.20.0.5", 9000, "/ok"),)}
    assert set(health.prober.states) == {Target("tcp", "172.20.0.5", 8080), Target("http", "172.20.0.5", 9000, "/ok")}
    assert [health.local(ip) for ip in ("10.0.0.5", "10.0.0.7", "10.0.0.9")] == [None, True, True]
    health.prober.states[Target("tcp", "172.20.0.5", 8080)].up = False
    health.prober.states[Target("tcp", "172.20.0.5", 8080)].last_error = "connection refused"
    assert health.local("10.0.0.5") is False
    assert health.why("10.0.0.5") == "probe tcp://172.20.0.5:8080: connection refused"
    health.stop()
    assert not clock.getDelayedCalls()
    off = VipHealth(clock, inputs, HostWants(inputs, "n1", "10.9.0.1"), Locks(), "n1", "10.9.0.1", None, lambda: None)
    off.sync()
    assert off.prober is None and off.local("10.0.0.5") is True and not clock.getDelayedCalls()
    assert json.loads(off.presence()) == {"node_ip": "10.9.0.1",
                                          "healthy": ["10.0.0.10", "10.0.0.5", "10.0.0.7", "10.0.0.9"]}


def test_ill_health_hands_over_and_holds_down_for_10s():
    """VipHealth.plan: members values in, our probe verdicts, the hold-down after an unhealthy release."""
    from networkd.keys import Keys
    from networkd.vips.health import HOLD_DOWN, ProbeSettings, VipHealth
    from networkd.vips.inputs import VipInputs
    from networkd.vips.planner import member_value
    from networkd.vips.wants import HostWants
    from tests.support.vipnodes import pod_group

    class Snapshot:
        def __init__(self, values, revision=1):
            self.values, self.revision = values, revision

    class Locks:
        presence_value, refreshed = None, 0

        def refresh_presence(self):
            self.refreshed += 1

    inputs = VipInputs(Keys("/lain"))
    inputs.configs_snapshot(Snapshot({"10.0.0.5": vip()}))
    inputs.pods_snapshot(Snapshot({"hello/hello.proc.web": pod_group(
        "hello", "web", [(1, "n1", "10.9.0.1", "172.20.0.5"), (2, "n2", "10.9.0.2", "172.20.0.6")])}))
    inputs.locks_snapshot(Snapshot({"10.0.0.5.lock": "n1", "members/n1": member_value("10.9.0.1", ["10.0.0.5"]),
                                    "members/n2": member_value("10.9.0.2", ["10.0.0.5"])}))
    assert inputs.member_health == {"n1": {"10.0.0.5"}, "n2": {"10.0.0.5"}}
    clock, locks = task.Clock(), Locks()
    health = VipHealth(clock, inputs, HostWants(inputs, "n1", "10.9.0.1"), locks, "n1", "10.9.0.1",
                       ProbeSettings(), lambda: None)
    health.sync()
    target = Target("tcp", "172.20.0.5", 8080)
    state = health.prober.states[target]
    state.up = True
    health._probe_changed()
    health.sync()
    assert health.healthy == {"10.0.0.5"} and locks.refreshed == 1 and locks.presence_value == health.presence
    assert health.plan(frozenset({"10.0.0.5"})).keep == {"10.0.0.5"}

    state.up, state.last_error = False, "connection refused"
    health._probe_changed()
    health.sync()
    assert health.healthy == frozenset() and locks.refreshed == 2
    plan = health.plan(frozenset({"10.0.0.5"}))
    assert plan.release == {"10.0.0.5"}
    assert plan.reasons["10.0.0.5"] == ("unhealthy here (probe tcp://172.20.0.5:8080: connection refused); "
                                        "a healthy candidate takes it")
    assert health.hold_down == {"10.0.0.5": HOLD_DOWN}

    inputs.locks_snapshot(Snapshot({"members/n1": member_value("10.9.0.1", []),
                                    "members/n2": member_value("10.9.0.2", ["10.0.0.5"])}, 2))
    state.up = True  # healthy again, and the VIP is free: n2 (healthy) goes first
    health._probe_changed()
    health.sync()
    assert health.healthy == frozenset(), "in hold-down, n2 healthy: we do not say we are (no rebalancing to us)"
    clock.advance(5)
    plan = health.plan(frozenset())
    assert not plan.campaign_now and plan.campaign_later == {"10.0.0.5"}
    assert "hold-down" in health.notes["10.0.0.5"]
    clock.advance(HOLD_DOWN - 5)
    assert health.plan(frozenset()).campaign_now == {"10.0.0.5"}, "the hold-down is over"
    assert health.healthy == {"10.0.0.5"}, "and we say we are healthy again"

    inputs.locks_snapshot(Snapshot({"10.0.0.5.lock": "n1", "members/n1": member_value("10.9.0.1", []),
                                    "members/n2": member_value("10.9.0.2", [])}, 3))
    state.up = False  # nobody healthy: the holder keeps it, and says why
    plan = health.plan(frozenset({"10.0.0.5"}))
    assert plan.keep == {"10.0.0.5"} and "no candidate is healthy" in health.notes["10.0.0.5"]
    health.stop()


def test_ten_targets_share_one_wake_up_an_interval():
    """A node's ten containers are probed together: one timer step a second, not ten
    (each wake-up, and the read of each answer, cost more than the connect itself)."""
    clock, script, p, _ = prober()
    targets = [Target("tcp", f"172.20.0.{i}", 8080) for i in range(10)]
    steps = []
    original = p._step
    p._step = lambda: (steps.append(clock.seconds()), original())
    p.track(targets)
    clock.pump([0.01] * 1000)  # 10 s
    assert 90 <= len(script.calls) <= 100, len(script.calls)
    assert len(steps) <= 11, f"{len(steps)} timer steps for {len(script.calls)} probes of 10 targets"
    assert all(p.up(t) for t in targets)
    p.track(targets + [Target("tcp", f"172.21.{i // 250}.{i % 250}", 80) for i in range(990)])  # 1,000: all phases
    clock.pump([0.01] * 100)  # the timer set for the ten runs first, then every phase is in use
    steps.clear()
    script.calls.clear()
    clock.pump([0.01] * 125)  # an interval, and the drift of the 0.01 s pumps
    assert len(steps) >= 19 and len(set(target for _, target in script.calls)) == 1000, "spread again"


def test_a_few_targets_wake_the_reactor_once_per_interval_each_not_every_phase():
    clock, script, p, _ = prober()
    steps = []
    original = p._step
    p._step = lambda: (steps.append(clock.seconds()), original())
    p.track([T])
    clock.pump([0.01] * 1000)  # 10 s
    assert 9 <= len(script.calls) <= 10 and len(steps) <= 11, f"{len(steps)} timer steps for {len(script.calls)} probes"
    script.answer = None  # in flight until the timeout (0.5 s): a step at the timeout, not just at the next turn
    steps.clear()
    clock.pump([0.01] * 300)
    assert p.states[T].failures == 3 and p.states[T].last_error == "no answer within 0.5s"
    assert len(steps) <= 7, f"{len(steps)} timer steps in 3 s"


def test_new_vips_are_dealt_out_before_the_others_could_say_they_are_healthy():
    """Probes off, 8 new VIPs of an app on 4 nodes whose members values predate them (healthy: []): the
    others count as healthy while they have not said (their healthy lists unchanged since the VIPs
    appeared, up to UNSAID_MAX), so we contest our share (2) at once, not all 8 (the first node through a
    burst took them all); one that said, and not these, is not healthy; nor one silent for too long."""
    from networkd.keys import Keys
    from networkd.vips.health import VipHealth
    from networkd.vips.inputs import VipInputs
    from networkd.vips.planner import member_value
    from networkd.vips.wants import HostWants
    from tests.support.vipnodes import pod_group

    class Snapshot:
        def __init__(self, values, revision=1):
            self.values, self.revision = values, revision

    class Locks:
        presence_value = None

        def refresh_presence(self):
            pass

    nodes = ["n1", "n2", "n3", "n4"]
    inputs = VipInputs(Keys("/lain"))
    inputs.locks_snapshot(Snapshot({f"members/{n}": member_value(f"10.9.0.{i}", [], True) for i, n in enumerate(nodes)}))
    inputs.pods_snapshot(Snapshot({"hello/hello.proc.web": pod_group(
        "hello", "web", [(i + 1, n, f"10.9.0.{i}", f"172.20.0.{i}") for i, n in enumerate(nodes)])}))
    inputs.configs_snapshot(Snapshot({}))
    clock = task.Clock()
    health = VipHealth(clock, inputs, HostWants(inputs, "n1", "10.9.0.0"), Locks(), "n1", "10.9.0.0", None,
                       lambda: None)
    health.sync()
    health.plan(frozenset())  # running, the members values heard, before the burst
    clock.advance(5)
    inputs.configs_snapshot(Snapshot({f"10.0.0.{k}": vip() for k in range(1, 9)}, revision=2))
    health.sync()
    plan = health.plan(frozenset())
    assert len(plan.campaign_now) == 2 and len(plan.campaign_later) == 6, plan
    from networkd.vips.health import FRESH, UNSAID_MAX

    clock.advance(FRESH)
    assert len(health.plan(frozenset()).campaign_now) == 2, "the others have not said since: still candidates"
    inputs.locks_snapshot(Snapshot({f"members/{n}": member_value(f"10.9.0.{i}", ["10.0.0.99"] if n in ("n2", "n3")
                                                                 else [], True)
                                    for i, n in enumerate(nodes)}, revision=2))
    clock.advance(0.1)
    plan = health.plan(frozenset())
    assert len(plan.campaign_now) == 4, "n2 and n3 said, and not for these: half of them, shared with n4"
    clock.advance(UNSAID_MAX - FRESH)
    assert len(health.plan(frozenset()).campaign_now) == 8, "the others said nothing for too long: not healthy"
