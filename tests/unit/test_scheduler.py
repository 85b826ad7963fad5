"""First-fit placement over a snapshot, with a reason for every instance left unplaced."""

from __future__ import annotations

import copy

from sigmad.models import Instance, Node
from sigmad.scheduler import NodeInfo, Request, Snapshot, build_snapshot, place
from sigmad.spec import Resources

GI = 2**30


def node(
    name: str,
    cpu_m: int = 4000,
    memory: int = 8 * GI,
    labels: dict[str, str] | None = None,
    ready: bool = True,
    draining: bool = False,
    requested: Resources | None = None,
) -> NodeInfo:
    return NodeInfo(
        name, labels or {}, Resources(cpu_m, memory), ready, draining,
        requested or Resources(),
    )


def snap(*nodes: NodeInfo) -> Snapshot:
    return Snapshot(revision=42, nodes={n.name: n for n in nodes})


def req(key: str, cpu_m: int = 0, memory: int = 0, **labels: str) -> Request:
    return Request(key, Resources(cpu_m, memory), labels)


# --- place -------------------------------------------------------------------------------------


def test_first_fit_by_name_not_by_insertion_order():
    placed, unplaced = place(snap(node("c"), node("a"), node("b")), [req("ns/web-0", 100, GI)])
    assert placed == {"ns/web-0": "a"}
    assert unplaced == {}


def test_first_fit_packs_onto_the_first_node_while_it_fits():
    placed, _ = place(snap(node("b"), node("a")), [req(f"ns/web-{i}", 1000, GI) for i in range(5)])
    assert placed == {
        "ns/web-0": "a", "ns/web-1": "a", "ns/web-2": "a", "ns/web-3": "a", "ns/web-4": "b",
    }


def test_requests_accumulate_within_one_call():
    s = snap(node("a", cpu_m=1000), node("b", cpu_m=1000))
    placed, unplaced = place(s, [req("x", 600), req("y", 600), req("z", 600)])
    assert placed == {"x": "a", "y": "b"}
    assert unplaced == {
        "z": "2 nodes: insufficient cpu (need 600m, best free 400m)",
    }


def test_memory_accumulates_within_one_call():
    s = snap(node("a", memory=3 * GI))
    placed, unplaced = place(s, [req("x", 0, 2 * GI), req("y", 0, 2 * GI)])
    assert placed == {"x": "a"}
    assert unplaced == {"y": "1 node: insufficient memory (need 2Gi, best free 1Gi)"}


def test_exact_fit_is_accepted():
    placed, _ = place(snap(node("a", cpu_m=1000, memory=GI)), [req("x", 1000, GI)])
    assert placed == {"x": "a"}


def test_labels_select_the_node():
    s = snap(node("a", labels={"zone": "bj-1"}), node("b", labels={"zone": "bj-2", "ssd": "y"}))
    placed, unplaced = place(s, [req("x", zone="bj-2"), req("y", zone="bj-2", ssd="y")])
    assert placed == {"x": "b", "y": "b"}
    assert unplaced == {}


def test_labels_mismatch_reason():
    s = snap(node("a", labels={"zone": "bj-1"}), node("b"))
    placed, unplaced = place(s, [req("x", zone="sh-1")])
    assert placed == {}
    assert unplaced == {"x": "2 nodes: labels mismatch"}


def test_all_required_labels_must_match():
    s = snap(node("a", labels={"zone": "bj-1", "disk": "hdd"}))
    _, unplaced = place(s, [req("x", zone="bj-1", disk="ssd")])
    assert unplaced == {"x": "1 node: labels mismatch"}


def test_insufficient_cpu_reason_with_need_and_best_free():
    s = snap(
        node("a", cpu_m=2000, requested=Resources(1500, 0)),
        node("b", cpu_m=2000, requested=Resources(500, 0)),
    )
    placed, unplaced = place(s, [req("x", 2000)])
    assert placed == {}
    assert unplaced == {"x": "2 nodes: insufficient cpu (need 2, best free 1.5)"}


def test_insufficient_memory_reason_with_need_and_best_free():
    s = snap(node("a", memory=4 * GI, requested=Resources(0, 3 * GI)))
    _, unplaced = place(s, [req("x", 0, 2 * GI)])
    assert unplaced == {"x": "1 node: insufficient memory (need 2Gi, best free 1Gi)"}


def test_cpu_is_checked_before_memory():
    _, unplaced = place(snap(node("a", cpu_m=100, memory=GI)), [req("x", 200, 2 * GI)])
    assert unplaced == {"x": "1 node: insufficient cpu (need 200m, best free 100m)"}


def test_not_ready_and_draining_nodes_skipped():
    s = snap(node("a", ready=False), node("b", draining=True), node("c"))
    placed, _ = place(s, [req("x", 100)])
    assert placed == {"x": "c"}


