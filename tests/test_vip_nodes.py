"""Floating VIPs across namespaced nodes: real daemons, real etcd, real netlink and iptables.

Every node is a network namespace on a bridge with its own daemon
(``--lock-ttl 3``: fencing after 2.25 s, address lifetime 2 s).
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.support.vipnodes import AddressSampler, Cluster, vip_value
from tests.support.waiting import wait_until

TTL = 3
VIP = "10.77.0.100"
WEB = [{"src": "80", "dest": "8080"}]


def _legacy_usable() -> str | None:
    """None if python-iptables can drive the legacy nat table here, else why not."""
    try:
        import iptc  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the host
        return f"python-iptables does not load: {e}"
    return None


BACKENDS = [
    "nft",
    pytest.param("legacy", marks=pytest.mark.skipif(_legacy_usable() is not None,
                                                    reason=str(_legacy_usable()))),
]


def make_cluster(lan, etcd, etcd_root, firewall="nft", nodes=2):
    cluster = Cluster(lan, etcd, etcd_root, firewall, ttl=TTL)
    for i in range(nodes):
        cluster.add(f"n{i + 1}", 11 + i)
    return cluster


@pytest.fixture
def cluster_factory(lan, etcd_server, etcd_root):
    made = []

    def make(firewall="nft", nodes=2, etcd=None):
        cluster = make_cluster(lan, etcd or etcd_server, etcd_root, firewall, nodes)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        print(cluster.logs())  # shown when the test failed
        cluster.close()


def both_run(cluster, app="hello", proc="web"):
    cluster.put_pods(app, proc, [(1, "n1", "10.77.0.11"), (2, "n2", "10.77.0.12")])


def one_vip_on_two_nodes(cluster) -> tuple[str, str]:
    """Both nodes run the app, the VIP is configured, the daemons start: (holder, the other)."""
    both_run(cluster)
    cluster.put_vip(VIP, vip_value("hello", "web", WEB))
    cluster.start()
    holder = wait_until(lambda: next(iter(cluster.holders_of(VIP)), None), 10, message="someone holds it")
    return holder, "n2" if holder == "n1" else "n1"


@pytest.mark.parametrize("firewall", BACKENDS)
def test_vip_and_dnat_on_the_node_running_the_app_reconciled_exactly(cluster_factory, firewall):
    c = cluster_factory(firewall)
    c.put_pods("hello", "web", [(1, "n1", "10.77.0.11")])
    c.put_vip(VIP, vip_value("hello", "web", WEB))
    c.put_vip("0.0.0.0:9000", vip_value("hello", "web", [{"src": "9000", "proto": "udp", "dest": "53"}]))
    c.put_vip("10.77.0.111:7000", vip_value("hello", "web", [{"dest": "7001"}]))
    c.put_vip("10.77.0.300", vip_value("hello", "web", WEB))  # invalid key: skipped, others apply
    c.put_vip("10.77.0.101", '{"app": "hello", "proc": "web", "ports": [{"src": "0"}]}')  # invalid port
    c.start()

    wait_until(lambda: c.holders_of(VIP) == {"n1"}, 10, message="n1 holds the VIP")
    expected = {
        ("lain-PREROUTING", f"{VIP}:80/tcp", "10.77.0.11:8080"),
        ("lain-OUTPUT", f"{VIP}:80/tcp", "10.77.0.11:8080"),
        ("lain-PREROUTING", "10.77.0.11:9000/udp", "10.77.0.11:53"),
        ("lain-OUTPUT", "10.77.0.11:9000/udp", "10.77.0.11:53"),
        ("lain-PREROUTING", "10.77.0.111:7000/tcp", "10.77.0.11:7001"),
        ("lain-OUTPUT", "10.77.0.111:7000/tcp", "10.77.0.11:7001"),
    }
    wait_until(lambda: c["n1"].dnat() == expected, 5, message=f"n1 rules {c['n1'].dnat()}")
    assert c.lock_holder(VIP) == "n1"
    apps = {"hello/web/10.77.0.11:9000": "n1", "hello/web/10.77.0.111:7000": "n1"}
    wait_until(lambda: c.app_keys() == apps, 5, message=f"app keys {c.app_keys()}")
    assert c["n2"].addresses() == set() and c["n2"].dnat() == set(), "n2 runs no container"
    assert all("-o lo" in line for line in c["n1"].nat() if line.startswith("-A lain-OUTPUT"))
    assert "10.77.0.300" in c["n1"].daemon.log() and "10.77.0.101" in c["n1"].daemon.log()

    # dest, proto and ports change; container moves to another IP: exactly the new rules remain
    c.put_vip(VIP, vip_value("hello", "web", [{"src": "80", "dest": "8081"}, {"src": "80", "proto": "udp"},
                                              {"src": "443"}]))
    c.put_pods("hello", "web", [(1, "n1", "10.77.0.21")])
    expected = {
        (chain, match, target)
        for chain in ("lain-PREROUTING", "lain-OUTPUT")
        for match, target in (
            (f"{VIP}:80/tcp", "10.77.0.21:8081"), (f"{VIP}:80/udp", "10.77.0.21:80"),
            (f"{VIP}:443/tcp", "10.77.0.21:443"),
            ("10.77.0.11:9000/udp", "10.77.0.21:53"), ("10.77.0.111:7000/tcp", "10.77.0.21:7001"),
        )
    }
    wait_until(lambda: c["n1"].dnat() == expected, 5, message=f"n1 rules {c['n1'].dnat()}")

    # the container moves to n2: n1 releases (rules and address first), n2 takes over
    c.put_pods("hello", "web", [(1, "n2", "10.77.0.22")])
    wait_until(lambda: c.holders_of(VIP) == {"n2"}, 5, message="moved to n2")
    wait_until(lambda: c["n1"].dnat() == set() and c["n1"].addresses() == set(), 5, message="n1 clean")
    wait_until(lambda: ("lain-PREROUTING", f"{VIP}:443/tcp", "10.77.0.22:443") in c["n2"].dnat(), 5)
    assert c.lock_holder(VIP) == "n2"
    apps = {"hello/web/10.77.0.12:9000": "n2", "hello/web/10.77.0.111:7000": "n2"}
    wait_until(lambda: c.app_keys() == apps, 5, message=f"app keys {c.app_keys()}")

    # deleting the configs cleans everything: rules, address, lock
    for key in (VIP, "0.0.0.0:9000", "10.77.0.111:7000"):
        c.delete_vip(key)
    wait_until(lambda: all(c[n].dnat() == set() and c[n].addresses() == set() for n in ("n1", "n2")), 5,
               message="all clean")
    wait_until(lambda: c.lock_holder(VIP) is None, 3, message="lock released")
    # withdrawn by the same pass, through etcd: it may land just after the lock's delete
    wait_until(lambda: c.app_keys() == {}, 3, message=f"app keys withdrawn: {c.app_keys()}")


@pytest.mark.parametrize("firewall", BACKENDS)
def test_excluded_node_never_holds_it(cluster_factory, firewall):
    c = cluster_factory(firewall)
    both_run(c)
    c.put_vip(VIP, vip_value("hello", "web", WEB, excluded=["n1"]))
    with AddressSampler(list(c.nodes.values()), VIP) as sampler:
        c.start()
        wait_until(lambda: c.holders_of(VIP) == {"n2"}, 10, message="n2 holds it")
        c["n2"].stop()  # the only eligible node leaves: n1 still must not take it
        time.sleep(TTL + 1)
    assert not any("n1" in holders for _, holders in sampler.samples)
    assert c["n1"].dnat() == set()


@pytest.mark.parametrize("firewall", BACKENDS)
def test_sigkill_holder_address_expires_by_itself_and_the_other_node_takes_over(cluster_factory, firewall):
    c = cluster_factory(firewall)
    holder, other = one_vip_on_two_nodes(c)
    with AddressSampler(list(c.nodes.values()), VIP) as sampler:
        killed = time.monotonic()
        c[holder].daemon.kill()
        wait_until(lambda: c.holders_of(VIP) == {other}, TTL + 2, message="failover")
        time.sleep(0.2)
    gone = sampler.first(lambda h: holder not in h, after=killed)
    taken = sampler.first(lambda h: other in h, after=killed)
    assert gone is not None and gone - killed < TTL, "the kernel removed the dead holder's address"
    assert taken - killed <= TTL + 1, f"failover took {taken - killed:.2f}s"
    assert not sampler.overlaps(), "never both at once"
    assert c.lock_holder(VIP) == other


@pytest.mark.parametrize("firewall", BACKENDS)
def test_sigterm_hands_over_within_200ms(cluster_factory, firewall):
    c = cluster_factory(firewall)
    holder, other = one_vip_on_two_nodes(c)
    time.sleep(0.5)
    with AddressSampler(list(c.nodes.values()), VIP) as sampler:
        asked = time.monotonic()
        c[holder].daemon.signal(signal.SIGTERM)
        # Wait on the sampler (netlink), not on `ip addr` processes: spawning
        # them every 20 ms would compete with the daemons for the two cores.
        wait_until(lambda: sampler.first(lambda h: h == {other}, after=asked), 3, interval=0.05,
                   message="handover")
    assert c.holders_of(VIP) == {other}
    taken = sampler.first(lambda h: other in h, after=asked)
    assert taken - asked < 0.2, f"handover took {taken - asked:.3f}s"
    assert not sampler.overlaps()
    assert c[holder].daemon.process.wait(5) == 0, "a clean stop exits with status 0"
    assert c[holder].dnat() == set() and c[holder].addresses() == set()


@pytest.mark.parametrize("firewall", BACKENDS)
def test_sigstop_holder_drops_before_the_other_node_adds(cluster_factory, firewall):
    c = cluster_factory(firewall)
    holder, other = one_vip_on_two_nodes(c)
    with AddressSampler(list(c.nodes.values()), VIP) as sampler:
        c[holder].daemon.signal(signal.SIGSTOP)
        try:
            wait_until(lambda: c.holders_of(VIP) == {other}, TTL + 2, message="the other node takes over")
            time.sleep(1.5)
        finally:
            c[holder].daemon.signal(signal.SIGCONT)
        time.sleep(1.5)  # resumed: it must fence, not announce or re-add
    assert not sampler.overlaps(), "never both at once"
    assert c.holders_of(VIP) == {other}
    assert c[holder].dnat() == set()
    log = c[holder].daemon.log()
    assert "announced" not in log.split("fencing")[-1]


@pytest.mark.parametrize("firewall", BACKENDS)
def test_etcd_stopped_holder_drops_within_ttl_and_retakes(cluster_factory, private_etcd, firewall):
    c = cluster_factory(firewall, etcd=private_etcd)
    both_run(c)
    c.put_vip(VIP, vip_value("hello", "web", WEB))
    c.start()
    holder = wait_until(lambda: next(iter(c.holders_of(VIP)), None), 10)
    wait_until(lambda: c.lock_holder(VIP) == holder, 5)
    time.sleep(0.5)
    private_etcd.stop()
    stopped = time.monotonic()
    wait_until(lambda: c.holders_of(VIP) == set() and c[holder].dnat() == set(), TTL, message="holder fenced")
    assert time.monotonic() - stopped < TTL
    time.sleep(1)
    assert c.holders_of(VIP) == set(), "nobody holds it while etcd is away"
    private_etcd.start()
    wait_until(lambda: len(c.holders_of(VIP)) == 1, 15, message="retaken after etcd returns")
    assert c.holders_of(VIP) == {c.lock_holder(VIP)}


def test_holder_cut_off_from_etcd_fences_before_the_other_node_takes_over(cluster_factory):
    c = cluster_factory()
    holder, other = one_vip_on_two_nodes(c)
    wait_until(lambda: c.lock_holder(VIP) == holder, 5)
    with AddressSampler(list(c.nodes.values()), VIP) as sampler:
        cut = time.monotonic()
        c[holder].forwarder.cut()
        wait_until(lambda: c.holders_of(VIP) == {other}, TTL + 2, message="the other node takes over")
        c[holder].forwarder.heal()
        time.sleep(2)  # healed: the old holder's lease is gone, it must not come back
    dropped = sampler.first(lambda h: holder not in h, after=cut)
    assert dropped - cut < TTL - 0.5, f"fenced after {dropped - cut:.2f}s"
    assert not sampler.overlaps()
    assert c.holders_of(VIP) == {other} and c.lock_holder(VIP) == other
    assert c[holder].dnat() == set()


def test_address_removed_by_hand_is_restored_within_a_second(cluster_factory):
    c = cluster_factory(nodes=1)
    c.put_pods("hello", "web", [(1, "n1", "10.77.0.11")])
    c.put_vip(VIP, vip_value("hello", "web", WEB))
    c.start()
    wait_until(lambda: VIP in c["n1"].addresses(), 10)
    c["n1"].ns.run("ip", "addr", "del", f"{VIP}/32", "dev", "eth0")
    deleted = time.monotonic()
    wait_until(lambda: VIP in c["n1"].addresses(), 1.0, interval=0.01, message="restored")
    assert time.monotonic() - deleted < 1.0
    wait_until(lambda: c["n1"].daemon.log().count("announced") >= 2, 1, message="announced again")


def valid_lifetime(node, ip: str) -> str | None:
    """``valid_lft`` of ``ip``/32 on the node's eth0 as ``ip`` prints it ("forever", "2sec"), None if absent."""
    words = node.ns.run("ip", "-o", "-4", "addr", "show", "dev", "eth0").stdout.split()
    for i, word in enumerate(words):
        if word == f"{ip}/32":
            return words[words.index("valid_lft", i) + 1]
    return None


