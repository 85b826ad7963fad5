"""Placement over a snapshot: accounting, filters and the reason for every instance left
unplaced (rankers and strategies: test_scheduler_rankers.py)."""

from __future__ import annotations

import copy
import random

from sigmad.models import Instance, Node, Overcommit
from sigmad.scheduler import (
    Binding,
    Decision,
    NodeInfo,
    Request,
    Snapshot,
    build_snapshot,
)
from sigmad.scheduler import place as place_decision
from sigmad.spec import Expression, Placement, Resources

GI = 2**30


def node(
    name: str,
    cpu_m: int = 4000,
    memory: int = 8 * GI,
    labels: dict[str, str] | None = None,
    ready: bool = True,
    draining: bool = False,
    requested: Resources | None = None,
    **kw: object,
) -> NodeInfo:
    return NodeInfo(
        name, labels or {}, Resources(cpu_m, memory), ready, draining,
        requested or Resources(), **kw,  # type: ignore[arg-type]
    )


def snap(*nodes: NodeInfo) -> Snapshot:
    return Snapshot(revision=42, nodes={n.name: n for n in nodes})


def req(key: str, cpu_m: int = 0, memory: int = 0, ports: int = 0,
        placement: Placement | None = None, **labels: str) -> Request:
    return Request(key, "ns/web", Resources(cpu_m, memory),
                   placement or Placement(labels=labels), ports)


def place(s: Snapshot, requests: list[Request], seed: int = 1) -> tuple[dict[str, str],
                                                                          dict[str, str]]:
    """(key → node, key → reason): the decision without ports and counts."""
    d = place_decision(s, requests, random.Random(seed))
    return ({k: b.node for k, b in d.placed.items()},
            {k: u.reason for k, u in d.unplaced.items()})


# --- place -------------------------------------------------------------------------------------


def test_spread_picks_the_least_requested_node() -> None:
    s = snap(node("c", requested=Resources(2000, 0)), node("a", requested=Resources(1000, 0)),
             node("b"))
    placed, unplaced = place(s, [req("ns/web-0", 100, GI)])
    assert placed == {"ns/web-0": "b"}
    assert unplaced == {}


def test_spread_spreads_equal_instances_over_equal_nodes() -> None:
    placed, _ = place(snap(node("b"), node("a")), [req(f"ns/web-{i}", 1000, GI) for i in range(4)])
    assert sorted(placed.values()) == ["a", "a", "b", "b"]


def test_requests_accumulate_within_one_call() -> None:
    s = snap(node("a", cpu_m=1000), node("b", cpu_m=1000))
    placed, unplaced = place(s, [req("x", 600), req("y", 600), req("z", 600)])
    assert placed == {"x": "a", "y": "b"}
    assert unplaced == {
        "z": "2 nodes: insufficient cpu (need 600m, best free 400m)",
    }


def test_memory_accumulates_within_one_call() -> None:
    s = snap(node("a", memory=3 * GI))
    placed, unplaced = place(s, [req("x", 0, 2 * GI), req("y", 0, 2 * GI)])
    assert placed == {"x": "a"}
    assert unplaced == {"y": "1 node: insufficient memory (need 2Gi, best free 1Gi)"}


def test_exact_fit_is_accepted() -> None:
    placed, _ = place(snap(node("a", cpu_m=1000, memory=GI)), [req("x", 1000, GI)])
    assert placed == {"x": "a"}


def test_labels_select_the_node() -> None:
    s = snap(node("a", labels={"zone": "bj-1"}), node("b", labels={"zone": "bj-2", "ssd": "y"}))
    placed, unplaced = place(s, [req("x", zone="bj-2"), req("y", zone="bj-2", ssd="y")])
    assert placed == {"x": "b", "y": "b"}
    assert unplaced == {}


def test_labels_mismatch_reason() -> None:
    s = snap(node("a", labels={"zone": "bj-1"}), node("b"))
    placed, unplaced = place(s, [req("x", zone="sh-1")])
    assert placed == {}
    assert unplaced == {"x": "2 nodes: labels mismatch"}


