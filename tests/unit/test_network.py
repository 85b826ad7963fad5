"""Overlay addressing (pure): MACs from IPs, IP choice, fixed IPs in specs, desired FDB."""

from __future__ import annotations

import dataclasses
import random

import pytest

from sigmad.config import NodeConfig, node_config
from sigmad.errors import SpecError
from sigmad.models import Instance, Node
from sigmad.network.ipam import OverlayNet, choose, mac_for
from sigmad.node.tunnels import desired_fdb, fdb_input, tunnel_for
from sigmad.reasons import State
from sigmad.spec import Fields, validate
from sigmad.state.cache import INSTANCES, NODES
from sigmad.store import Versioned

NET = OverlayNet("10.244.0.0/16")


def test_mac_is_derived_from_the_ip() -> None:
    assert mac_for("10.244.3.4") == "0a:58:0a:f4:03:04"
    assert mac_for("10.244.0.1") == "0a:58:0a:f4:00:01"


@pytest.mark.parametrize(("ip", "why"), [
    ("10.244.9.9", ""),
    ("10.245.0.1", "10.245.0.1 is outside the cluster network 10.244.0.0/16"),
    ("10.244.0.1", "10.244.0.1 is reserved in 10.244.0.0/16 (network, gateway or broadcast "
                   "address)"),
    ("10.244.255.255", "10.244.255.255 is reserved in 10.244.0.0/16 (network, gateway or "
                       "broadcast address)"),
    ("nope", "'nope' is not an IPv4 address"),
])
def test_usable(ip: str, why: str) -> None:
    assert NET.usable(ip) == why


def test_pick_never_returns_a_taken_or_reserved_address_until_full() -> None:
    net = OverlayNet("10.1.2.0/29")  # 8 addresses: network, gateway, broadcast and 5 usable
    taken: set[str] = set()
    rng = random.Random(1)
    for _ in range(5):
        ip = net.pick(taken, rng)
        assert ip is not None and not net.usable(ip) and ip not in taken
        taken.add(ip)
    assert net.pick(taken, rng) is None
    assert taken == {f"10.1.2.{n}" for n in range(2, 7)}


def test_choose_keeps_the_held_ip_and_prefers_the_fixed_one() -> None:
    assert choose(NET, "", "10.244.7.7", {"10.244.7.7"}) == ("10.244.7.7", "")
    assert choose(NET, "10.244.1.1", "10.244.7.7", set()) == ("10.244.1.1", "")
    assert choose(NET, "10.244.1.1", "10.244.1.1", {"10.244.1.1"}) == ("10.244.1.1", "")
    ip, why = choose(NET, "", "", {"10.244.7.7"}, random.Random(2))
    assert why == "" and ip != "10.244.7.7" and not NET.usable(ip)
    # A held address from before the overlay (Docker's own) is replaced by a cluster one.
    ip, _ = choose(NET, "", "172.17.0.2", set())
    assert ip.startswith("10.244.")


def test_choose_explains_a_fixed_ip_it_cannot_have() -> None:
    assert choose(NET, "10.244.1.1", "", {"10.244.1.1"}) == (
        "", "network.ip: 10.244.1.1 is held by another instance")
    assert choose(NET, "192.168.0.1", "", set()) == (
        "", "network.ip: 192.168.0.1 is outside the cluster network 10.244.0.0/16")
    full = OverlayNet("10.1.2.0/30")  # one usable address
    assert choose(full, "", "", {"10.1.2.2"}) == (
        "", "no free address left in the overlay network 10.1.2.0/30")


def spec_with(ip: object, replicas: int = 1) -> object:
    return validate({"app": "db", "replicas": replicas, "network": {"ip": ip},
                     "containers": [{"name": "main", "image": "busybox"}]})


def test_fixed_ips_in_the_spec() -> None:
    spec = spec_with("10.244.5.5")
    assert spec.network.ips == ["10.244.5.5"]  # type: ignore[attr-defined]
    spec = spec_with(["10.244.5.5", "10.244.5.6"], replicas=2)
    assert spec.network.fixed_ip(1) == "10.244.5.6"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("ip", "replicas", "field", "message"), [
    ("10.244.5", 1, "network.ip", "'10.244.5' is not an IPv4 address"),
    (["10.244.5.5", 7], 2, "network.ip[1]", "7 is not an IPv4 address"),
    (["10.244.5.5", "10.244.5.5"], 2, "network.ip[1]", "10.244.5.5 is listed twice"),
    ("10.244.5.5", 2, "network.ip", "1 fixed IP(s) for 2 replicas"),
    ([], 1, "network.ip", "must be an IPv4 address, or a list"),
])
def test_bad_fixed_ips_name_the_field(ip: object, replicas: int, field: str,
                                      message: str) -> None:
    with pytest.raises(SpecError) as info:
        spec_with(ip, replicas)
    assert info.value.field == field
    assert message in info.value.message


def test_node_config_checks_the_overlay_cidr() -> None:
    assert node_config(Fields("", {"overlay_cidr": "10.9.0.0/16"}, "")).overlay_cidr == \
        "10.9.0.0/16"
    with pytest.raises(SpecError) as info:
        node_config(Fields("", {"overlay_cidr": "10.9.0.0/30"}, ""))
    assert info.value.field == "overlay_cidr"


def inst(app: str, index: int, ip: str, node: str) -> Instance:
    return Instance("ns", app, index, 1, ip=ip, node=node)


def test_desired_fdb_points_remote_macs_at_their_vteps_and_floods_to_peers() -> None:
    nodes = [Node("h1", "e", "10.77.0.11"), Node("h2", "e", "10.77.0.12"),
             Node("h3", "e", "10.77.0.13"), Node("h4", "e", "")]
    instances = [inst("web", 0, "10.244.0.5", "h1"), inst("web", 1, "10.244.0.6", "h2"),
                 inst("web", 2, "10.244.0.7", "h4"), inst("web", 3, "", "h3"),
                 inst("web", 4, "10.244.0.8", "")]
    remote, peers = desired_fdb("h1", nodes, instances)
    assert remote == {mac_for("10.244.0.6"): "10.77.0.12"}
    assert peers == {"10.77.0.12", "10.77.0.13"}


def test_a_single_host_has_no_tunnel() -> None:
    assert tunnel_for(NodeConfig(address="")) is None
    assert tunnel_for(NodeConfig(address="127.0.0.1")) is None
    tunnel = tunnel_for(NodeConfig(address="10.77.0.11"))
    assert tunnel is not None and tunnel.local == "10.77.0.11"
    assert tunnel.gateway_mac == mac_for("10.244.0.1")


def test_only_an_ip_node_or_address_change_is_an_fdb_change() -> None:
    """A burst changes each instance's state several times: only its IP or node (or a
    node's address) may wake the agent's FDB sync."""
    def v(value: object) -> Versioned[object]:
        return Versioned("k", value, 1)

    placed = inst("web", 0, "10.244.0.5", "h1")
    running = dataclasses.replace(placed, state=State.RUNNING)
    moved = dataclasses.replace(placed, node="h2")
    assert fdb_input(INSTANCES, v(placed)) == fdb_input(INSTANCES, v(running))
    assert fdb_input(INSTANCES, v(placed)) != fdb_input(INSTANCES, v(moved))
    assert fdb_input(INSTANCES, None) != fdb_input(INSTANCES, v(placed))
    node = Node("h1", "e", "10.77.0.11")
    assert fdb_input(NODES, v(node)) != fdb_input(NODES, v(dataclasses.replace(
        node, address="10.77.0.12")))