def test_an_address_someone_else_adds_or_makes_permanent_is_undone_at_once(cluster_factory):
    """The periodic read-back of the interface is a slow anti-entropy pass (every 10 s): what someone
    else adds on it arrives as a netlink event, so the VIP nobody gave us and the held VIP made permanent
    (both would outlive our lease) are undone within a fraction of a second, not at the next read-back."""
    c = cluster_factory(nodes=1)
    n1 = c["n1"]
    c.put_pods("hello", "web", [(1, "n1", "10.77.0.11")])
    c.put_pods("other", "web", [(1, "ghost", "10.77.0.99")])
    c.put_vip(VIP, vip_value("hello", "web", WEB))
    c.put_vip("10.77.0.101", vip_value("other", "web", WEB))  # configured, never ours to hold
    c.start()
    wait_until(lambda: VIP in n1.addresses(), 10)
    time.sleep(1.5)  # past start-up's own read-backs
    n1.ns.run("ip", "addr", "add", "10.77.0.101/32", "dev", "eth0")
    added = time.monotonic()
    wait_until(lambda: "10.77.0.101" not in n1.addresses(), 2, interval=0.01, message="foreign VIP removed")
    assert time.monotonic() - added < 0.5
    assert "is on the interface but not held here; removing it" in n1.daemon.log()

    n1.ns.run("ip", "addr", "replace", f"{VIP}/32", "dev", "eth0")  # valid_lft forever
    made_permanent = time.monotonic()
    wait_until(lambda: valid_lifetime(n1, VIP) not in ("forever", None), 2, interval=0.01,
               message="a lease-bound lifetime again")
    # Either the event's read-back ("past the lease deadline") or the next renewal, which comes with
    # each acknowledged keep-alive, may get there first: both give the lifetime back its bound.
    assert time.monotonic() - made_permanent < 0.5


