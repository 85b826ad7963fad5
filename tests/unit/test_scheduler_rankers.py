"""Rankers and strategies: spread, binpack, topology spread and random tie-breaking."""

from __future__ import annotations

import random
from collections import Counter

from sigmad.scheduler import NodeInfo, Request, Snapshot, place, rankers
from sigmad.scheduler.snapshot import Room
from sigmad.spec import Placement, Resources

GI = 2**30


def node(name: str, cpu_m: int = 4000, memory: int = 8 * GI, zone: str | None = None,
         requested: Resources | None = None, apps: dict[str, int] | None = None) -> NodeInfo:
    return NodeInfo(name, {"zone": zone} if zone else {}, Resources(cpu_m, memory),
                    requested=requested or Resources(), apps=apps or {})


def snap(*nodes: NodeInfo) -> Snapshot:
    return Snapshot(1, {n.name: n for n in nodes})


def reqs(n: int, placement: Placement, cpu_m: int = 500, memory: int = GI,
         app: str = "ns/web") -> list[Request]:
    return [Request(f"{app}-{i}", app, Resources(cpu_m, memory), placement) for i in range(n)]


def nodes_of(s: Snapshot, requests: list[Request], seed: int = 1) -> dict[str, str]:
    d = place(s, requests, random.Random(seed))
    assert not d.unplaced
    return {k: b.node for k, b in d.placed.items()}


def zones(s: Snapshot, placed: dict[str, str]) -> Counter[str]:
    return Counter(s.nodes[n].labels.get("zone", "-") for n in placed.values())


# --- raw scores and normalisation ---------------------------------------------------------------


def room(cpu_m: int, memory: int, used_cpu: int = 0, used_memory: int = 0) -> Room:
    return Room(NodeInfo("n", {}, Resources(cpu_m, memory),
                         requested=Resources(used_cpu, used_memory)))


def test_least_and_most_requested_are_shares_after_placing() -> None:
    r = room(4000, 4 * GI, used_cpu=1000)
    assert rankers.least_requested(r, 1000, GI) == (0.5 + 0.75) / 2
    assert rankers.most_requested(r, 1000, GI) == 1 - (0.5 + 0.75) / 2


def test_normalise_is_min_max() -> None:
    assert rankers.normalise([2.0, 4.0, 3.0]) == [0.0, 1.0, 0.5]
    assert rankers.normalise([0.3, 0.3]) == [1.0, 1.0]


def test_topology_prefers_fewest_replicas_and_ranks_missing_labels_last() -> None:
    assert rankers.topology([2, 0, 1, None]) == [0.0, 1.0, 0.5, 0.0]
    assert rankers.topology([1, 1, None]) == [1.0, 1.0, 0.0]
    assert rankers.topology([None, None]) == [0.0, 0.0]


def test_topology_outweighs_resources() -> None:
    # The emptiest node sits in the crowded zone; the fuller one in the empty zone wins.
    scores = rankers.combine([1.0, 0.0], rankers.topology([3, 0]))
    assert scores[1] > scores[0]


def test_pick_chooses_among_equal_best_scores_only() -> None:
    rng = random.Random(3)
    picks = Counter(rankers.pick([0.2, 0.9, 0.9, 0.5, 0.9], rng) for _ in range(300))
    assert set(picks) == {1, 2, 4}


# --- strategies ---------------------------------------------------------------------------------


def test_spread_is_the_default_and_evens_out_load() -> None:
    s = snap(*(node(f"n{i}") for i in range(4)))
    placed = nodes_of(s, reqs(8, Placement()))
    assert Counter(placed.values()) == {"n0": 2, "n1": 2, "n2": 2, "n3": 2}


def test_spread_prefers_the_node_with_the_larger_free_share() -> None:
    s = snap(node("small", cpu_m=2000, memory=2 * GI), node("big", cpu_m=16000, memory=32 * GI))
    placed = nodes_of(s, reqs(3, Placement()))
    assert set(placed.values()) == {"big"}


def test_binpack_fills_one_node_before_the_next() -> None:
    s = snap(*(node(f"n{i}", cpu_m=2000) for i in range(4)))
    placed = nodes_of(s, reqs(8, Placement(strategy="binpack")))
    assert sorted(Counter(placed.values()).values()) == [4, 4]


def test_binpack_prefers_the_most_requested_node() -> None:
    s = snap(node("a"), node("b", requested=Resources(3000, 6 * GI)), node("c"))
    placed = nodes_of(s, reqs(1, Placement(strategy="binpack")))
    assert set(placed.values()) == {"b"}


