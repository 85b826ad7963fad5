"""How the binder plans bookings and cuts one node's into bounded transactions
(sigmad.scheduler.binder)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from sigmad.models import Instance, Node
from sigmad.scheduler import binder
from sigmad.scheduler.binder import Booking, pieces, plan, wants_a_node, wants_a_rebooking
from sigmad.scheduler.snapshot import build_snapshot
from sigmad.spec import Resources, parse
from sigmad.state.cache import Cache
from sigmad.state.writes import Writer, Writes
from sigmad.store import MAX_TXN_OPS, Versioned
from tests.fakes.store import MemoryStore

SPEC = parse("""
app: web
containers: [{name: main, image: x, resources: {request: {cpu: 500m, memory: 1Gi}}}]
network: {ports: [{name: http, container: 8080}]}
""")[0]
GI = 2**30


def booking(i: int, ports: int = 0) -> Booking:
    old = Versioned(f"/i/{i}", Instance("ns", "web", i, 1), 5)
    return Booking(old, old.value, list(range(31000, 31000 + ports)), "a")


def test_one_piece_when_it_fits_and_pieces_stay_in_bounds() -> None:
    assert len(pieces([booking(i, ports=1) for i in range(3)])) == 1
    cut = pieces([booking(i, ports=1) for i in range(150)])
    assert [len(p) for p in cut] == [63, 63, 24]  # 2 guards and 2 ops each, plus the lock
    assert [b.old.key for p in cut for b in p] == [f"/i/{i}" for i in range(150)]
    for p in cut:
        guards = 1 + sum(b.cost()[0] for b in p)
        assert guards <= MAX_TXN_OPS - 1  # one compare is the fence's


def node(name: str, cpu_m: int = 2000) -> Node:
    return Node(name, "unix:///x", allocatable=Resources(cpu_m, 8 * GI),
                port_range=[31000, 31010])


def test_plan_places_pending_instances_and_explains_the_rest() -> None:
    pending = [Versioned(f"/i/{i}", Instance("default", "web", i, 1, ip=f"10.244.0.{i + 2}",
                                             request=SPEC.request()), 3) for i in range(6)]
    snap = build_snapshot([node("a", 1000), node("b", 1000)], {"a", "b"}, [], 10)
    result = plan(snap, pending, {"default/web": SPEC})
    placed = [b for bs in result.by_node.values() for b in bs]
    assert len(placed) == 4 and result.waiting == 2  # 1 cpu per node, 500m each
    assert all(b.new.state == "Scheduled" and b.new.node == b.node for b in placed)
    assert all(len(b.ports) == 1 and list(b.new.host_ports) == ["http"] for b in placed)
    assert {b.node for b in placed} == {"a", "b"}
    assert [new.reason for _, new in result.unplaced] == \
        ["2 nodes: insufficient cpu (need 500m, best free 0)"] * 2
    assert all(v.value.state == "Pending" for v in pending)  # the records read are untouched


def test_a_grown_request_is_booked_on_its_own_node_or_waits() -> None:
    bound = Instance("default", "web", 0, 1, state="Running", node="a", ip="10.244.0.2",
                     request=Resources(100, GI))
    assert wants_a_rebooking(bound, SPEC) and not wants_a_node(bound)
    v = Versioned("/i/0", bound, 4)
    ok = plan(build_snapshot([node("a")], {"a"}, [bound], 10), [v], {"default/web": SPEC})
    (b,) = ok.by_node["a"]
    assert b.new.request == Resources(500, GI) and b.ports == [] and b.node == ""
    full = build_snapshot([node("a", cpu_m=300)], {"a"}, [bound], 10)
    waits = plan(full, [v], {"default/web": SPEC})
    assert not waits.by_node and waits.waiting == 1
    assert waits.unplaced[0][1].reason.startswith(
        "update waits: the new request does not fit on a (insufficient cpu)")


async def test_rounds_share_a_snapshot_and_fill_each_node_exactly(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Rounds of one `schedule` call go on with one snapshot: each sees what the earlier ones
    booked and guards the lock revisions they wrote (no lost race, no node over-booked)."""
    monkeypatch.setattr(binder, "ROUND", 3)
    store = MemoryStore("/t")
    for name in ("a", "b"):  # 2 cpu each: four instances of 500m
        await store.put(store.keys.node(name), node(name))
        await store.put(store.keys.heartbeat(name), {"node": name}, lease=await store.grant(5))
    keys = [store.keys.instance("default", "web", i) for i in range(10)]
    for i, key in enumerate(keys):
        await store.put(key, Instance("default", "web", i, 1, ip=f"10.244.0.{i + 2}",
                                      request=SPEC.request()))
    cache = Cache(store)
    writer = Writer(store, cache)
    tasks = [asyncio.create_task(cache.run()), asyncio.create_task(writer.run())]
    try:
        await cache.synced.wait()
        result = await binder.schedule(cache, writer, Writes(store.keys),
                                       {"default/web": SPEC}, keys, random.Random(1))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert (result.placed, result.unplaced, result.conflicts, result.rounds) == (8, 2, 0, 4)
    on = Counter(v.value.node for v in cache.instances().values() if v.value.node)
    assert on == {"a": 4, "b": 4}
