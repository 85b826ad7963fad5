"""What lost and draining nodes mean for an instance (DESIGN.md §6): pure decisions, each a
new record plus the host-port claims it gives up and the events to tell.

- An instance on a NotReady node becomes NeedMigration (NodeLost) and stays bound to that
  node until its copy there is fenced (`fence_wait`, `fenced`). Only then, with
  `migration: auto`, does it go back to Pending (placed elsewhere with its name, IP and
  request); with `manual` it waits for `sigmactl migrate`, or for its node to come back.
- At most one live copy: a copy is fenced when the lost node's engine has stopped it (the
  master asks it), or when the node's heartbeat lease has lapsed and `grace` seconds more
  have passed (an agent that cannot renew its lease stops its own containers before the
  lease can lapse: sigmad.node.fence). An agent that holds its lease but whose engine does
  not answer cannot fence: its copies count as live until its engine answers.
- An instance whose node is lost while it moves lands on the node booked for the move, once
  its old copy is fenced. One with SSD volumes goes with new empty disks: its old disks stay
  claimed (retained, with its data), and an event says where.
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


@dataclass(frozen=True)
class Loss:
    """What a master knows of a NotReady node: whether its agent still holds its heartbeat
    lease (`alive`: its engine does not answer it), else when the lease lapsed (`lapsed`,
    on the master's monotonic clock; a master that found it lapsed counts from then)."""

    alive: bool
    lapsed: float = 0.0


def node_change(inst: Instance, ready: set[str] | frozenset[str],
                policy: str) -> Transition | None:
    """What its node's (or its next node's) readiness calls for; None if nothing (a lost
    node's instance then waits for its fence: `needs_fence`). `policy`: its app's
    `migration` policy (it matters once the copy is fenced: `fenced`)."""
    lost = bool(inst.node) and inst.node not in ready
    if inst.next_node and inst.next_node not in ready and not lost:
        return Transition(inst.move_cancelled(f"move to {inst.next_node} called off: the node "
                                              "is NotReady"),
                          [(inst.next_node, inst.next_ports)])
    if inst.state == State.NEED_MIGRATION and not lost and inst.node and \
            inst.reason.startswith(NODE_LOST):  # (an SSDLost one waits for `migrate`)
        new = inst.resumed()
        return Transition(new, [], [(new.reason, False)])
    if lost and inst.state not in (State.PENDING, State.TERMINATING, State.NEED_MIGRATION):
        new = inst.lost_node()
        return Transition(new, [], [(f"NeedMigration: {new.reason}", True)])
    return None


def needs_fence(inst: Instance, ready: set[str] | frozenset[str]) -> bool:
    """Whether its copy on its lost node must be fenced before anything else happens."""
    return inst.state == State.NEED_MIGRATION and bool(inst.node) and \
        inst.node not in ready and not inst.fence


def fence_wait(loss: Loss, grace: float, now: float) -> float | None:
    """Seconds until a copy its node's engine did not stop counts as fenced by the lapse
    of the node's lease (0: it does now); None while the node's agent holds its lease (it
    is alive and its engine may still run the copy: only the engine can confirm)."""
    if loss.alive:
        return None
    return max(0.0, loss.lapsed + grace - now)


def fenced(inst: Instance, how: str, stopped: list[str], ready: set[str] | frozenset[str],
           policy: str) -> Transition:
    """Its copy on its lost node is fenced (`how`; `stopped`: the container ids the node's
    engine stopped): it lands on a live move's next node, or with `auto` goes Pending to be
    placed elsewhere, or with `manual` stays NeedMigration, now free to `sigmactl migrate`."""
    new = inst.fenced(how, stopped)
    events = [(f"fenced: {how}", False)]
    if inst.next_node and inst.next_node in ready:
        moved = new.continued_on_next()
        moved.fence = how
        return Transition(moved, [(inst.node, inst.host_ports)],
                          [*events, (moved.reason, True)])
    if policy != "auto":
        return Transition(new, [], events)
    releases = [(inst.node, inst.host_ports)]
    if inst.next_node:
        releases.append((inst.next_node, inst.next_ports))
    events.append(("migrating (migration: auto)", False))
    if inst.ssds:
        disks = ", ".join(f"{d.disk} ({d.volume})" for d in inst.ssds)
        events.append((f"moving with new empty disks: its data stays on {inst.node}, disk "
                       f"{disks} retained (sigmactl ssd release {inst.node}/DISK frees it)",
                       True))
    return Transition(new.unbound(f"migrating: {new.reason}"), releases, events)


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
    """`sigmactl migrate`: a NeedMigration instance whose old copy is fenced is placed anew
    (on `to` if given). The caller checks `inst.fence` (see `unfenced`)."""
    new = inst.unbound(f"migrating{' to ' + to if to else ''}: {inst.reason} (sigmactl migrate)")
    new.target = to
    releases = [(inst.node, inst.host_ports)]
    if inst.next_node:
        releases.append((inst.next_node, inst.next_ports))
    return Transition(new, releases)


def unfenced(inst: Instance, ready: set[str] | frozenset[str]) -> str:
    """Why `sigmactl migrate` must wait for this NeedMigration instance ("" if it may go)."""
    if inst.node and inst.node in ready:
        return f"its node {inst.node} is Ready again: it resumes there"
    if inst.fence or not inst.node:
        return ""
    return (f"its copy on {inst.node} is not fenced yet ({inst.reason}); the master moves "
            f"it once {inst.node}'s engine stops it or {inst.node}'s heartbeat lease has "
            "lapsed plus the fence grace: try again then")
