"""A live move drains its old copy before the flip: the master's pure decision
(sigmad.control.moves.flip_due), the controller on fakes waiting for the old node's word,
the agent's gate plan (sigmad.node.quiesce.plan) and its reading of /proc/net/tcp
(sigmad.network.gate)."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
from pyroute2.netlink.rtnl.tcmsg import tcmsg

from sigmad import records
from sigmad.control import moves
from sigmad.control.containers import EngineWatch
from sigmad.control.moves import OldCopy, drained_flip, flip_due
from sigmad.engine import LABEL_INSTANCE, ContainerState
from sigmad.models import AppRecord, ContainerStatus, Instance, OverlayApplied
from sigmad.network.gate import SHOT, UNSPEC, count_busy, request, syn_program
from sigmad.node.quiesce import plan
from sigmad.spec import AppSpec, ContainerSpec
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


def test_an_older_agents_record_says_nothing_drained_so_the_flip_does_not_wait() -> None:
    old = records.from_dict(OverlayApplied, {"node": "a", "revision": 7, "at": 1.0})
    assert old.drained is None and flip_due(moving(), OldCopy(True, old.drained), 100.0)


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
        await lead.store.put(said, OverlayApplied("a", 1, 0.0, {}))
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
        await lead.store.put(lead.store.keys.overlay_applied("a"), OverlayApplied("a", 1, 0.0, {}))
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


def run_cbpf(program: list[tuple[int, int, int, int]], frame: bytes) -> int:
    """A classic BPF interpreter for the opcodes the gate uses (its verdict on `frame`)."""
    a = x = pc = 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code == 0x28:
            a = int.from_bytes(frame[k:k + 2], "big")
        elif code == 0x30:
            a = frame[k]
        elif code == 0x20:
            a = int.from_bytes(frame[k:k + 4], "big")
        elif code == 0x50:
            a = frame[x + k]
        elif code == 0xB1:
            x = 4 * (frame[k] & 0xF)
        elif code == 0x54:
            a &= k
        elif code == 0x15:
            pc += jt if a == k else jf
        elif code == 0x45:
            pc += jt if a & k else jf
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"opcode {code:#x}")


def frame(dst: str, flags: int, proto: int = 6, options: int = 0, frag: int = 0,
          ethertype: int = 0x0800) -> bytes:
    ip = bytes([0x45 + options, 0]) + bytes(4) + frag.to_bytes(2, "big") + bytes([64, proto]) \
        + bytes(2) + socket.inet_aton("10.0.0.9") + socket.inet_aton(dst) + bytes(4 * options)
    tcp = bytes(13) + bytes([flags]) + bytes(6)
    return bytes(12) + ethertype.to_bytes(2, "big") + ip + tcp


def test_the_gate_drops_a_syn_to_the_instance_and_nothing_else() -> None:
    program = syn_program("10.244.3.7")
    assert run_cbpf(program, frame("10.244.3.7", 0x02)) == SHOT  # SYN
    assert run_cbpf(program, frame("10.244.3.7", 0x02, options=2)) == SHOT  # with IP options
    for passing in (frame("10.244.3.7", 0x12), frame("10.244.3.7", 0x10),  # SYN-ACK, ACK
                    frame("10.244.3.7", 0x11), frame("10.244.3.8", 0x02),  # FIN, another IP
                    frame("10.244.3.7", 0x02, proto=17),  # UDP
                    frame("10.244.3.7", 0x02, frag=5),  # a later fragment
                    frame("10.244.3.7", 0x02, ethertype=0x0806)):  # ARP
        assert run_cbpf(program, passing) == UNSPEC


def test_the_gate_request_encodes_its_own_options_after_tcmsg_compiled() -> None:
    tcmsg()  # (pyroute2 compiles a message class's map once: the gate's must be its own)
    msg = request(7, "10.244.3.7")
    msg.encode()
    ops = b"".join(struct.pack("=HBBI", *op) for op in syn_program("10.244.3.7"))
    assert ops in bytes(msg.data)


def test_a_due_flip_of_a_copy_ready_at_the_last_step_needs_no_engine_call() -> None:
    rec = AppRecord(AppSpec(app="web", containers=[ContainerSpec(name="main", image="b:1")]),
                    generation=1)
    inst = moving(quiesce=100.0)
    watch = EngineWatch("b", None, lambda node, owner: None)  # type: ignore[arg-type]
    ready = [ContainerStatus("main", id="n1", state="running", ready=True)]
    seen = {inst.key: ("b", ready)}
    said = OldCopy(True, {inst.key: 100.0})
    assert drained_flip(inst, rec, watch, said, seen, 100.2) is None  # n1 not seen running
    watch.put(ContainerState("n1", "web-0-main", {LABEL_INSTANCE: inst.key}, True, "running",
                             0, False, "", "", "", 42, ""))
    t = drained_flip(inst, rec, watch, said, seen, 100.2)
    assert t is not None and t.new.node == "b" and t.new.containers == ready
    assert drained_flip(inst, rec, watch, OldCopy(True, {}), seen, 100.2) is None  # not due
    assert drained_flip(inst, rec, watch, said, {inst.key: ("c", ready)}, 100.2) is None
    unready = [ContainerStatus("main", id="n1", state="running", ready=False)]
    assert drained_flip(inst, rec, watch, said, {inst.key: ("b", unready)}, 100.2) is None