def test_reasons_are_counted_per_filter_most_common_first():
    s = snap(
        node("a", ready=False), node("b", draining=True), node("c", draining=True),
        node("d", labels={"zone": "z2"}),
    )
    _, unplaced = place(s, [req("x", zone="z1")])
    assert unplaced == {
        "x": "2 nodes: node draining; 1 node: labels mismatch; 1 node: node not ready"
    }


def test_not_ready_wins_over_other_filters():
    # A not-ready node is reported as such even if it also lacks labels and room.
    s = snap(node("a", cpu_m=0, ready=False))
    _, unplaced = place(s, [req("x", 100, zone="z")])
    assert unplaced == {"x": "1 node: node not ready"}


def test_best_effort_fits_on_a_full_node():
    full = node("a", cpu_m=1000, memory=GI, requested=Resources(1000, GI))
    placed, unplaced = place(snap(full), [req("x", 0, 0), req("y", 0, 0)])
    assert placed == {"x": "a", "y": "a"}
    assert unplaced == {}


def test_best_effort_still_respects_readiness_and_labels():
    _, unplaced = place(snap(node("a", ready=False)), [req("x")])
    assert unplaced == {"x": "1 node: node not ready"}
    _, unplaced = place(snap(node("a")), [req("y", zone="z")])
    assert unplaced == {"y": "1 node: labels mismatch"}


def test_no_nodes_registered():
    placed, unplaced = place(snap(), [req("x", 100), req("y")])
    assert placed == {}
    assert unplaced == {"x": "no nodes registered", "y": "no nodes registered"}


def test_no_requests():
    assert place(snap(node("a")), []) == ({}, {})


def test_input_snapshot_is_not_mutated():
    s = snap(node("a", cpu_m=1000, requested=Resources(100, GI)), node("b"))
    before = copy.deepcopy(s)
    placed, _ = place(s, [req("x", 800, GI), req("y", 800, GI)])
    assert placed == {"x": "a", "y": "b"}
    assert s == before
    assert s.nodes["a"].requested == Resources(100, GI)


def test_place_is_deterministic():
    s = snap(node("b", cpu_m=1000), node("a", cpu_m=1000), node("c", cpu_m=500))
    reqs = [req(f"k{i}", 400) for i in range(8)]
    assert place(s, reqs) == place(s, reqs)


def test_best_free_only_counts_nodes_that_passed_the_other_filters():
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


def test_build_snapshot_subtracts_bound_requests():
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


def test_build_snapshot_uses_allocatable_not_capacity():
    s = build_snapshot([a_node("a", cpu_m=2000, memory=GI)], {"a"}, [], revision=1)
    assert s.nodes["a"].allocatable == Resources(2000, GI)
    assert s.nodes["a"].free() == Resources(2000, GI)


def test_build_snapshot_readiness_draining_and_labels():
    nodes = [a_node("a", labels={"zone": "z1"}), a_node("b", draining=True), a_node("c")]
    s = build_snapshot(nodes, {"a", "b"}, [], revision=1)
    assert (s.nodes["a"].ready, s.nodes["a"].draining) == (True, False)
    assert (s.nodes["b"].ready, s.nodes["b"].draining) == (True, True)
    assert (s.nodes["c"].ready, s.nodes["c"].draining) == (False, False)
    assert s.nodes["a"].labels == {"zone": "z1"}


def test_build_snapshot_does_not_touch_the_records():
    nodes = [a_node("a", labels={"zone": "z1"})]
    before = copy.deepcopy(nodes)
    s = build_snapshot(nodes, {"a"}, [an_instance(0, "a", 1000, GI)], revision=1)
    s.nodes["a"].labels["zone"] = "changed"
    place(s, [req("x", 1000)])
    assert nodes == before


def test_snapshot_then_place_end_to_end():
    nodes = [a_node("a", cpu_m=2000), a_node("b", cpu_m=2000)]
    instances = [an_instance(0, "a", 1500, 0)]
    s = build_snapshot(nodes, {"a", "b"}, instances, revision=3)
    placed, unplaced = place(s, [req("ns/web-1", 1000), req("ns/web-2", 500)])
    assert placed == {"ns/web-1": "b", "ns/web-2": "a"}
    assert unplaced == {}


def test_best_effort_fits_on_an_overbooked_node():
    s = snap(node("a", cpu_m=1000, requested=Resources(1500, 0)))
    placed, unplaced = place(s, [req("x")])
    assert placed == {"x": "a"} and unplaced == {}
    _, unplaced = place(s, [req("y", cpu_m=1)])
    assert unplaced == {"y": "1 node: insufficient cpu (need 1m, best free 0)"}
