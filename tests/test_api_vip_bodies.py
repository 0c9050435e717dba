"""``/v1/vips`` and ``/metrics`` with many VIPs (issue 13): kept per-entry texts and per-VIP lines stay true.

The API keeps each VIP entry's JSON while the entry is equal and each
per-VIP metric line's labels from one scrape to the next: these tests change
a VIP's holder, its pods' health, add and remove VIPs, and check the bodies
a client reads against entries and metric families made from scratch.
Counted, not timed.
"""

from __future__ import annotations

import json

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.web.test.requesthelper import DummyRequest

from networkd.api import metrics
from networkd.api.parts import ApiParts
from networkd.api import slices
from networkd.api.resources import ApiResource
from networkd.api.rowfamily import RowFamily
from networkd.api.vipstatus import BODY_PIECE, EntryTexts, add_held_for, each_vip_entry, vip_entries
from networkd.etcd.client import KeyValue
from networkd.vips.planner import ContainerIndex
from tests.support.vipnodes import pod_group, vip_value
from tests.test_vip_reconciler import node  # noqa: F401  (the fixture)


class Client:
    failovers = 0
    endpoint = "fake"


class Turns:
    """The node's clock, counting the reactor turns the API asks for (``callLater(0, ...)``)."""

    def __init__(self, clock):
        self.clock, self.turns = clock, 0

    def callLater(self, delay, f, *args, **kwargs):
        self.turns += delay == 0
        return self.clock.callLater(delay, f, *args, **kwargs)

    def seconds(self):
        return self.clock.seconds()


def api_of(node):  # noqa: F811
    parts = ApiParts(reactor=Turns(node.clock), client=Client(), etcd_root="/lain", hostname="n1", node_ip="10.9.0.1",
                     dns_listen=None, vips=node.manager)
    return ApiResource(parts)


def get(node, api, path: str):  # noqa: F811
    """GET ``path`` as twisted.web would: (body, reactor turns its render took after the first)."""
    request = DummyRequest([part.encode() for part in path.strip("/").split("/")])
    request.path = path.encode()
    before = api._parts.reactor.turns
    api.render(request)
    node.clock.advance(0)
    assert request.finished
    assert request.responseCode in (None, 200)
    return b"".join(request.written), api._parts.reactor.turns - before


def publish_vips(node, n: int, holders: dict | None = None, states: dict | None = None):  # noqa: F811
    """The fake etcd gets the range read the lock read-back uses for many locks (as bench/apivips.py's);
    ``n`` floating VIPs, app i with one pod on n1 and one on n2; ``holders``: ip -> lock holder."""
    vips = {f"10.78.0.{i}": vip_value(f"app{i}", "web", [{"src": "80", "proto": "tcp", "dest": "8080"}])
            for i in range(1, n + 1)}
    vips["bad"] = "not json"
    pods = {f"app{i}/app{i}.proc.web": pod_group(f"app{i}", "web", [(1, "n1", "10.9.0.1", f"172.20.0.{i}"),
                                                                      (2, "n2", "10.9.0.2", f"172.20.1.{i}")],
                                                 states=(states or {}).get(i))
            for i in range(1, n + 1)}
    locks = {"members/n1": "10.9.0.1", "members/n2": "10.9.0.2"}
    node.etcd.get_prefix = lambda prefix, **_: defer.succeed((1, [
        KeyValue(key, value, 1, lease or 0) for key, (value, lease) in node.etcd.kv.items() if key.startswith(prefix)]))
    locks.update({f"{ip}.lock": holder for ip, holder in (holders or {}).items()})
    node.publish(vips=vips, pods=pods, locks=locks)
    tick(node, 1)
    # the locks n1 took, as its watch would then see them
    prefix = node.keys.vip_locks.encode()
    node.publish(locks={**locks, **{key[len(prefix):].decode().lstrip("/"): value.decode()
                                    for key, (value, _) in node.etcd.kv.items()
                                    if key.startswith(prefix) and key.endswith(b".lock")}})


def tick(node, seconds: float):  # noqa: F811
    """Time passes with the lease's keep-alives acknowledged (no fencing)."""
    while seconds > 0:
        step = min(seconds, 0.5)
        node.clock.advance(step)
        node.session.ack()
        seconds -= step


def fresh_entries(node):  # noqa: F811
    """What /v1/vips must show: the entries made from scratch, as json.dumps would give them back."""
    entries = add_held_for(vip_entries(node.manager), node.manager, node.clock.seconds())
    return json.loads(json.dumps(entries))


def by_key(entries):
    return {e["key"]: e for e in entries}