def test_our_chains_flushed_by_someone_else_are_restored_at_once_on_nftables(cluster_factory):
    """With iptables-nft the periodic read-back of our chains is a slow anti-entropy pass (every 60 s):
    nf_tables announces every change to the nat table, so a flush is undone within a fraction of a
    second, not at the next read-back."""
    c = cluster_factory("nft", nodes=1)
    n1 = c["n1"]
    c.put_pods("hello", "web", [(1, "n1", "10.77.0.11")])
    c.put_vip(VIP, vip_value("hello", "web", WEB))
    c.start()
    wait_until(lambda: VIP in n1.addresses() and len(n1.dnat()) == 2, 10)
    wanted = n1.dnat()
    time.sleep(1.0)  # past start-up's own read-backs
    for chain in ("lain-PREROUTING", "lain-OUTPUT"):
        n1.ns.run("iptables-nft", "-t", "nat", "-F", chain)
    flushed = time.monotonic()
    wait_until(lambda: n1.dnat() == wanted, 3, interval=0.02, message="our DNAT rules restored")
    assert time.monotonic() - flushed < 1.0


@pytest.mark.parametrize("firewall", BACKENDS)
def test_restart_after_sigkill_leaves_no_stale_address_or_rule(cluster_factory, firewall):
    c = cluster_factory(firewall, nodes=1)
    n1 = c["n1"]
    c.put_pods("hello", "web", [(1, "n1", "10.77.0.11")])
    c.put_vip(VIP, vip_value("hello", "web", WEB))
    c.start()
    wait_until(lambda: VIP in n1.addresses() and n1.dnat(), 10)
    n1.daemon.kill()
    n1.ns.run("ip", "addr", "replace", f"{VIP}/32", "dev", "eth0")  # a stale address without lifetime
    assert n1.dnat(), "rules outlive a SIGKILL"
    first = n1.daemon
    n1.start()
    # Our old lease still holds the lock: the new process cleans up, then waits for it.
    assert c.lock_holder(VIP) == "n1"
    wait_until(lambda: VIP not in n1.addresses() and not n1.dnat(), 2, message="stale state removed")
    wait_until(lambda: VIP in n1.addresses() and n1.dnat(), TTL + 3, message="retaken on a new lease")
    assert first is not n1.daemon


