"""A burst of VIP configs, contested at once by one node on a real etcd.

1,000 VIP configs written in one burst used to give hundreds of warnings
"could not contest VIP …:", one per VIP and pass, often with an empty text:
every lock transaction was sent at once, the keep-alive waited behind them
and timed out, the connection was dropped, and every call on it was
cancelled.  Here the connection is dropped in the middle of the burst on
purpose (what that timeout does), and what the operator sees is checked.
"""

from __future__ import annotations

import base64
import json
import urllib.request

import pytest_twisted
from twisted.internet import reactor

from tests.support.logcapture import LogCapture
from tests.support.vipnodes import pod_group, vip_value
from networkd.vips.contests import SUMMARY_EVERY
from tests.support.waiting import eventually, sleep
from tests.test_vip_reconciler import live  # noqa: F401  (fixture)

BURST = 1000


def put_all(etcd, items: dict[str, str], batch: int = 128) -> None:
    """Write ``items`` in as few transactions as etcd allows (--max-txn-ops defaults to 128)."""
    b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    pairs = list(items.items())
    for k in range(0, len(pairs), batch):
        body = json.dumps({"success": [{"requestPut": {"key": b64(key), "value": b64(value)}}
                                       for key, value in pairs[k:k + batch]]}).encode()
        request = urllib.request.Request(f"{etcd.endpoint}/v3/kv/txn", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert json.loads(answer.read()).get("succeeded")


@pytest_twisted.ensureDeferred
async def test_a_burst_of_vip_configs_is_contested_without_a_warning_per_vip(etcd_server, etcd_root, live):
    n1 = live()
    ips = [f"10.80.{i // 250}.{i % 250 + 1}" for i in range(BURST)]
    items = {f"{etcd_root}/deployd/pod_groups/hello/hello.proc.web":
             pod_group("hello", "web", [(1, "n1", "10.9.0.1", "172.20.0.5")])}
    items.update({f"{etcd_root}/config/vips/{ip}": vip_value("hello", "web", [{"src": "80"}]) for ip in ips})
    locks, sent = n1.manager.locks._locks, []
    acquire = locks.acquire

    def acquire_then_drop(*args):
        sent.append(1)
        if len(sent) == 50:  # once this turn's requests are out, as a keep-alive timed out behind them does:
            reactor.callLater(0, lambda: n1.client._failed(n1.client._client))  # the calls on it are cancelled
        return acquire(*args)

    locks.acquire = acquire_then_drop
    with LogCapture() as logs:
        put_all(etcd_server, items)
        await eventually(lambda: n1.manager.held_count() == BURST, 15,
                         message=f"every VIP held ({n1.manager.held_count()} of {BURST})")
        await sleep(SUMMARY_EVERY + 0.2)  # the last summary
    contest = logs.matching("could not contest")
    assert len(contest) <= 4, f"{len(contest)} lines, not a summary:\n" + "\n".join(contest[:5])
    assert all(f"etcd {etcd_server.endpoint}: " in line and "; retrying" in line for line in contest), \
        f"each says what happened and where: {contest}"
    assert not n1.manager.locks.errors, "a VIP held has no error left"
