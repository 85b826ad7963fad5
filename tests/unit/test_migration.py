"""Pure decisions for lost and draining nodes (sigmad.control.migration)."""

from __future__ import annotations

from sigmad.control.migration import drain_next, migrate, node_change
from sigmad.models import BoundSsd, ContainerStatus, Instance
from sigmad.store import Versioned


def placed(index: int, node: str, state: str = "Running", **kw: object) -> Versioned[Instance]:
    inst = Instance("ns", "db", index, 1, state=state, node=node, ip=f"10.244.0.{index + 2}",
                    host_ports={"sql": 31000 + index},
                    containers=[ContainerStatus("main", id=f"c{index}", state="running")],
                    **kw)  # type: ignore[arg-type]
    return Versioned(f"/t/instances/ns/db/{index}", inst, 10 + index)


def test_auto_migration_sends_a_lost_instance_back_to_pending_with_its_ip() -> None:
    v = placed(0, "h2")
    t = node_change(v.value, {"h1"}, "auto")
    assert t is not None
    assert t.releases == [("h2", {"sql": 31000})]
    inst = t.new
    assert (inst.state, inst.node, inst.ip, inst.host_ports) == ("Pending", "", "10.244.0.2", {})
    assert inst.reason == "migrating: NodeLost: node h2 is NotReady"
    assert [t.reason for t in inst.terminations] == ["NodeLost"]
    assert [m for m, _ in t.events] == [
        "NeedMigration: NodeLost: node h2 is NotReady", "migrating (migration: auto)"]
    assert v.value.state == "Running" and v.value.node == "h2"  # the record read is untouched
    assert node_change(placed(1, "h1").value, {"h1"}, "auto") is None


def test_manual_migration_waits_and_resumes_when_the_node_comes_back() -> None:
    t = node_change(placed(0, "h2").value, {"h1"}, "manual")
    assert t is not None and not t.releases
    lost = t.new
    assert (lost.state, lost.node) == ("NeedMigration", "h2")
    assert node_change(lost, {"h1"}, "manual") is None  # stays put
    back = node_change(lost, {"h1", "h2"}, "manual")
    assert back is not None and back.new.state == "Scheduled"
    assert back.new.reason == "node h2 is back"


def test_lost_mid_move_lands_on_the_booked_node() -> None:
    v = placed(0, "h2", move="drain h2", next_node="h3", next_ports={"sql": 31009})
    t = node_change(v.value, {"h1", "h3"}, "manual")
    assert t is not None and t.releases == [("h2", {"sql": 31000})]
    inst = t.new
    assert (inst.state, inst.node, inst.host_ports) == ("Scheduled", "h3", {"sql": 31009})
    assert (inst.move, inst.next_node, inst.next_ports) == ("", "", {})


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
    t = migrate(lost.new, "h3")
    assert (t.new.state, t.new.node, t.new.target, t.new.ip) == ("Pending", "", "h3", "10.244.0.2")
    assert t.releases == [("h2", {"sql": 31000})]


def test_a_lost_instance_with_disks_moves_with_new_ones_and_says_where_its_data_is() -> None:
    v = placed(0, "h2", ssds=[BoundSsd("data", "loop3", "/x/loop3/data")])
    t = node_change(v.value, {"h1"}, "auto")
    assert t is not None and t.new.ssds == [] and t.new.state == "Pending"
    assert t.events[-1] == ("moving with new empty disks: its data stays on h2, disk loop3 "
                            "(data) retained (sigmactl ssd release h2/DISK frees it)", True)
