"""VIP configs and deployd pod groups: parsing and validation, key by key."""

from __future__ import annotations

import json

import pytest

from networkd.vips.model import Container, InvalidValue, PortMap, parse_pod_group, parse_vip, parse_vips
from tests.support.vipnodes import pod_group


def vip(**fields) -> str:
    return json.dumps({"app": "hello", "proc": "web", "ports": [{"src": "80"}], **fields})


def test_floating_vip_with_defaults():
    config = parse_vip("10.0.0.5", vip())
    assert config.floating and not config.node_local
    assert (config.ip, config.app, config.proc) == ("10.0.0.5", "hello", "web")
    assert config.ports == (PortMap("tcp", 80, 80),)
    assert config.excluded_nodes == frozenset()


def test_ports_keyed_by_proto_and_src_bug9():
    config = parse_vip("10.0.0.5", vip(ports=[{"src": "53", "proto": "udp"}, {"src": 53, "dest": "5353"}]))
    assert config.ports == (PortMap("tcp", 53, 5353), PortMap("udp", 53, 53))


def test_port_scoped_keys_take_src_from_the_key():
    config = parse_vip("0.0.0.0:8080", vip(ports=[{"dest": "80"}, {"proto": "udp"}]))
    assert not config.floating and config.node_local and config.port == 8080
    assert config.ports == (PortMap("tcp", 8080, 80), PortMap("udp", 8080, 8080))
    scoped = parse_vip("10.0.0.9:7000", vip(ports=[{}]))
    assert (scoped.ip, scoped.port, scoped.ports) == ("10.0.0.9", 7000, (PortMap("tcp", 7000, 7000),))


@pytest.mark.parametrize("key, value, error", [
    ("10.0.0.256", vip(), "not an IPv4 address"),
    ("10.0.0.5:80:90", vip(), "not IP or IP:PORT"),
    ("0.0.0.0", vip(), "cannot be a floating VIP"),
    ("127.0.0.1", vip(), "cannot be a floating VIP"),
    ("10.0.0.5:0", vip(), "not a port"),
    ("10.0.0.5", "", "not JSON"),
    ("10.0.0.5", "[]", "JSON object"),
    ("10.0.0.5", vip(app=""), "app"),
    ("10.0.0.5", vip(proc=None), "proc"),
    ("10.0.0.5", vip(ports=[]), "non-empty list"),
    ("10.0.0.5", vip(ports=[{"src": "http"}]), "ports[0].src"),
    ("10.0.0.5", vip(ports=[{"src": "70000"}]), "1-65535"),
    ("10.0.0.5", vip(ports=[{"src": "80", "dest": "-1"}]), "ports[0].dest"),
    ("10.0.0.5", vip(ports=[{"src": "80", "proto": "sctp"}]), "not tcp or udp"),
    ("10.0.0.5", vip(ports=[{"src": "80"}, {"src": 80, "proto": "TCP"}]), "listed twice"),
    ("10.0.0.5", vip(ports=[{"src": True}]), "not a port"),
    ("10.0.0.5", vip(excluded_nodes="node1"), "excluded_nodes"),
])
def test_invalid_values_say_why(key, value, error):
    with pytest.raises(InvalidValue, match=error.replace("[", r"\[").replace("]", r"\]")):
        parse_vip(key, value)


def test_one_bad_key_never_blocks_the_others_bug5():
    configs, errors = parse_vips(
        {"10.0.0.5": vip(), "10.0.0.6": "{not json", "10.0.0.7": vip(ports=[{"src": "99999"}])},
        "/lain/config/vips/",
    )
    assert list(configs) == ["10.0.0.5"]
    assert set(errors) == {"/lain/config/vips/10.0.0.6", "/lain/config/vips/10.0.0.7"}
    assert errors["/lain/config/vips/10.0.0.6"].startswith("/lain/config/vips/10.0.0.6: ")


def test_pod_group_as_deployd_writes_it():
    raw = pod_group("hello", "web", [(1, "node1", "10.1.0.1", "172.20.0.5"), (2, "node2", "10.1.0.2", "172.20.0.9")])
    assert parse_pod_group("hello/hello.proc.web", raw) == [
        Container("hello", "web", 1, "node1", "10.1.0.1", "172.20.0.5", 80),
        Container("hello", "web", 2, "node2", "10.1.0.2", "172.20.0.9", 80),
    ]


def test_unplaced_containers_are_skipped_and_garbage_is_an_error():
    raw = json.dumps({"Spec": {"Name": "a.worker.w", "Namespace": "a"},
                      "Pods": [{"InstanceNo": 1, "Containers": [{"NodeName": "", "ContainerIp": ""}]}]})
    assert parse_pod_group("a/a.worker.w", raw) == []
    for bad in ("", "{}", '{"Spec": {"Name": "x"}}', '{"Spec": {"Name": "a.b", "Namespace": "a"}, "Pods": [{}]}'):
        with pytest.raises(InvalidValue):
            parse_pod_group("a/x", bad)


def test_pod_state_and_health_as_deployd_writes_them():
    """deployd flattens the pod's runtime (State, Healthst) beside InstanceNo; absent = an older writer."""
    raw = pod_group("hello", "web", [(1, "n1", "10.1.0.1", "172.20.0.1"), (2, "n2", "10.1.0.2", "172.20.0.2"),
                                     (3, "n3", "10.1.0.3", "172.20.0.3")],
                    states={1: {"State": 2, "Healthst": 2}, 2: {"State": 3, "Healthst": 0}})
    got = {c.instance: (c.state, c.health, c.candidate) for c in parse_pod_group("hello/hello.proc.web", raw)}
    assert got == {1: (2, 2, True), 2: (3, 0, False), 3: (None, None, True)}


@pytest.mark.parametrize("state, health, candidate", [
    (None, None, True), (2, None, True), (2, 0, True), (2, 2, True),
    (0, None, False), (1, None, False), (3, 0, False), (4, 2, False),  # pending, drift, exit, fail
    (2, 1, False), (2, 3, False), (None, 3, False),  # starting, unhealthy
])
def test_only_running_not_unhealthy_pods_are_candidates(state, health, candidate):
    assert Container("a", "w", 1, "n1", "", "172.20.0.1", state=state, health=health).candidate is candidate


@pytest.mark.parametrize("fields, error", [
    ({"State": "2"}, "Pods[0].State '2' is not an integer"),
    ({"State": True}, "Pods[0].State True is not an integer"),
    ({"Healthst": 2.5}, "Pods[0].Healthst 2.5 is not an integer"),
    ({"Healthst": [2]}, "Pods[0].Healthst [2] is not an integer"),
])
def test_bad_state_or_health_is_an_invalid_value_naming_the_field(fields, error):
    raw = pod_group("hello", "web", [(1, "n1", "10.1.0.1", "172.20.0.1")], states={1: fields})
    with pytest.raises(InvalidValue, match=error.replace("[", r"\[").replace("]", r"\]")):
        parse_pod_group("hello/hello.proc.web", raw)
