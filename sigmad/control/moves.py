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

Before the flip the old copy drains ("quiesce"): once the new copy is ready the record is
first marked quiescing (`quiesce`: when), the old node's agent drops new TCP connections to
the old copy (a dropped SYN is sent again by the client's kernel about a second later, and
reaches the new copy after the flip) and says in its `overlay-applied/{node}` record when the
old copy has no connection left (`drained`, bounded by the agent's DRAIN_WAIT: a longer-lived
connection is cut as by any restart). The flip waits for that (`flip_due`), at most
QUIESCE_WAIT from the mark; an old node that is not Ready, or whose agent never says what it
drained (an older agent, a hollow host), is not waited for. The mark is in the record, so a
new leader resumes the wait where it was; a move called off clears it, and the agent lifts
its filter.

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
from sigmad.models import AppRecord, ContainerStatus, Instance, Node, now
from sigmad.reasons import State

FLIP_GRACE = 0.5  # seconds the old copy keeps answering once every agent has the flip
FLIP_WAIT = 10.0  # at most this long for the agents to say they have applied the flip
FLIP_RECHECK = 0.2  # seconds between two looks at what the agents have applied
QUIESCE_WAIT = 5.0  # at most this long from the quiesce mark for the old node's drain


@dataclasses.dataclass(frozen=True)
class OldCopy:
    """What the master knows of a moving instance's old node: whether it is Ready, and the
    `drained` map of its agent's `overlay-applied` record (None: its agent never said one)."""

    ready: bool
    drained: dict[str, float] | None


def flip_due(inst: Instance, old: OldCopy, clock: float) -> bool:
    """Whether a quiescing move (`inst.quiesce` set) may flip now (`clock`: wall time): its
    old node's agent said the copy is drained for this very mark, or the old node is not
    Ready or never says, or QUIESCE_WAIT has passed since the mark."""
    if not old.ready or old.drained is None:
        return True
    if old.drained.get(inst.key) == inst.quiesce:
        return True
    return clock - inst.quiesce >= QUIESCE_WAIT


def drained_flip(inst: Instance, app: AppRecord, watch: EngineWatch, old: OldCopy,
                 seen: dict[str, tuple[str, list[ContainerStatus]]],
                 clock: float) -> Transition | None:
    """The flip of a quiescing move that is due (`flip_due`) when every container of its new
    copy was ready at the last step (`seen`, see `move_step`) and still runs (`watch`: the new
    node's containers): no engine call, so the flip never waits behind other steps on that
    engine while the old copy drops new connections. None: step as usual."""
    node, known = seen.get(inst.key, ("", []))
    if not inst.quiesce or node != inst.next_node or \
            len(known) != len(app.spec.containers) or not all(c.ready for c in known):
        return None
    running = {c.id for c in watch.of(inst.key) if c.running}
    if any(c.id not in running for c in known) or not flip_due(inst, old, clock):
        return None
    return _flip(inst, known, app.template_generation)


def _flip(inst: Instance, containers: list[ContainerStatus], generation: int) -> Transition:
    new = inst.flipped(containers)
    new.generation = generation
    return Transition(new, [(inst.node, inst.host_ports)],
                      [(f"moved from {inst.node} to {inst.next_node} ({inst.move}); the old "
                        "copy stops once every node's overlay has the flip", False)])


async def move_step(inst: Instance, app: AppRecord, new_engine: Engine, new_node: Node,
                    watch: EngineWatch, report: Report,
                    config_input: ConfigInput | None = None,
                    min_ready: float = 0.0,
                    old: OldCopy = OldCopy(True, None),
                    seen: dict[str, tuple[str, list[ContainerStatus]]] | None = None,
                    ) -> Transition | None:
    """One step of a live move on the new node (`watch`: its containers): a Transition to
    write (the quiesce mark, the flip, or the move called off), or None while the new copy
    is still starting or the old one drains (step again soon; `old`: its node, `flip_due`).
    `app` is what the new copy runs (a release step's target revision).
    For a release step (`inst.release`), the new copy must have been ready `min_ready`
    seconds before the flip, and a container of it that ends calls the move off: the step
    failed (`release_failed`), and the old copy never stopped serving. `seen` keeps the new
    copy's container statuses from one step to the next (instance → node, statuses), so a
    container found ready is not probed again (the flip of a drained copy waits for no probe);
    the caller drops its entry once the move has ended."""
    memo = seen if seen is not None else {}
    node, known = memo.get(inst.key, ("", []))
    copy = dataclasses.replace(
        inst.copy(), node=inst.next_node, host_ports=dict(inst.next_ports),
        state=State.SCHEDULED, reason="", containers=list(known) if node == inst.next_node
        else [], terminations=[], next_start=0.0, streak=0,
        generation=app.template_generation,
    )
    await Runner(new_engine, watch, copy, app, new_node, report, config_input).step()
    memo[inst.key] = (inst.next_node, copy.containers)
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
    if not inst.quiesce:
        return Transition(inst.quiescing(now()), [],
                          [(f"new copy on {inst.next_node} ready: draining the old copy on "
                            f"{inst.node} before the flip", False)])
    if not flip_due(inst, old, now()):
        return None
    return _flip(inst, copy.containers, copy.generation)