def test_four_vips_over_two_nodes_of_one_proc_are_two_and_two(cluster_factory):
    c = cluster_factory()
    both_run(c)
    vips = [f"10.77.0.{100 + i}" for i in range(4)]
    for ip in vips:
        c.put_vip(ip, vip_value("hello", "web", WEB))
    c.start("n1")
    wait_until(lambda: all(c.holders_of(ip) == {"n1"} for ip in vips), 10, message="n1 holds all four")
    c.start("n2")

    def counts():
        held = {ip: c.holders_of(ip) for ip in vips}
        if any(len(h) != 1 for h in held.values()):
            return None
        n1 = sum(1 for h in held.values() if h == {"n1"})
        return (n1, 4 - n1) if n1 == 2 else None

    wait_until(counts, 10, interval=0.1, message="two and two")
    time.sleep(1.5)
    assert counts() == (2, 2), "stable"


def test_gratuitous_arp_within_10ms_both_forms_repeated_and_on_link_up(cluster_factory):
    from tests.support.vipnodes import ArpWatch

    c = cluster_factory(nodes=1)
    c.put_pods("hello", "web", [(1, "n1", "10.77.0.11")])
    c.start()
    watch = ArpWatch(c["n1"].ns.name, VIP)
    try:
        c.put_vip(VIP, vip_value("hello", "web", WEB))
        wait_until(lambda: watch.added and len(watch.frames) >= 6, 6, message=f"three rounds of ARP: {watch.added} {watch.frames}")
        added = watch.added[0]
        first = watch.frames[0][0]
        assert 0 <= first - added < 0.010, f"first ARP {1000 * (first - added):.1f} ms after the address"
        ops = [op for _, op in watch.frames[:2]]
        assert sorted(ops) == [1, 2], "an ARP request and an ARP reply"
        rounds = [t - added for t, op in watch.frames if op == 1]
        assert rounds[1] == pytest.approx(1.0, abs=0.15) and rounds[2] == pytest.approx(3.0, abs=0.15), rounds

        sent = len(watch.frames)
        c["n1"].ns.run("ip", "link", "set", "eth0", "down")
        time.sleep(0.2)
        c["n1"].ns.run("ip", "link", "set", "eth0", "up")
        wait_until(lambda: len(watch.frames) >= sent + 2, 3, message="ARP again on link up")
    finally:
        watch.close()
