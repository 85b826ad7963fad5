"""Pure decisions for lost and draining nodes (sigmad.control.migration)."""

from __future__ import annotations

import pytest

from sigmad.control.migration import (
    Loss,
    drain_next,
    fence_wait,
    fenced,
    migrate,
    needs_fence,
    node_change,
    unfenced,
)
from sigmad.models import BoundSsd, ContainerStatus, Instance
from sigmad.store import Versioned


def placed(index: int, node: str, state: str = "Running", **kw: object) -> Versioned[Instance]:
    inst = Instance("ns", "db", index, 1, state=state, node=node, ip=f"10.244.0.{index + 2}",
                    host_ports={"sql": 31000 + index},
                    containers=[ContainerStatus("main", id=f"c{index}", state="running")],
                    **kw)  # type: ignore[arg-type]
    return Versioned(f"/t/instances/ns/db/{index}", inst, 10 + index)


def test_a_lost_instance_stays_bound_to_its_node_until_its_copy_is_fenced() -> None:
    v = placed(0, "h2")
    t = node_change(v.value, {"h1"}, "auto")
    assert t is not None and not t.releases  # nothing leaves h2 yet, not even its ports
    lost = t.new
    assert (lost.state, lost.node, lost.ip, lost.fence) == ("NeedMigration", "h2", "10.244.0.2", "")
    assert lost.reason == "NodeLost: node h2 is NotReady"
    assert [t.reason for t in lost.terminations] == ["NodeLost"]
    assert [m for m, _ in t.events] == ["NeedMigration: NodeLost: node h2 is NotReady"]
    assert needs_fence(lost, {"h1"}) and not needs_fence(lost, {"h1", "h2"})
    assert node_change(lost, {"h1"}, "auto") is None  # no move before the fence
    assert v.value.state == "Running" and v.value.node == "h2"  # the record read is untouched
    assert node_change(placed(1, "h1").value, {"h1"}, "auto") is None


def test_a_lapsed_lease_fences_only_after_the_grace_and_an_alive_agent_never() -> None:
    lapsed = Loss(alive=False, lapsed=100.0)
    assert fence_wait(lapsed, 5.0, 100.0) == 5.0
    assert fence_wait(lapsed, 5.0, 104.9) == pytest.approx(0.1)
    assert fence_wait(lapsed, 5.0, 105.0) == 0.0
    assert fence_wait(lapsed, 5.0, 1e9) == 0.0
    assert fence_wait(Loss(alive=True), 5.0, 1e9) is None  # its engine may run the copy


def test_auto_migration_moves_a_fenced_instance_with_its_ip() -> None:
    t = node_change(placed(0, "h2").value, {"h1"}, "auto")
    assert t is not None
    moved = fenced(t.new, "1 container(s) stopped on h2 through its engine", ["c0"], {"h1"},
                   "auto")
    assert moved.releases == [("h2", {"sql": 31000})]
    inst = moved.new
    assert (inst.state, inst.node, inst.ip, inst.host_ports) == ("Pending", "", "10.244.0.2", {})
    assert inst.fence == "1 container(s) stopped on h2 through its engine"
    assert inst.reason == ("migrating: NodeLost: node h2 is NotReady; fenced: 1 container(s) "
                           "stopped on h2 through its engine")
    assert [t.reason for t in inst.terminations] == ["KilledBySigma(fenced)"]
    assert [m for m, _ in moved.events] == [
        "fenced: 1 container(s) stopped on h2 through its engine", "migrating (migration: auto)"]
    assert not needs_fence(inst, {"h1"})
    placed_again = inst.bound("h1", {"sql": 31005})
    assert placed_again.fence == ""  # a new copy, a new story


def test_manual_migration_waits_and_resumes_when_the_node_comes_back() -> None:
    t = node_change(placed(0, "h2").value, {"h1"}, "manual")
    assert t is not None and not t.releases
    lost = t.new
    assert (lost.state, lost.node) == ("NeedMigration", "h2")
    assert node_change(lost, {"h1"}, "manual") is None  # stays put
    back = node_change(lost, {"h1", "h2"}, "manual")
    assert back is not None and back.new.state == "Scheduled"
    assert back.new.reason == "node h2 is back"
    assert back.new.terminations == []  # its container may run on: its end is not known