def test_vips_body_follows_holder_and_health_changes(node):  # noqa: F811
    publish_vips(node, 40, holders={"10.78.0.1": "n2"})
    tick(node, 1)
    api = api_of(node)
    body, _ = get(node, api, "/v1/vips")
    assert json.loads(body) == fresh_entries(node)
    assert by_key(json.loads(body))["10.78.0.1"]["holder"] == "n2"
    assert [p["running"] for c in by_key(json.loads(body))["10.78.0.2"]["candidates"] if c["node"] == "n2"
            for p in c["pods"]] == [True]
    encoded = api.vip_texts.encoded
    held_for = {e["key"]: e["held_for"] for e in json.loads(body) if e.get("held_for") is not None}
    assert held_for, "n1 holds some VIPs"

    tick(node, 3)  # time alone: durations move
    body, _ = get(node, api, "/v1/vips")
    assert json.loads(body) == fresh_entries(node)
    assert all(by_key(json.loads(body))[key]["held_for"] > seconds for key, seconds in held_for.items())
    assert api.vip_texts.encoded == encoded, "unchanged entries are not encoded again"

    publish_vips(node, 40, holders={"10.78.0.1": "n3"})  # another holder, seen through the locks
    tick(node, 1)
    body, _ = get(node, api, "/v1/vips")
    assert by_key(json.loads(body))["10.78.0.1"]["holder"] == "n3"
    assert json.loads(body) == fresh_entries(node)
    assert api.vip_texts.encoded > encoded

    # deployd says app 2's pod on n2 is unhealthy: its candidates show it
    publish_vips(node, 40, holders={"10.78.0.1": "n3"}, states={2: {2: {"State": 3, "Healthst": 0}}})
    tick(node, 1)
    body, _ = get(node, api, "/v1/vips")
    assert json.loads(body) == fresh_entries(node)
    candidates = {c["node"]: c for c in by_key(json.loads(body))["10.78.0.2"]["candidates"]}
    assert [p["running"] for p in candidates["n2"]["pods"]] == [False], "the kept text of before is not served"
    assert candidates["n2"]["candidate"] is False

    publish_vips(node, 30)  # ten VIPs gone, the locks released
    tick(node, 1)
    body, _ = get(node, api, "/v1/vips")
    entries = json.loads(body)
    assert entries == fresh_entries(node) and "10.78.0.35" not in by_key(entries)
    assert by_key(entries)["10.78.0.1"]["holder"] != "n3"


def test_vips_body_is_a_json_list_one_entry_a_line():
    texts = EntryTexts()
    entries = [{"key": f"10.0.0.{i}", "ip": f"10.0.0.{i}", "held_by_me": bool(i % 2), "note": 'é"\\\n',
                "held_for": 1.5 if i % 2 else None, "unheld_seconds": i / 3, "nested": [{"b": 1, "a": None}]}
               for i in range(60)] + [{"key": "bad", "error": "not json", "last_error": "not json"}, {}]
    body = run(texts.renderer(iter([dict(e) for e in entries]), piece=7))
    assert json.loads(body) == entries
    assert body.startswith(b"[\n{") and body.endswith(b"}\n]\n") and body.count(b"\n") == len(entries) + 2
    again = run(texts.renderer(iter([dict(e, unheld_seconds=9.25) for e in entries]), piece=7))
    assert json.loads(again) == [dict(e, unheld_seconds=9.25) for e in entries]
    assert texts.encoded == len(entries), "a moving value changed: written anew, not encoded again"
    assert run(EntryTexts().renderer(iter([]))) == b"[]\n"


def test_vips_entries_are_made_and_written_a_few_at_a_time(node, monkeypatch):  # noqa: F811
    publish_vips(node, 60)
    tick(node, 1)
    made, turns = [], []
    texts = EntryTexts()

    def counted(entries):
        for entry in entries:
            made.append(entry)
            yield entry

    renderer = texts.renderer(counted(each_vip_entry(node.manager)), piece=10)
    try:
        while True:
            before = len(made)
            next(renderer)
            turns.append(len(made) - before)
    except StopIteration as stop:
        body = b"".join(stop.value)
    assert max(turns) <= 10 and len(turns) >= 6, f"entries made per slice: {turns}"
    assert len(json.loads(body)) == 61
    monkeypatch.setattr(slices, "BUDGET", 0.0)  # one piece a reactor turn
    body, turns = get(node, api_of(node), "/v1/vips")
    assert turns >= 61 // BODY_PIECE, f"the API's own render took {turns} turns for 61 entries"
    assert len(json.loads(body)) == 61


