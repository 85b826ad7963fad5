"""Live moves (`sigmactl drain`): an instance's new copy starts on the node the scheduler
booked for it (`next_node`), with the instance's IP and MAC, while the old copy keeps
serving; once every container of the new copy is ready the record flips to the new node (the
agents re-point the tunnel FDB at once) and, FLIP_GRACE later, the old copy stops with
`KilledBySigma(migrated)` (the controller removes it as a stray of the old node). A copy that
fails to start cancels the move and frees the booking. The new copy starts only once its
pinned config versions are in place on the new node (`config_input`: sigmad.control.drive).

While both copies run, each host reaches exactly one of them: peers follow the record (the
old node until the flip), so the overlay still has one holder of the IP per path.
"""

from __future__ import annotations

import dataclasses

from sigmad.control.containers import EngineWatch
from sigmad.control.drive import ConfigInput, Report, Runner
from sigmad.control.migration import Transition
from sigmad.engine import Engine
from sigmad.models import AppRecord, Instance, Node
from sigmad.reasons import State

FLIP_GRACE = 1.0  # seconds the old copy keeps answering after the flip


async def move_step(inst: Instance, app: AppRecord, new_engine: Engine, new_node: Node,
                    watch: EngineWatch, report: Report,
                    config_input: ConfigInput | None = None) -> Transition | None:
    """One step of a live move on the new node (`watch`: its containers): a Transition to
    write (the flip, or the move called off), or None while the new copy is still starting
    (step again soon)."""
    copy = dataclasses.replace(
        inst.copy(), node=inst.next_node, host_ports=dict(inst.next_ports),
        state=State.SCHEDULED, reason="", containers=[], terminations=[], next_start=0.0,
        streak=0,
    )
    await Runner(new_engine, watch, copy, app, new_node, report, config_input).step()
    if copy.state == State.FAILED_TO_START:  # the runner removed what it had made
        why = f"move to {inst.next_node} failed: {copy.reason}"
        return Transition(inst.move_cancelled(why), [(inst.next_node, inst.next_ports)],
                          [(why, True)])
    if copy.state != State.RUNNING:
        return None
    return Transition(inst.flipped(copy.containers), [(inst.node, inst.host_ports)],
                      [(f"moved from {inst.node} to {inst.next_node} ({inst.move}); the old "
                        f"copy stops in {FLIP_GRACE:g}s", False)])
