"""What lost and draining nodes mean for an instance (DESIGN.md §6): pure decisions, each a
new record plus the host-port claims it gives up and the events to tell.

- An instance on a NotReady node becomes NeedMigration (NodeLost); with `migration: auto` it
  goes straight back to Pending (placed elsewhere with its name, IP and request, and new
  empty disks: its old disks stay claimed, retained), with `manual` it waits for
  `sigmactl migrate`, or for its node to come back.
- An instance whose node is lost while it moves lands on the node booked for the move.
- A move whose destination is lost is called off.
- An instance whose disk (an SSD volume's) is broken becomes NeedMigration (SSDLost), and
  with `migration: auto` Pending, to be placed with new disks; the broken disk stays
  claimed (what is left of the data is there).
- A draining node gives up one instance at a time to a live move (sigmad.control.moves).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sigmad.models import Instance
from sigmad.reasons import NODE_LOST, State
from sigmad.store import Versioned


@dataclass
class Transition:
    """A new record, the host ports (node → name → port) whose claims it releases, and the
    events (message, warning) that say what happened."""

    new: Instance
    releases: list[tuple[str, dict[str, int]]] = field(default_factory=list)
    events: list[tuple[str, bool]] = field(default_factory=list)


def node_change(inst: Instance, ready: set[str] | frozenset[str],
                policy: str) -> Transition | None:
    """What its node's (or its next node's) readiness calls for; None if nothing. `policy`:
    its app's `migration` policy."""
    lost = bool(inst.node) and inst.node not in ready
    if inst.next_node and inst.next_node not in ready and not lost:
        return Transition(inst.move_cancelled(f"move to {inst.next_node} called off: the node "
                                              "is NotReady"),
                          [(inst.next_node, inst.next_ports)])
    if lost and inst.next_node in ready:
        new = inst.continued_on_next()
        return Transition(new, [(inst.node, inst.host_ports)], [(new.reason, True)])
    if inst.state == State.NEED_MIGRATION and not lost and inst.node and \
            inst.reason.startswith(NODE_LOST):  # (an SSDLost one waits for `migrate`)
        new = inst.resumed()
        return Transition(new, [], [(new.reason, False)])
    if lost and inst.state not in (State.PENDING, State.TERMINATING, State.NEED_MIGRATION):
        auto = policy == "auto"
        new = inst.lost_node(auto)
        events = [(f"NeedMigration: NodeLost: node {inst.node} is NotReady", True)]
        if auto:
            events.append(("migrating (migration: auto)", False))
        if auto and inst.ssds:
            disks = ", ".join(f"{d.disk} ({d.volume})" for d in inst.ssds)
            events.append((f"moving with new empty disks: its data stays on {inst.node}, "
                           f"disk {disks} retained (sigmactl ssd release {inst.node}/DISK "
                           "frees it)", True))
        return Transition(new, [(inst.node, inst.host_ports)] if auto else [], events)
    return None


def disk_change(inst: Instance, broken: Mapping[str, str], policy: str) -> Transition | None:
    """What a broken disk of its own calls for (`broken`: disk id on its node → the error);
    None if none of its disks is broken."""
    if inst.state in (State.PENDING, State.TERMINATING, State.NEED_MIGRATION) or not inst.node:
        return None
    lost = [d for d in inst.ssds if d.disk in broken]
    if not lost:
        return None
    d = lost[0]
    why = f"disk {d.disk} of volume {d.volume} on {inst.node} is broken ({broken[d.disk]})"
    auto = policy == "auto"
    events = [(f"NeedMigration: SSDLost: {why}; what is left of its data stays on that disk",
               True)]
    if auto:
        events.append(("migrating with new disks (migration: auto)", False))
    return Transition(inst.lost_ssd(why, auto), [(inst.node, inst.host_ports)] if auto else [],
                      events)


def drain_next(node: str, instances: Iterable[Versioned[Instance]]) -> Versioned[Instance] | None:
    """The instance to move live off draining `node` next: one at a time, each new copy
    ready before the next move starts (None while one moves, or when none is left)."""
    on = sorted((v for v in instances if v.value.node == node), key=lambda v: v.key)
    if any(v.value.move for v in on):
        return None
    return next((v for v in on
                 if v.value.state not in (State.PENDING, State.TERMINATING,
                                          State.NEED_MIGRATION)), None)


def migrate(inst: Instance, to: str) -> Transition:
    """`sigmactl migrate`: a NeedMigration instance is placed anew (on `to` if given)."""
    new = inst.unbound(f"migrating{' to ' + to if to else ''}: {inst.reason} (sigmactl migrate)")
    new.target = to
    return Transition(new, [(inst.node, inst.host_ports)])