def test_all_required_labels_must_match() -> None:
    s = snap(node("a", labels={"zone": "bj-1", "disk": "hdd"}))
    _, unplaced = place(s, [req("x", zone="bj-1", disk="ssd")])
    assert unplaced == {"x": "1 node: labels mismatch"}


def test_insufficient_cpu_reason_with_need_and_best_free() -> None:
    s = snap(
        node("a", cpu_m=2000, requested=Resources(1500, 0)),
        node("b", cpu_m=2000, requested=Resources(500, 0)),
    )
    placed, unplaced = place(s, [req("x", 2000)])
    assert placed == {}
    assert unplaced == {"x": "2 nodes: insufficient cpu (need 2, best free 1.5)"}


def test_insufficient_memory_reason_with_need_and_best_free() -> None:
    s = snap(node("a", memory=4 * GI, requested=Resources(0, 3 * GI)))
    _, unplaced = place(s, [req("x", 0, 2 * GI)])
    assert unplaced == {"x": "1 node: insufficient memory (need 2Gi, best free 1Gi)"}


def test_cpu_is_checked_before_memory() -> None:
    _, unplaced = place(snap(node("a", cpu_m=100, memory=GI)), [req("x", 200, 2 * GI)])
    assert unplaced == {"x": "1 node: insufficient cpu (need 200m, best free 100m)"}


def test_not_ready_and_draining_nodes_skipped() -> None:
    s = snap(node("a", ready=False), node("b", draining=True), node("c"))
    placed, _ = place(s, [req("x", 100)])
    assert placed == {"x": "c"}


def test_reasons_are_counted_per_filter_most_common_first() -> None:
    s = snap(
        node("a", ready=False), node("b", draining=True), node("c", draining=True),
        node("d", labels={"zone": "z2"}),
    )
    _, unplaced = place(s, [req("x", zone="z1")])
    assert unplaced == {
        "x": "2 nodes: node draining; 1 node: labels mismatch; 1 node: node not ready"
    }


def test_not_ready_wins_over_other_filters() -> None:
    # A not-ready node is reported as such even if it also lacks labels and room.
    s = snap(node("a", cpu_m=0, ready=False))
    _, unplaced = place(s, [req("x", 100, zone="z")])
    assert unplaced == {"x": "1 node: node not ready"}


def test_best_effort_fits_on_a_full_node() -> None:
    full = node("a", cpu_m=1000, memory=GI, requested=Resources(1000, GI))
    placed, unplaced = place(snap(full), [req("x", 0, 0), req("y", 0, 0)])
    assert placed == {"x": "a", "y": "a"}
    assert unplaced == {}


def test_best_effort_still_respects_readiness_and_labels() -> None:
    _, unplaced = place(snap(node("a", ready=False)), [req("x")])
    assert unplaced == {"x": "1 node: node not ready"}
    _, unplaced = place(snap(node("a")), [req("y", zone="z")])
    assert unplaced == {"y": "1 node: labels mismatch"}


def test_no_nodes_registered() -> None:
    placed, unplaced = place(snap(), [req("x", 100), req("y")])
    assert placed == {}
    assert unplaced == {"x": "no nodes registered", "y": "no nodes registered"}


def test_no_requests() -> None:
    assert place_decision(snap(node("a")), []) == Decision()


def test_input_snapshot_is_not_mutated() -> None:
    s = snap(node("a", cpu_m=1000, requested=Resources(100, GI), ports={31000},
                  port_range=(31000, 31003), apps={"ns/web": 1}, labels={"zone": "z1"}),
             node("b", cpu_m=1000, port_range=(31000, 31003), labels={"zone": "z2"}))
    before = copy.deepcopy(s)
    spread = Placement(spread="zone")
    d = place_decision(s, [req("x", 800, GI, 2, spread), req("y", 100, 0, 1, spread),
                           req("z", 800, GI, 3)], random.Random(3))
    assert set(d.placed) == {"x", "y"} and set(d.unplaced) == {"z"}
    assert s == before
    assert s.nodes["a"].requested == Resources(100, GI)
    assert s.nodes["a"].ports == {31000}


