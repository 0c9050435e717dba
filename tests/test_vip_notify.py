"""--notify-script (issue 11 item 4): real processes, in order per VIP, never in the way of a VIP change."""

from __future__ import annotations

import time

import pytest_twisted
from twisted.internet import reactor

from networkd.vips.notify import Notifier
from tests.support.waiting import eventually
from tests.test_vip_nodes import cluster_factory  # noqa: F401 (fixture)

SCRIPT = """#!/bin/sh
echo "$1 $2 $3|$NETWORKD_EVENT $NETWORKD_VIP $NETWORKD_REASON|$NETWORKD_HOSTNAME" >> {log}
case "$3" in slow*) exec sleep 30 ;; fail*) echo oops; exit 3 ;; esac
"""


def script(tmp_path):
    log = tmp_path / "events"
    path = tmp_path / "notify.sh"
    path.write_text(SCRIPT.format(log=log))
    path.chmod(0o755)
    return str(path), log


def lines(log):
    return log.read_text().splitlines() if log.exists() else []


def assert_alternating(told):
    """acquired, released, acquired...: each transition of one VIP on one node told once, in order."""
    words = [line.split()[0] for line in told]
    assert words == ["acquired", "released"] * (len(told) // 2) + ["acquired"] * (len(told) % 2)


@pytest_twisted.ensureDeferred
async def test_events_run_in_order_per_vip_with_arguments_and_environment(tmp_path):
    path, log = script(tmp_path)
    notify = Notifier(reactor, path, "n1")
    started = time.monotonic()
    for event in ("acquired", "unhealthy", "released", "acquired"):
        notify(event, "10.0.0.5", f"why {event}")
    assert time.monotonic() - started < 0.05, "queuing never waits for a run"
    await eventually(lambda: len(lines(log)) == 4, 5, message="four runs")
    assert lines(log) == [f"{e} 10.0.0.5 why {e}|{e} 10.0.0.5 why {e}|n1"
                          for e in ("acquired", "unhealthy", "released", "acquired")]
    assert notify.runs == 4 and notify.failures == 0


@pytest_twisted.ensureDeferred
async def test_a_slow_script_is_killed_at_the_time_limit_and_delays_no_other_vip(tmp_path):
    path, log = script(tmp_path)
    notify = Notifier(reactor, path, "n1", timeout=1.0)
    notify("acquired", "10.0.0.5", "slow: sleeps 30 s")
    notify("released", "10.0.0.5", "after the slow one")
    await eventually(lambda: len(lines(log)) == 1, 3, message="the slow run started")
    asked = time.monotonic()
    notify("acquired", "10.0.0.6", "another VIP")
    await eventually(lambda: any("10.0.0.6" in line for line in lines(log)), 3, message="not behind the slow one")
    assert time.monotonic() - asked < 0.5
    assert not any("after the slow one" in line for line in lines(log)), "in order per VIP: it waits"
    await eventually(lambda: any("after the slow one" in line for line in lines(log)), 3,
                     message="the slow run is killed after 1 s, then the next runs")
    assert notify.failures == 1


@pytest_twisted.ensureDeferred
async def test_a_failing_script_is_logged_with_status_and_output(tmp_path):
    from tests.support.logcapture import LogCapture

    path, log = script(tmp_path)
    notify = Notifier(reactor, path, "n1")
    with LogCapture() as captured:
        notify("fenced", "10.0.0.5", "fail: exit 3")
        await eventually(lambda: notify.failures == 1, 3, message="the run failed")
    text = "\n".join(captured.lines)
    assert "notify script fenced 10.0.0.5: exit 3; output: oops" in text, text


def test_namespaced_nodes_tell_their_script_every_transition_in_order(cluster_factory, tmp_path):
    """Real daemons: acquired, unhealthy, released (ill health) on the holder, acquired on the other, released
    on SIGTERM; then a script that sleeps 30 s on "acquired" does not delay the next VIP change."""
    import signal

    from tests.support.vipnodes import AddressSampler, socket_in_netns
    from tests.support.waiting import wait_until
    from tests.test_vip_health import pods
    from tests.test_vip_nodes import VIP, one_vip_on_two_nodes

    c = cluster_factory()
    logs, slow = {}, tmp_path / "slow"
    for name in ("n1", "n2"):
        path = tmp_path / f"notify-{name}.sh"
        logs[name] = tmp_path / f"events-{name}"
        path.write_text(f'#!/bin/sh\necho "$1 $2 $3" >> {logs[name]}\n'
                        f'[ "$1" = acquired ] && [ -e {slow} ] && exec sleep 30\nexit 0\n')
        path.chmod(0o755)
        c[name].extra_args = ["--notify-script", str(path)]
    listeners = {n: socket_in_netns(c[n].ns.name, c[n].ip, 8080) for n in ("n1", "n2")}
    try:
        holder, other = one_vip_on_two_nodes(c)
        wait_until(lambda: lines(logs[holder]), 5, message="acquired")
        assert lines(logs[holder])[0] .startswith(f"acquired {VIP} lock held on lease ")
        listeners.pop(holder).close()  # its probe goes down: unhealthy, and it hands the VIP over
        wait_until(lambda: c.holders_of(VIP) == {other}, 8, message="moved for ill health")
        wait_until(lambda: lines(logs[holder])[-1:] and lines(logs[holder])[-1].startswith("released")
                   and lines(logs[other]), 5, message="events")
        # A loaded host may add a blip before (the kernel lifetime ran out while keep-alives were late:
        # released, acquired again): those are transitions too, told in order; the ill-health ones end it.
        told = lines(logs[holder])
        assert told[0].startswith(f"acquired {VIP} lock held on lease ")
        assert [line.split()[0] for line in told][-3:] == ["acquired", "unhealthy", "released"]
        assert "probe tcp://" in told[-2] and "unhealthy here" in told[-1]
        assert_alternating(told[:-2])
        told_other = lines(logs[other])
        assert told_other[-1].startswith(f"acquired {VIP} ")
        assert_alternating(told_other)

        slow.touch()  # from now on "acquired" runs sleep 30 s
        c[other].daemon.signal(signal.SIGTERM)
        wait_until(lambda: c.holders_of(VIP) == {holder}, 5, message="the unhealthy node is the only one left")
        wait_until(lambda: len(lines(logs[other])) > len(told_other) and len(lines(logs[holder])) > len(told),
                   3, message="events")
        assert lines(logs[other])[len(told_other)] == f"released {VIP} networkd is stopping"
        assert lines(logs[holder])[len(told)].startswith(f"acquired {VIP}")  # its run now sleeps 30 s
        with AddressSampler([c[holder]], VIP) as sampler:
            asked = time.monotonic()
            pods(c, {1: {"State": 3}, 2: {"State": 3}})  # deployd: both pods exited
            wait_until(lambda: sampler.first(lambda h: not h, after=asked), 3, interval=0.05, message="released")
        gone = sampler.first(lambda h: not h, after=asked)
        assert gone - asked < 1.0, f"the release took {gone - asked:.2f}s behind a sleeping script"
        assert len(lines(logs[holder])) == len(told) + 1, "its \"released\" waits for the sleeping run (in order per VIP)"
    finally:
        for s in listeners.values():
            s.close()