def test_binpack_leaves_room_for_a_big_instance_where_spread_does_not() -> None:
    def run(strategy: str) -> bool:
        s = snap(*(node(f"n{i}", cpu_m=4000) for i in range(4)))
        requests = reqs(4, Placement(strategy=strategy), cpu_m=1000, memory=0)
        requests += reqs(1, Placement(strategy=strategy), cpu_m=4000, memory=0, app="ns/big")
        return not place(s, requests, random.Random(1)).unplaced

    assert run("binpack")
    assert not run("spread")


# --- topology spread ----------------------------------------------------------------------------


def two_zones() -> Snapshot:
    return snap(node("a1", zone="a"), node("a2", zone="a"), node("b1", zone="b"),
                node("b2", zone="b"))


def test_topology_spread_puts_two_replicas_in_each_of_two_zones() -> None:
    for seed in range(20):
        for strategy in ("spread", "binpack"):
            s = two_zones()
            placed = nodes_of(s, reqs(4, Placement(spread="zone", strategy=strategy)), seed)
            assert zones(s, placed) == {"a": 2, "b": 2}, (seed, strategy)


def test_losing_one_zone_never_takes_all_replicas() -> None:
    s = snap(*(node(f"a{i}", cpu_m=64000, memory=64 * GI, zone="a") for i in range(5)),
             node("b0", cpu_m=1000, memory=GI, zone="b"),
             node("b1", cpu_m=1000, memory=GI, zone="b"))
    placed = nodes_of(s, reqs(2, Placement(spread="zone"), cpu_m=100, memory=0))
    assert zones(s, placed) == {"a": 1, "b": 1}


def test_topology_spread_counts_replicas_already_running() -> None:
    s = two_zones()
    s.nodes["a1"].apps["ns/web"] = 3
    placed = nodes_of(s, reqs(3, Placement(spread="zone")))
    assert zones(s, placed) == {"b": 3}


def test_topology_spread_is_per_app() -> None:
    s = two_zones()
    s.nodes["a1"].apps["ns/other"] = 5
    placed = nodes_of(s, reqs(2, Placement(spread="zone")))
    assert zones(s, placed) == {"a": 1, "b": 1}


def test_nodes_without_the_spread_label_rank_last() -> None:
    s = snap(node("x"), node("a1", zone="a"), node("b1", zone="b"))
    placed = nodes_of(s, reqs(4, Placement(spread="zone"), cpu_m=100, memory=0))
    assert set(placed.values()) == {"a1", "b1"}


def test_nodes_without_the_spread_label_are_used_when_nothing_else_fits() -> None:
    s = snap(node("x"), node("a1", zone="a", cpu_m=500))
    placed = nodes_of(s, reqs(3, Placement(spread="zone")))
    assert sorted(placed.values()) == ["a1", "x", "x"]


def test_topology_spread_over_many_zones_stays_even() -> None:
    s = snap(*(node(f"n{z}{i}", zone=f"z{z}") for z in range(3) for i in range(5)))
    placed = nodes_of(s, reqs(9, Placement(spread="zone"), cpu_m=100, memory=0))
    assert zones(s, placed) == {"z0": 3, "z1": 3, "z2": 3}


# --- random tie-breaking ------------------------------------------------------------------------


def test_ties_are_broken_at_random_and_a_seed_repeats_the_choice() -> None:
    s = snap(*(node(f"n{i}") for i in range(6)))
    one = reqs(1, Placement())
    chosen = {nodes_of(s, one, seed)["ns/web-0"] for seed in range(40)}
    assert len(chosen) > 3  # spread over the equal nodes, not always the first
    assert nodes_of(s, one, 11) == nodes_of(s, one, 11)


def test_no_rng_still_places() -> None:
    s = snap(node("a"), node("b"))
    d = place(s, reqs(2, Placement()))
    assert sorted(b.node for b in d.placed.values()) == ["a", "b"]


# --- large pools: only a sample of feasible nodes is scored per decision ------------------------


def test_spread_over_a_large_pool_touches_many_nodes() -> None:
    s = snap(*(node(f"n{i:03d}", zone=f"z{i % 3}") for i in range(600)))
    placed = nodes_of(s, reqs(600, Placement(), cpu_m=100, memory=0))
    assert max(Counter(placed.values()).values()) <= 2
    assert len(set(placed.values())) > 400


def test_binpack_over_a_large_pool_stays_on_few_nodes() -> None:
    s = snap(*(node(f"n{i:03d}", cpu_m=1000) for i in range(600)))
    placed = nodes_of(s, reqs(600, Placement(strategy="binpack"), cpu_m=100, memory=0))
    assert len(set(placed.values())) == 60


def test_topology_spread_over_a_large_pool() -> None:
    s = snap(*(node(f"n{i:03d}", zone=f"z{i % 4}") for i in range(800)))
    placed = nodes_of(s, reqs(402, Placement(spread="zone"), cpu_m=100, memory=0))
    assert sorted(zones(s, placed).values()) == [100, 100, 101, 101]