def test_place_is_deterministic_with_a_seeded_rng() -> None:
    s = snap(node("b", cpu_m=1000), node("a", cpu_m=1000), node("c", cpu_m=500))
    reqs = [req(f"k{i}", 200, ports=1) for i in range(8)]
    first = place_decision(s, reqs, random.Random(7))
    assert first == place_decision(s, reqs, random.Random(7))
    assert len(first.placed) == 8


def test_best_free_only_counts_nodes_that_passed_the_other_filters() -> None:
    s = snap(node("a", cpu_m=8000, ready=False), node("b", cpu_m=1000))
    _, unplaced = place(s, [req("x", 2000)])
    assert unplaced == {
        "x": "1 node: insufficient cpu (need 2, best free 1); 1 node: node not ready"
    }


# --- build_snapshot ----------------------------------------------------------------------------


def a_node(name: str, cpu_m: int = 4000, memory: int = 8 * GI, **kw: object) -> Node:
    return Node(
        name=name, engine="unix:///var/run/docker.sock",
        capacity=Resources(cpu_m + 500, memory + GI), allocatable=Resources(cpu_m, memory),
        **kw,  # type: ignore[arg-type]
    )


def an_instance(index: int, node_name: str, cpu_m: int, memory: int) -> Instance:
    return Instance(
        namespace="ns", app="web", index=index, generation=1, node=node_name,
        request=Resources(cpu_m, memory),
    )


def test_build_snapshot_subtracts_bound_requests() -> None:
    nodes = [a_node("a"), a_node("b")]
    instances = [
        an_instance(0, "a", 1000, GI),
        an_instance(1, "a", 500, GI),
        an_instance(2, "b", 250, 0),
        an_instance(3, "", 3000, 3 * GI),  # pending: books nothing
        an_instance(4, "gone", 3000, 3 * GI),  # bound to an unknown node: ignored
    ]
    s = build_snapshot(nodes, {"a", "b"}, instances, revision=7)
    assert s.revision == 7
    assert set(s.nodes) == {"a", "b"}
    assert s.nodes["a"].requested == Resources(1500, 2 * GI)
    assert s.nodes["a"].free() == Resources(2500, 6 * GI)
    assert s.nodes["b"].free() == Resources(3750, 8 * GI)


def test_build_snapshot_uses_allocatable_not_capacity() -> None:
    s = build_snapshot([a_node("a", cpu_m=2000, memory=GI)], {"a"}, [], revision=1)
    assert s.nodes["a"].allocatable == Resources(2000, GI)
    assert s.nodes["a"].free() == Resources(2000, GI)


def test_build_snapshot_readiness_draining_and_labels() -> None:
    nodes = [a_node("a", labels={"zone": "z1"}), a_node("b", draining=True), a_node("c")]
    s = build_snapshot(nodes, {"a", "b"}, [], revision=1)
    assert (s.nodes["a"].ready, s.nodes["a"].draining) == (True, False)
    assert (s.nodes["b"].ready, s.nodes["b"].draining) == (True, True)
    assert (s.nodes["c"].ready, s.nodes["c"].draining) == (False, False)
    assert s.nodes["a"].labels == {"zone": "z1", "sigma.node": "a"}  # (its name, implied)


def test_build_snapshot_does_not_touch_the_records() -> None:
    nodes = [a_node("a", labels={"zone": "z1"})]
    before = copy.deepcopy(nodes)
    s = build_snapshot(nodes, {"a"}, [an_instance(0, "a", 1000, GI)], revision=1)
    s.nodes["a"].labels["zone"] = "changed"
    place(s, [req("x", 1000)])
    assert nodes == before


