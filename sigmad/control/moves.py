"""Live moves (`sigmactl drain`): an instance's new copy starts on the node the scheduler
booked for it (`next_node`), with the instance's IP and MAC, while the old copy keeps
serving; once every container of the new copy is ready the record flips to the new node (the
agents re-point the tunnel FDB at once) and the old copy stops with
`KilledBySigma(migrated)` (the controller removes it as a stray of the old node) only once
every Ready node's agent says its FDB has applied the flip (`overlay-applied/{node}`, at or
past the flipped record's revision) and FLIP_GRACE more has passed (bounded by FLIP_WAIT):
a peer whose FDB still pointed at the old node would otherwise send into a stopped copy. A copy that
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
from sigmad.control.rollout import ready_for
from sigmad.engine import Engine
from sigmad.models import AppRecord, Instance, Node, now
from sigmad.reasons import State

FLIP_GRACE = 0.5  # seconds the old copy keeps answering once every agent has the flip
FLIP_WAIT = 10.0  # at most this long for the agents to say they have applied the flip
FLIP_RECHECK = 0.2  # seconds between two looks at what the agents have applied


async def move_step(inst: Instance, app: AppRecord, new_engine: Engine, new_node: Node,
                    watch: EngineWatch, report: Report,
                    config_input: ConfigInput | None = None,
                    min_ready: float = 0.0) -> Transition | None:
    """One step of a live move on the new node (`watch`: its containers): a Transition to
    write (the flip, or the move called off), or None while the new copy is still starting
    (step again soon). `app` is what the new copy runs (a release step's target revision).
    For a release step (`inst.release`), the new copy must have been ready `min_ready`
    seconds before the flip, and a container of it that ends calls the move off: the step
    failed (`release_failed`), and the old copy never stopped serving."""
    copy = dataclasses.replace(
        inst.copy(), node=inst.next_node, host_ports=dict(inst.next_ports),
        state=State.SCHEDULED, reason="", containers=[], terminations=[], next_start=0.0,
        streak=0, generation=app.template_generation,
    )
    await Runner(new_engine, watch, copy, app, new_node, report, config_input).step()
    failed = ""
    if copy.state == State.FAILED_TO_START:  # the runner removed what it had made
        failed = copy.reason
    elif inst.release and copy.terminations:
        end = copy.terminations[-1]
        failed = f"container {end.container} of the new copy ended: {end.reason}"
    if failed:
        why = f"move to {inst.next_node} failed: {failed}"
        new = inst.move_cancelled(why)
        if inst.release:
            new.release_failed = failed
        return Transition(new, [(inst.next_node, inst.next_ports)], [(why, True)])
    if copy.state != State.RUNNING or ready_for(copy, now()) < min_ready:
        return None
    new = inst.flipped(copy.containers)
    new.generation = copy.generation
    return Transition(new, [(inst.node, inst.host_ports)],
                      [(f"moved from {inst.node} to {inst.next_node} ({inst.move}); the old "
                        "copy stops once every node's overlay has the flip", False)])
