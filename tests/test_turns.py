"""The reactor's turns measured in the daemon (networkd.turns): how long DNS queries may have waited."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import pytest
from twisted.logger import capturedLogs

from networkd import turns
from networkd.turns import TurnMeter, meter_turns
from tests.support.ports import free_port
from tests.test_api_daemon import curl, daemon_factory  # noqa: F401  (a fixture)


@pytest.fixture
def reactor(own_asyncio_reactor):
    return own_asyncio_reactor


def test_a_blocking_call_on_the_real_loop_is_one_long_turn(reactor):
    meter = meter_turns(reactor)
    assert meter_turns(reactor) is meter, "wrapped once"
    loop = reactor._asyncioEventloop
    loop.call_soon(time.sleep, 0.03)
    runner = threading.Thread(target=lambda: loop.run_until_complete(asyncio.sleep(0.2)))
    runner.start()  # a thread of its own: pytest-twisted's loop runs in this one
    runner.join(10)
    over_10ms = sum(count for bound, count in zip(turns.BUCKETS, meter.counts) if bound > 0.01)
    assert over_10ms >= 1 and meter.longest >= 0.03
    assert meter.total >= 0.03
    assert meter.cumulative()[-1][1] == sum(meter.counts) >= 2  # the sleep's turn and others around it


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_turns_are_counted_by_length_and_the_long_ones_logged_once_a_minute():
    clock = FakeClock()
    meter = TurnMeter(clock)
    waits = []

    def wait(timeout):  # the wait in epoll is no turn
        waits.append(timeout)
        clock.now += timeout
        return []

    select = meter.wrap(wait)

    def turn(seconds, then_wait=0.5):
        clock.now += seconds  # the turn's work
        select(then_wait)

    select(0.5)  # the loop's first wait: what ran before it set the daemon up, no turn
    with capturedLogs() as events:
        for seconds in (0.0002, 0.003, 0.003, 0.2, 1.5):
            turn(seconds)
        turn(2.0, then_wait=turns.WARN_EVERY)
        turn(1.2)
    assert waits == [0.5] * 6 + [turns.WARN_EVERY, 0.5]
    assert dict(meter.cumulative())[0.001] == 1 and dict(meter.cumulative())[0.005] == 3
    assert dict(meter.cumulative())[0.5] == 4 and dict(meter.cumulative())[float("inf")] == 7
    assert meter.longest == pytest.approx(2.0) and meter.total == pytest.approx(4.9062)
    warnings = [e for e in events if e.get("log_namespace") == "networkd.turns"]
    assert [(round(e["s"], 1), e["n"]) for e in warnings] == [(1.5, 1), (1.2, 2)], \
        "one line a minute, counting the long turns it did not log"


def test_the_daemon_shows_its_turns_in_metrics(private_etcd, etcd_root, tmp_path, daemon_factory):  # noqa: F811
    port = free_port()
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 10.0.0.2\n")
    daemon = daemon_factory([
        "--etcd", private_etcd.endpoint, "--etcd-root", etcd_root, "--node-ip", "10.1.2.3",
        "--no-vips", "--no-dns", "--no-resolv-conf", "--api-listen", f"127.0.0.1:{port}",
        "--resolv-conf", str(resolv),
    ])
    daemon.wait_for_log(f"HTTP API listening on http://127.0.0.1:{port}/")

    def scraped() -> tuple[float, float, float]:
        code, body = curl(port, "/metrics")
        assert code == 200
        text = body.decode()
        count = re.search(r'^networkd_reactor_turn_seconds_bucket\{le="\+Inf"\} (\S+)$', text, re.M)
        total = re.search(r"^networkd_reactor_turn_seconds_sum (\S+)$", text, re.M)
        longest = re.search(r"^networkd_reactor_longest_turn_seconds (\S+)$", text, re.M)
        assert count and total and longest, text
        return float(count[1]), float(total[1]), float(longest[1])

    first = scraped()
    second = scraped()
    assert second[0] > first[0] > 0, "each request is served in turns of the daemon's reactor"
    assert second[1] >= first[1] > 0 and 0 <= second[2] < 60  # (0 while every turn is under the first bucket)
