"""Pure decisions for lost and draining nodes (sigmad.migration)."""

from __future__ import annotations

from sigmad.migration import drains, node_losses
from sigmad.models import ContainerStatus, Instance
from sigmad.store import Keys, Versioned

KEYS = Keys("/t")


def placed(index: int, node: str, state: str = "Running", **kw: object) -> Versioned[Instance]:
    inst = Instance("ns", "db", index, 1, state=state, node=node, ip=f"10.244.0.{index + 2}",
                    host_ports={"sql": 31000 + index},
                    containers=[ContainerStatus("main", id=f"c{index}", state="running")],
                    **kw)  # type: ignore[arg-type]
    return Versioned(f"/t/instances/ns/db/{index}", inst, 10 + index)


def test_auto_migration_sends_a_lost_instance_back_to_pending_with_its_ip() -> None:
    v = placed(0, "h2")
    plan = node_losses(KEYS, [v, placed(1, "h1")], {"ns/db": "auto"}, {"h1"})
    assert len(plan.changes) == 1
    guards, ops = plan.changes[0]
    assert [(g.key, g.mod_revision) for g in guards] == [(v.key, 10)]
    assert ops[1].key == "/t/alloc/port/h2/31000" and ops[1].delete
    inst = v.value
    assert (inst.state, inst.node, inst.ip, inst.host_ports) == ("Pending", "", "10.244.0.2", {})
    assert inst.reason == "migrating: NodeLost: node h2 is NotReady"
    assert [t.reason for t in inst.terminations] == ["NodeLost"]
    assert [m for _, m, _ in plan.events] == [
        "NeedMigration: NodeLost: node h2 is NotReady", "migrating (migration: auto)"]


def test_manual_migration_waits_and_resumes_when_the_node_comes_back() -> None:
    v = placed(0, "h2")
    node_losses(KEYS, [v], {"ns/db": "manual"}, {"h1"})
    assert (v.value.state, v.value.node) == ("NeedMigration", "h2")
    assert not node_losses(KEYS, [v], {"ns/db": "manual"}, {"h1"}).changes  # stays put
    back = node_losses(KEYS, [v], {"ns/db": "manual"}, {"h1", "h2"})
    assert len(back.changes) == 1 and v.value.state == "Scheduled"
    assert v.value.reason == "node h2 is back"


def test_lost_mid_move_lands_on_the_booked_node() -> None:
    v = placed(0, "h2", move="drain h2", next_node="h3", next_ports={"sql": 31009})
    node_losses(KEYS, [v], {"ns/db": "manual"}, {"h1", "h3"})
    inst = v.value
    assert (inst.state, inst.node, inst.host_ports) == ("Scheduled", "h3", {"sql": 31009})
    assert (inst.move, inst.next_node, inst.next_ports) == ("", "", {})


def test_a_move_to_a_lost_node_is_called_off() -> None:
    v = placed(0, "h1", move="drain h1", next_node="h3", next_ports={"sql": 31009})
    plan = node_losses(KEYS, [v], {"ns/db": "auto"}, {"h1"})
    assert plan.changes[0][1][1].key == "/t/alloc/port/h3/31009"
    assert (v.value.node, v.value.next_node, v.value.move, v.value.state) == \
        ("h1", "", "", "Running")


def test_a_draining_node_gives_up_one_instance_at_a_time() -> None:
    a, b, c = placed(0, "h2"), placed(1, "h2"), placed(2, "h1")
    plan = drains(["h2"], [a, b, c])
    assert [ch[0][0].key for ch in plan.changes] == [a.key]
    assert a.value.move == "drain h2" and not b.value.move
    assert not drains(["h2"], [a, b, c]).changes  # a is still moving
    pending = placed(3, "h3", state="Pending")
    assert not drains(["h3"], [pending]).changes
