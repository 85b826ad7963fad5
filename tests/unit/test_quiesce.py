"""A live move drains its old copy before the flip: the master's pure decision
(sigmad.control.moves.flip_due), the controller on fakes waiting for the old node's word,
the agent's gate plan (sigmad.node.quiesce.plan) and its reading of /proc/net/tcp
(sigmad.network.gate)."""

from __future__ import annotations

import asyncio

import pytest

from sigmad.control import moves
from sigmad.control.moves import OldCopy, flip_due
from sigmad.models import ContainerStatus, Instance, OverlayApplied
from sigmad.network.gate import count_busy
from sigmad.node.quiesce import plan
from tests.unit.harness import Leader, spec


def moving(node: str = "a", quiesce: float = 100.0, index: int = 0) -> Instance:
    return Instance("ns", "web", index, 1, state="Running", node=node, ip=f"10.244.0.{index + 2}",
                    move="drain a", next_node="b", quiesce=quiesce,
                    containers=[ContainerStatus("main", id=f"c{index}", state="running")])


def test_the_flip_waits_for_the_old_nodes_word_for_this_very_mark() -> None:
    inst = moving(quiesce=100.0)
    assert not flip_due(inst, OldCopy(True, {}), 101.0)
    assert not flip_due(inst, OldCopy(True, {inst.key: 99.0}), 101.0)  # an older mark's word
    assert flip_due(inst, OldCopy(True, {inst.key: 100.0}), 100.1)


def test_the_flip_goes_on_the_bound_or_at_once_for_a_lost_or_silent_old_node() -> None:
    inst = moving(quiesce=100.0)
    assert not flip_due(inst, OldCopy(True, {}), 100.0 + moves.QUIESCE_WAIT - 0.1)
    assert flip_due(inst, OldCopy(True, {}), 100.0 + moves.QUIESCE_WAIT)
    assert flip_due(inst, OldCopy(False, {}), 100.0)  # its node is NotReady
    assert flip_due(inst, OldCopy(True, None), 100.0)  # its agent never says (a hollow host)


def test_the_flip_and_a_called_off_move_clear_the_mark() -> None:
    inst = moving()
    assert inst.flipped([]).quiesce == 0.0
    assert inst.move_cancelled("off").quiesce == 0.0
    assert inst.copy().quiescing(5.0).quiesce == 5.0


async def test_a_drain_flips_only_once_the_old_node_says_its_copy_is_drained() -> None:
    async with Leader() as lead:
        await lead.add_node("a")
        await lead.apply(spec(replicas=1))
        await lead.running("web", 1)
        await lead.add_node("b")
        said = lead.store.keys.overlay_applied("a")
        await lead.store.put(said, OverlayApplied("a", 1, 0.0))
        await lead.api.set_draining("a", True)
        marked = await lead.until(lambda: next((i for i in lead.instances() if i.quiesce), None),
                                  timeout=10, what="the old copy quiescing")
        assert marked.node == "a" and marked.next_node == "b"
        await asyncio.sleep(1.0)  # the new copy is ready: only the old node's word is missing
        now = lead.instances()[0]
        assert (now.node, now.quiesce) == ("a", marked.quiesce)
        await lead.store.put(said, OverlayApplied("a", 1, 0.0, {marked.key: marked.quiesce}))
        after = await lead.until(lambda: next((i for i in lead.instances() if i.node == "b"),
                                              None), timeout=3, what="the flip")
        assert not after.quiesce and not after.next_node and after.ip == marked.ip


async def test_a_drain_flips_on_the_bound_when_the_old_node_never_says(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(moves, "QUIESCE_WAIT", 1.0)
    async with Leader() as lead:
        await lead.add_node("a")
        await lead.apply(spec(replicas=1))
        await lead.running("web", 1)
        await lead.add_node("b")
        await lead.store.put(lead.store.keys.overlay_applied("a"), OverlayApplied("a", 1, 0.0))
        await lead.api.set_draining("a", True)
        await lead.until(lambda: next((i for i in lead.instances() if i.quiesce), None),
                         timeout=10, what="the old copy quiescing")
        after = await lead.until(lambda: next((i for i in lead.instances() if i.node == "b"),
                                              None), timeout=5, what="the flip on the bound")
        assert not after.quiesce


def test_the_agent_gates_a_quiescing_copy_here_and_gates_again_for_a_new_mark() -> None:
    here, elsewhere = moving("a", 100.0, 0), moving("c", 100.0, 1)
    still = Instance("ns", "web", 2, 1, node="a", ip="10.244.0.4")
    records = {i.key: i for i in (here, elsewhere, still)}
    p = plan("a", records, {})
    assert [i.key for i in p.close] == [here.key] and not p.open and not p.forget
    assert not plan("a", records, {here.key: 100.0}).close  # gated for this mark already
    assert [i.key for i in plan("a", records, {here.key: 90.0}).close] == [here.key]


def test_a_called_off_move_lifts_the_gate_and_a_flip_forgets_it() -> None:
    called_off = moving("a").move_cancelled("off")
    flipped = moving("a", index=1).flipped([])
    p = plan("a", {called_off.key: called_off, flipped.key: flipped},
             {called_off.key: 100.0, flipped.key: 100.0, "ns/web-9": 100.0})
    assert p.open == [called_off.key]  # its copy is still here and serves again
    assert p.forget == [flipped.key, "ns/web-9"]  # moved away or gone: the gate goes with it
    assert not p.close


TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0
   1: 0500550A:1F90 0300550A:A1B2 01 00000000:00000000 00:00000000 00000000     0
   2: 0500550A:1F90 0300550A:A1B3 06 00000000:00000000 00:00000000 00000000     0
   3: 0500550A:1F90 0300550A:A1B4 08 00000000:00000000 00:00000000 00000000     0
   4: 0500550A:1F90 0300550A:A1B5 05 00000000:00000000 00:00000000 00000000     0
   5: 0100007F:1F90 0100007F:A1B6 01 00000000:00000000 00:00000000 00000000     0
"""
TCP6 = """  sl  local_address                         remote_address                        st
   0: 0000000000000000FFFF00000500550A:1F90 0000000000000000FFFF00000300550A:C000 01 0
   1: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:C001 01 0
"""


def test_connections_in_use_on_the_instance_ip_are_counted() -> None:
    # ESTABLISHED and CLOSE_WAIT on 10.85.0.5 count; LISTEN, TIME_WAIT, FIN_WAIT2 and
    # loopback do not; a v4-mapped IPv6 one does
    assert count_busy(TCP, "10.85.0.5") == 2
    assert count_busy(TCP6, "10.85.0.5") == 1
    assert count_busy(TCP, "10.85.0.6") == 0