def test_candidates_come_from_the_container_index_not_a_walk_of_every_pod(node):  # noqa: F811
    publish_vips(node, 20, states={3: {2: {"State": 3}}})
    tick(node, 1)
    before = fresh_entries(node)

    class NoWalk(ContainerIndex):
        def __iter__(self):
            raise AssertionError("every container walked for one VIP")

    inputs = node.manager.inputs
    index = inputs.containers
    walled = tuple.__new__(NoWalk, ())
    walled.by_proc, walled.every_of_proc = index.by_proc, index.every_of_proc
    inputs.containers = walled
    try:
        health = node.manager.health
        for config in inputs.configs.values():
            health.candidates(config)
    finally:
        inputs.containers = index
    assert fresh_entries(node) == before
    n2 = [c for c in by_key(before)["10.78.0.3"]["candidates"] if c["node"] == "n2"]
    assert n2[0]["pods"][0]["running"] is False and n2[0]["candidate"] is False


# -- /metrics -----------------------------------------------------------------------


def test_row_families_write_what_generate_latest_writes():
    rows = [(("10.0.0.1", 'a"b\\c\nd', "web"), 1.0), (("10.0.0.2", "é", "web"), 0.0),
            (("10.0.0.3", "x", "y"), 1_800_000_000.25), (("10.0.0.4", "x", "y"), 3), (("10.0.0.5", "", ""), 0.1),
            (("10.0.0.6", "x", "y"), float("inf")), (("10.0.0.7", "x", "y"), -0.0), (("10.0.0.8", "x", "y"), 0)]
    ours = [RowFamily("g", 'help "q" \\ and\nnl', "gauge", ["vip", "app", "proc"], rows),
            RowFamily("c", "a counter", "counter", ["vip", "app", "proc"], rows),
            RowFamily("e", "empty", "gauge", ["vip"], [])]
    theirs = [GaugeMetricFamily("g", 'help "q" \\ and\nnl', labels=["vip", "app", "proc"]),
              CounterMetricFamily("c", "a counter", labels=["vip", "app", "proc"]),
              GaugeMetricFamily("e", "empty", labels=["vip"])]
    for family in theirs[:2]:
        for values, value in rows:
            family.add_metric(list(values), value)
    kept = {}
    for mine, reference in zip(ours, theirs):
        expected = generate_latest(Registry([reference]))
        assert generate_latest(Registry([mine])) == expected, "its samples are the reference's"
        assert b"".join(mine.write(piece=2)) == expected
        assert b"".join(mine.write(piece=4, kept=kept)) == expected
        assert b"".join(mine.write(piece=4, kept=kept)) == expected, "written again from the kept labels"
    assert len(kept["g"]) == len(rows)
    b"".join(RowFamily("g", "help", "gauge", ["vip", "app", "proc"], rows[:2]).write(1, kept))
    assert len(kept["g"]) == 2, "only the last scrape's rows are kept"


def test_metrics_follow_holder_changes_and_vips_going(node, monkeypatch):  # noqa: F811
    publish_vips(node, 40, holders={"10.78.0.1": "n2"})
    tick(node, 1)
    api = api_of(node)
    monkeypatch.setattr(slices, "BUDGET", 0.0)  # one family (or piece of one) a reactor turn
    body, turns = get(node, api, "/metrics")
    assert body == metrics.render_metrics(metrics.make_registry(api._parts))
    families = list(text_string_to_metric_families(body.decode()))
    assert turns >= len(families) - 1, f"{turns} reactor turns for {len(families)} families"
    assert sample(body, "networkd_vip_holder", vip="10.78.0.1") == {"holder": "n2"}

    publish_vips(node, 40, holders={"10.78.0.1": "n3"})
    tick(node, 1)
    body, _ = get(node, api, "/metrics")
    assert sample(body, "networkd_vip_holder", vip="10.78.0.1") == {"holder": "n3"}
    assert body == metrics.render_metrics(metrics.make_registry(api._parts))

    publish_vips(node, 30)
    tick(node, 1)
    body, _ = get(node, api, "/metrics")
    assert body == metrics.render_metrics(metrics.make_registry(api._parts))
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert {s.labels["vip"] for s in families["networkd_vip_active"].samples} == {
        f"10.78.0.{i}" for i in range(1, 31)}
    assert len(api.metric_lines["networkd_vip_active"]) == 30, "the lines of VIPs gone are not kept"


def sample(body: bytes, family: str, vip: str) -> dict:
    """The labels other than vip of ``family``'s one sample for ``vip`` (parsed as Prometheus does)."""
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    found = [s for s in families[family].samples if s.labels.get("vip") == vip]
    assert len(found) == 1, found
    return {k: v for k, v in found[0].labels.items() if k != "vip"}


class Registry:
    def __init__(self, families):
        self._families = families

    def collect(self):
        return iter(self._families)


def run(renderer) -> bytes:
    try:
        while True:
            next(renderer)
    except StopIteration as stop:
        return b"".join(stop.value)
