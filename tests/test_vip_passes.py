"""How often the VIP manager works at rest: renewals follow keep-alives, full passes do not (driven clock)."""

from __future__ import annotations

from tests.test_vip_reconciler import hold_vip, node  # noqa: F401 (fixture)


def count_calls(obj, name):
    calls = []
    original = getattr(obj, name)

    def counted(*a, **kw):
        calls.append(1)
        return original(*a, **kw)

    setattr(obj, name, counted)
    return calls


def test_at_rest_keep_alives_renew_without_full_passes(node):  # noqa: F811
    hold_vip(node)
    passes = count_calls(node.manager, "_reconcile")
    for _ in range(10):  # ten seconds, a keep-alive each
        node.clock.pump([0.1] * 10)
        node.session.ack()
    renewals = [entry for entry in node.journal if entry[0] == "renew"]
    assert len(renewals) >= 9, "the address is renewed as keep-alives come"
    assert 1 <= len(passes) <= 3, f"a full pass only every 5 s at rest, not {len(passes)} in 10 s"


def test_address_read_back_backs_off_when_it_is_costly(node):  # noqa: F811
    hold_vip(node)
    reads = []
    fake = node.manager.netlink
    original = fake.addresses

    def slow_dump():
        reads.append(node.clock.seconds())
        node.session.last_ack = node.clock.seconds()  # stay unfenced
        node.clock.advance(0.02)  # a dump of many addresses: 20 ms
        return original()

    fake.addresses = slow_dump
    for _ in range(30):
        node.clock.pump([0.1] * 10)
        node.session.ack()
    # 20 ms within a 0.2 % budget: one read-back every ~10 s, not every second
    assert 2 <= len(reads) <= 5, reads


def test_the_keep_alive_pass_takes_renewals_due_before_the_next_one(node):  # noqa: F811
    """So that the address keeper needs no timer pass of its own at rest, and renews every other keep-alive
    (tests/test_vip_delays.py): the pass of an acknowledgement looks one interval ahead, the keeper's
    own timer renews 3/4 of an interval before a lapse."""
    from networkd.vips.reconciler import renewal_lead

    hold_vip(node)
    asked = []
    original = node.manager.keeper.pass_now
    node.manager.keeper.pass_now = lambda ahead=0.0: (asked.append(ahead), original(ahead))
    node.session.ack()
    assert asked and asked[0] == node.session.interval
    assert node.manager.keeper.renew_ahead == renewal_lead(node.session.interval) == 0.75 * node.session.interval


def test_a_pass_at_rest_walks_no_vip_config(node, monkeypatch):  # noqa: F811
    """The anti-entropy pass every 5 s planned every VIP config again (which has a container here):
    ~5 ms of one reactor turn with 1,000 configs.  What only the snapshots decide is memoized on them
    (networkd.vips.wants), so a pass at rest looks at no config; a new snapshot is looked at once."""
    import json

    from networkd.vips import planner, wants
    from tests.test_vip_reconciler import VIP
    from tests.support.vipnodes import pod_group

    others = {f"10.1.{i >> 8}.{i & 255}": json.dumps({"app": "ghost", "proc": "web", "ports": [{"src": 80, "dest": 80}]})
              for i in range(1000)}
    hold_vip(node)
    node.publish(vips={**others, VIP: json.dumps({"app": "hello", "proc": "web", "ports": [{"src": 80, "dest": 8080}]})},
                 pods={"hello/hello.proc.web": pod_group("hello", "web", [(1, "n1", "10.9.0.1", "172.20.0.5")]),
                       "ghost/ghost.proc.web": pod_group("ghost", "web", [(1, "n2", "10.9.0.2", "172.20.0.6")])})
    node.clock.pump([0.1] * 10)
    node.session.ack()
    looked = []
    for module in (planner, wants):
        original = module.local_container
        monkeypatch.setattr(module, "local_container", lambda *a, _f=original: looked.append(1) or _f(*a))
    passes = count_calls(node.manager, "_reconcile")
    for _ in range(6):  # six seconds at rest: at least one anti-entropy pass
        node.clock.pump([0.1] * 10)
        node.session.ack()
    assert passes and node.manager.held_count() == 1
    assert looked == [], f"{len(looked)} configs looked at in {len(passes)} pass(es) at rest"
    node.publish(vips={**others, VIP: json.dumps({"app": "hello", "proc": "web", "ports": [{"src": 81, "dest": 8080}]})})
    assert len(looked) >= 1000, "a new snapshot is planned whole"


def test_a_flush_soon_after_a_slow_read_back_is_undone_at_once(node):  # noqa: F811
    """A read-back of our chains that took 15 ms (a loaded host) used to push the next one 2.5 s away,
    so a flush seconds after start-up stayed for that long (seen in CI: 1.3 s on a real nf_tables
    node).  The budget now holds a few read-backs at once and only the long-run share is 0.2 %."""
    hold_vip(node)
    backend = node.manager.firewall.backend
    wanted = list(backend.rules)
    assert wanted, "our DNAT rules are in place"
    original = backend.read

    def slow_read():
        node.clock.advance(0.015)
        return original()

    backend.read = slow_read
    node.manager.host._nat_changed()  # our own write, announced by nf_tables
    node.clock.pump([0.05] * 4)
    backend.rules = []  # someone flushed our chains
    node.manager.host._nat_changed()
    node.clock.pump([0.05] * 4)
    assert backend.rules == wanted, "restored within 0.2 s of the flush"


def test_read_backs_of_our_chains_under_a_flood_of_changes_stay_within_their_share(node):  # noqa: F811
    """A firewall manager that changes the nat table all the time: read-backs of 15 ms each, at most
    0.2 % of a CPU over a minute (plus the burst), not one per change."""
    hold_vip(node)
    backend = node.manager.firewall.backend
    reads = []
    original = backend.read

    def slow_read():
        reads.append(node.clock.seconds())
        node.clock.advance(0.015)
        return original()

    backend.read = slow_read
    for _ in range(600):  # a change every 0.1 s for a minute
        node.manager.host._nat_changed()
        node.session.last_ack = node.clock.seconds()  # stay unfenced
        node.clock.advance(0.1)
    allowed = (60 * 0.002 + 0.05) / 0.015
    assert 3 <= len(reads) <= allowed + 1, (len(reads), allowed)


def test_the_read_back_budget_on_a_clock_that_moves_between_reads():
    """``due()`` read on a real clock: a budget with credit left is due before any later reading."""
    import itertools

    from networkd.vips.readback import ReadBackBudget

    ticks = itertools.count(100.0, 0.001)
    budget = ReadBackBudget(lambda: next(ticks), share=0.002, burst=0.002)
    assert budget.due() < 100.002
    budget.spent(100.01, 0.003)  # 1 ms past the credit: 0.5 s to wait
    assert 100.5 <= budget.due() <= 100.52