def test_snapshot_then_place_end_to_end() -> None:
    nodes = [a_node("a", cpu_m=2000), a_node("b", cpu_m=2000)]
    instances = [an_instance(0, "a", 1500, 0)]
    s = build_snapshot(nodes, {"a", "b"}, instances, revision=3)
    placed, unplaced = place(s, [req("ns/web-1", 1000), req("ns/web-2", 500)])
    # web-1 fits only on b; b still has the larger free share for web-2.
    assert placed == {"ns/web-1": "b", "ns/web-2": "b"}
    assert unplaced == {}


def test_best_effort_fits_on_an_overbooked_node() -> None:
    s = snap(node("a", cpu_m=1000, requested=Resources(1500, 0)))
    placed, unplaced = place(s, [req("x")])
    assert placed == {"x": "a"} and unplaced == {}
    _, unplaced = place(s, [req("y", cpu_m=1)])
    assert unplaced == {"y": "1 node: insufficient cpu (need 1m, best free 0)"}


# --- overcommit, host ports, expressions --------------------------------------------------------


def test_overcommit_ratio_scales_what_requests_may_add_up_to() -> None:
    s = snap(node("a", cpu_m=1000, memory=GI, overcommit=Overcommit(cpu=2.0, memory=1.5)))
    placed, unplaced = place(s, [req("x", 1500, GI), req("y", 500, GI // 2), req("z", 1)])
    assert placed == {"x": "a", "y": "a"}
    assert unplaced == {"z": "1 node: insufficient cpu (need 1m, best free 0)"}


def test_without_overcommit_requests_stop_at_allocatable() -> None:
    _, unplaced = place(snap(node("a", cpu_m=1000)), [req("x", 1001)])
    assert unplaced == {"x": "1 node: insufficient cpu (need 1001m, best free 1)"}


def test_memory_overcommit_is_separate_from_cpu() -> None:
    s = snap(node("a", cpu_m=1000, memory=GI, overcommit=Overcommit(cpu=4.0, memory=1.0)))
    _, unplaced = place(s, [req("x", 100, 2 * GI)])
    assert unplaced == {"x": "1 node: insufficient memory (need 2Gi, best free 1Gi)"}


def test_limits_are_not_booked() -> None:
    inst = an_instance(0, "a", 1000, GI)
    s = build_snapshot([a_node("a", cpu_m=2000, memory=2 * GI)], {"a"}, [inst], revision=1)
    # The instance's limit (a cgroup cap) never enters the snapshot: only its request does.
    assert s.nodes["a"].requested == Resources(1000, GI)
    placed, _ = place(s, [req("x", 1000, GI)])
    assert placed == {"x": "a"}


def test_host_ports_come_from_the_range_and_are_never_reused() -> None:
    s = snap(node("a", port_range=(31000, 31005), ports={31001, 31003}))
    d = place_decision(s, [req("x", ports=2), req("y", ports=2)], random.Random(5))
    given = d.placed["x"].ports + d.placed["y"].ports
    assert sorted(given) == [31000, 31002, 31004, 31005]
    assert d.placed["x"] == Binding("a", d.placed["x"].ports)


def test_host_ports_exhausted() -> None:
    s = snap(node("a", port_range=(31000, 31001), ports={31000}), node("b", ready=False))
    d = place_decision(s, [req("x", ports=1), req("y", ports=1)], random.Random(1))
    assert d.placed == {"x": Binding("a", [31001])}
    assert d.unplaced["y"].reason == (
        "1 node: host ports exhausted (need 1); 1 node: node not ready"
    )
    assert d.unplaced["y"].counts == {"host ports exhausted": 1, "node not ready": 1}


def test_ports_outside_the_range_do_not_count_as_used() -> None:
    s = snap(node("a", port_range=(31000, 31000), ports={8080}))
    placed, _ = place(s, [req("x", ports=1)])
    assert placed == {"x": "a"}


def test_a_port_heavy_node_still_gives_distinct_ports() -> None:
    s = snap(node("a", port_range=(31000, 31099), ports=set(range(31000, 31090))))
    d = place_decision(s, [req(f"k{i}", ports=2) for i in range(5)], random.Random(2))
    given = [p for b in d.placed.values() for p in b.ports]
    assert sorted(given) == list(range(31090, 31100))


def expr(key: str, op: str, *values: str) -> Placement:
    return Placement(expressions=[Expression(key, op, list(values))])


def test_label_expressions() -> None:
    s = snap(node("a", labels={"isp": "ct"}), node("b", labels={"isp": "cu", "ssd": "y"}),
             node("c"))
    cases = {
        "in": (expr("isp", "In", "cu", "cm"), {"b"}),
        "notin": (expr("isp", "NotIn", "ct"), {"b", "c"}),
        "exists": (expr("ssd", "Exists"), {"b"}),
        "absent": (expr("ssd", "DoesNotExist"), {"a", "c"}),
    }
    for name, (placement, allowed) in cases.items():
        reqs = [req(f"{name}{i}", placement=placement) for i in range(12)]
        placed, unplaced = place(s, reqs)
        assert set(placed.values()) == allowed, name
        assert unplaced == {}


def test_labels_and_expressions_combine() -> None:
    s = snap(node("a", labels={"zone": "z1", "isp": "ct"}),
             node("b", labels={"zone": "z1", "isp": "cu"}),
             node("c", labels={"zone": "z2", "isp": "cu"}))
    placement = Placement(labels={"zone": "z1"},
                          expressions=[Expression("isp", "In", ["cu"])])
    placed, _ = place(s, [req(f"k{i}", placement=placement) for i in range(4)])
    assert set(placed.values()) == {"b"}
    _, unplaced = place(s, [req("x", placement=Placement(
        labels={"zone": "z2"}, expressions=[Expression("isp", "NotIn", ["cu"])]))])
    assert unplaced == {"x": "3 nodes: labels mismatch"}


def test_pending_counts_every_filter_once_per_node() -> None:
    s = snap(
        node("a", labels={"zone": "z1"}, ready=False),
        node("b", labels={"zone": "z1"}, memory=GI),
        node("c", labels={"zone": "z1"}, memory=3 * GI, requested=Resources(0, GI)),
        node("d", labels={"zone": "z2"}), node("e", labels={"zone": "z2"}),
        node("f", labels={"zone": "z3"}),
    )
    d = place_decision(s, [req("x", 100, 4 * GI, zone="z1")], random.Random(1))
    assert d.unplaced["x"].reason == (
        "3 nodes: labels mismatch; 2 nodes: insufficient memory (need 4Gi, best free 2Gi); "
        "1 node: node not ready"
    )
    assert d.unplaced["x"].counts == {
        "labels mismatch": 3, "insufficient memory": 2, "node not ready": 1,
    }


def test_best_free_is_never_negative() -> None:
    s = snap(node("a", memory=GI, requested=Resources(0, 2 * GI)))
    _, unplaced = place(s, [req("x", 0, 1)])
    assert unplaced == {"x": "1 node: insufficient memory (need 1, best free 0)"}


def test_identical_requests_after_the_first_unplaced_share_its_reason() -> None:
    s = snap(node("a", cpu_m=1000))
    d = place_decision(s, [req(f"k{i}", 400) for i in range(4)], random.Random(1))
    assert set(d.placed) == {"k0", "k1"}
    assert {k: u.reason for k, u in d.unplaced.items()} == {
        "k2": "1 node: insufficient cpu (need 400m, best free 200m)",
        "k3": "1 node: insufficient cpu (need 400m, best free 200m)",
    }


def test_a_smaller_request_still_fits_after_a_larger_one_did_not() -> None:
    s = snap(node("a", cpu_m=1000, requested=Resources(600, 0)))
    placed, unplaced = place(s, [req("big", 500), req("small", 400)])
    assert placed == {"small": "a"} and set(unplaced) == {"big"}


def test_build_snapshot_books_ports_replicas_and_locks() -> None:
    nodes = [a_node("a", port_range=[32000, 32010], overcommit=Overcommit(2.0, 1.5)),
             a_node("b")]
    one = an_instance(0, "a", 100, 0)
    one.host_ports = {"http": 32001, "admin": 32002}
    two = an_instance(1, "a", 100, 0)
    s = build_snapshot(nodes, {"a", "b"}, [one, two], revision=5, locks={"a": 17})
    a, b = s.nodes["a"], s.nodes["b"]
    assert a.ports == {32001, 32002} and a.free_ports() == 9
    assert a.port_range == (32000, 32010)
    assert a.apps == {"ns/web": 2} and b.apps == {}
    assert (a.lock, b.lock) == (17, 0)
    assert a.capacity() == Resources(8000, 12 * GI)
    assert b.free_ports() == 32767 - 31000 + 1


def test_short_counts_only_growth_past_the_free_room():
    n = node("a", cpu_m=1000, memory=GI, requested=Resources(800, GI // 2))
    assert n.short(Resources(200, GI // 2)) is None
    assert n.short(Resources(201, 0)) == "cpu"
    assert n.short(Resources(0, GI)) == "memory"
    assert n.short(Resources(300, GI)) == "cpu"  # the first dimension that ran out
    assert n.short(Resources(-500, -GI)) is None  # shrinking always fits
    assert n.short(Resources(0, 0), ports=n.free_ports() + 1) == "host ports"


def test_a_moving_instance_books_both_nodes() -> None:
    moving = an_instance(0, "a", 1000, GI)
    moving.next_node, moving.next_ports = "b", {"http": 31005}
    s = build_snapshot([a_node("a"), a_node("b")], {"a", "b"}, [moving], revision=1)
    assert s.nodes["a"].requested == s.nodes["b"].requested == Resources(1000, GI)
    assert s.nodes["b"].ports == {31005}


def test_migrate_to_a_node_places_only_there() -> None:
    from sigmad.scheduler.binder import place_all
    from sigmad.spec import validate
    from sigmad.store import Versioned

    spec = validate({"app": "web", "namespace": "ns",
                     "containers": [{"name": "main", "image": "busybox"}]})
    pinned = an_instance(0, "", 100, 0)
    pinned.ip, pinned.target, pinned.state = "10.244.0.5", "c", "Pending"
    nodes = [a_node("a"), a_node("b"), a_node("c", cpu_m=50)]
    s = build_snapshot(nodes, {"a", "b", "c"}, [], revision=1)
    decision = place_all(s, [Versioned("/k/0", pinned, 1)], {"ns/web": spec}, None)
    assert "/k/0" in decision.unplaced  # c is too small, and no other node may take it
    assert "insufficient cpu" in decision.unplaced["/k/0"].reason
    pinned.target = "b"
    decision = place_all(s, [Versioned("/k/0", pinned, 1)], {"ns/web": spec}, None)
    assert decision.placed["/k/0"].node == "b"


def test_a_node_record_with_a_ratio_that_is_not_a_number_overcommits_nothing() -> None:
    """A record its agent's config check did not write (`overcommit: .inf`, NaN) neither
    raises in a placement pass nor books the node without bound."""
    from sigmad.scheduler.snapshot import node_info

    for bad in (float("inf"), float("nan"), float("-inf"), 0.0, 1e9):
        record = Node("a", "fake://a", capacity=Resources(4000, 8 * GI),
                      allocatable=Resources(4000, 8 * GI), overcommit=Overcommit(bad, bad))
        info = node_info(record, True, None)
        assert info.capacity() == Resources(4000, 8 * GI)
        decision = place_decision(Snapshot(1, {"a": info}), [
            Request("default/web-0", "default/web", Resources(5000, GI), Placement(), 0)])
        assert "default/web-0" in decision.unplaced
    good = Node("a", "fake://a", capacity=Resources(4000, 8 * GI),
                allocatable=Resources(4000, 8 * GI), overcommit=Overcommit(2.0, 1.5))
    assert node_info(good, True, None).capacity() == Resources(8000, 12 * GI)