def test_manual_migration_is_refused_until_the_copy_is_fenced() -> None:
    t = node_change(placed(0, "h2").value, {"h1"}, "manual")
    assert t is not None
    assert "not fenced yet" in unfenced(t.new, {"h1"})
    assert "Ready again" in unfenced(t.new, {"h1", "h2"})
    done = fenced(t.new, "the heartbeat lease of h2 lapsed 5s ago", [], {"h1"}, "manual")
    assert not done.releases and done.new.state == "NeedMigration" and done.new.node == "h2"
    assert [t.reason for t in done.new.terminations] == ["NodeLost"]  # nothing was stopped
    assert unfenced(done.new, {"h1"}) == ""
    assert not needs_fence(done.new, {"h1"})
    assert node_change(done.new, {"h1"}, "manual") is None


def test_lost_mid_move_lands_on_the_booked_node_once_fenced() -> None:
    v = placed(0, "h2", move="drain h2", next_node="h3", next_ports={"sql": 31009})
    t = node_change(v.value, {"h1", "h3"}, "manual")
    assert t is not None and not t.releases
    assert (t.new.state, t.new.node, t.new.next_node) == ("NeedMigration", "h2", "h3")
    assert node_change(t.new, {"h1", "h3"}, "manual") is None  # not before the fence
    done = fenced(t.new, "x", ["c0"], {"h1", "h3"}, "manual")
    assert done.releases == [("h2", {"sql": 31000})]
    inst = done.new
    assert (inst.state, inst.node, inst.host_ports) == ("Scheduled", "h3", {"sql": 31009})
    assert (inst.move, inst.next_node, inst.next_ports) == ("", "", {})


def test_lost_mid_move_to_a_node_lost_too_gives_up_both_bookings() -> None:
    v = placed(0, "h2", move="drain h2", next_node="h3", next_ports={"sql": 31009})
    t = node_change(v.value, {"h1"}, "auto")
    assert t is not None
    done = fenced(t.new, "x", [], {"h1"}, "auto")
    assert done.releases == [("h2", {"sql": 31000}), ("h3", {"sql": 31009})]
    assert (done.new.state, done.new.node, done.new.next_node) == ("Pending", "", "")


def test_a_move_to_a_lost_node_is_called_off() -> None:
    v = placed(0, "h1", move="drain h1", next_node="h3", next_ports={"sql": 31009})
    t = node_change(v.value, {"h1"}, "auto")
    assert t is not None and t.releases == [("h3", {"sql": 31009})]
    assert (t.new.node, t.new.next_node, t.new.move, t.new.state) == ("h1", "", "", "Running")


def test_a_draining_node_gives_up_one_instance_at_a_time() -> None:
    a, b, c = placed(0, "h2"), placed(1, "h2"), placed(2, "h1")
    assert drain_next("h2", [a, b, c]) is a
    moving = Versioned(a.key, a.value.move_asked("drain h2"), 20)
    assert drain_next("h2", [moving, b, c]) is None  # a is still moving
    assert drain_next("h3", [placed(3, "h3", state="Pending")]) is None


def test_migrate_places_anew_keeping_name_ip_and_request() -> None:
    lost = node_change(placed(0, "h2").value, {"h1"}, "manual")
    assert lost is not None
    t = migrate(fenced(lost.new, "x", [], {"h1"}, "manual").new, "h3")
    assert (t.new.state, t.new.node, t.new.target, t.new.ip) == ("Pending", "", "h3", "10.244.0.2")
    assert t.releases == [("h2", {"sql": 31000})]


def test_a_lost_instance_with_disks_moves_with_new_ones_and_says_where_its_data_is() -> None:
    v = placed(0, "h2", ssds=[BoundSsd("data", "loop3", "/x/loop3/data")])
    lost = node_change(v.value, {"h1"}, "auto")
    assert lost is not None and lost.new.ssds == v.value.ssds  # kept until fenced
    t = fenced(lost.new, "lease lapsed", [], {"h1"}, "auto")
    assert t.new.ssds == [] and t.new.state == "Pending"
    assert t.events[-1] == ("moving with new empty disks: its data stays on h2, disk loop3 "
                            "(data) retained (sigmactl ssd release h2/DISK frees it)", True)
