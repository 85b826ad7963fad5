"""What lost and draining nodes mean for their instances (DESIGN.md §6): pure decisions over
one read of the cluster, as guarded changes for the controller to write and events to emit.

- An instance on a NotReady node becomes NeedMigration (NodeLost); with `migration: auto` it
  goes straight back to Pending (placed elsewhere with its name, IP and request), with
  `manual` it waits for `sigmactl migrate`, or for its node to come back.
- An instance whose node is lost while it moves lands on the node booked for the move.
- A move whose destination is lost is called off.
- A draining node gives up one instance at a time to a live move (sigmad.moves).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sigmad.models import NEED_MIGRATION, PENDING, SCHEDULED, TERMINATING, Instance, now
from sigmad.store import Guard, Keys, Op, Versioned

Change = tuple[list[Guard], list[Op]]  # what one transaction guards and writes


@dataclass
class Plan:
    changes: list[Change] = field(default_factory=list)
    events: list[tuple[Instance, str, bool]] = field(default_factory=list)  # message, warning

    def write(self, v: Versioned[Instance], *ops: Op) -> None:
        v.value.updated = now()
        self.changes.append(([Guard(v.key, v.mod_revision)], [Op(v.key, v.value), *ops]))


def port_releases(keys: Keys, node: str, ports: dict[str, int]) -> list[Op]:
    """Deletes of the host-port claims `ports` on `node`."""
    return [Op(keys.port(node, p), delete=True) for p in ports.values()]


def node_losses(keys: Keys, instances: list[Versioned[Instance]], policies: dict[str, str],
                ready: set[str]) -> Plan:
    """The changes lost nodes (not in `ready`) call for; `policies`: app `ns/app` → its
    `migration` policy."""
    plan = Plan()
    for v in instances:
        inst = v.value
        lost = bool(inst.node) and inst.node not in ready
        if inst.next_node and inst.next_node not in ready and not lost:
            released = port_releases(keys, inst.next_node, inst.next_ports)
            inst.move, inst.next_node, inst.next_ports = "", "", {}
            plan.write(v, *released)
        elif lost and inst.next_node in ready:
            released = port_releases(keys, inst.node, inst.host_ports)
            reason = f"NodeLost: node {inst.node} is NotReady; continuing on {inst.next_node}"
            inst.node, inst.host_ports = inst.next_node, inst.next_ports
            inst.move, inst.next_node, inst.next_ports = "", "", {}
            inst.state, inst.reason, inst.containers = SCHEDULED, reason, []
            plan.events.append((inst, reason, True))
            plan.write(v, *released)
        elif inst.state == NEED_MIGRATION and not lost and inst.node:
            inst.state, inst.reason = SCHEDULED, f"node {inst.node} is back"
            plan.events.append((inst, inst.reason, False))
            plan.write(v)
        elif lost and inst.state not in (PENDING, TERMINATING, NEED_MIGRATION):
            for c in inst.containers:
                if c.id and not c.finished_at:
                    inst.terminated(c.name, "NodeLost", c.id)
            inst.state, inst.reason = NEED_MIGRATION, f"NodeLost: node {inst.node} is NotReady"
            plan.events.append((inst, f"NeedMigration: {inst.reason}", True))
            released = []
            if policies.get(f"{inst.namespace}/{inst.app}") == "auto":
                released = port_releases(keys, inst.node, inst.host_ports)
                inst.unbind(f"migrating: {inst.reason}")
                plan.events.append((inst, "migrating (migration: auto)", False))
            plan.write(v, *released)
    return plan


def drains(draining: list[str], instances: list[Versioned[Instance]]) -> Plan:
    """Ask for a live move of one instance at a time off each draining node (the scheduler
    books where it goes; sigmad.moves moves it)."""
    plan = Plan()
    for name in sorted(draining):
        on = sorted((v for v in instances if v.value.node == name), key=lambda v: v.key)
        if any(v.value.move for v in on):
            continue  # one at a time: each new copy ready before the next move starts
        v = next((v for v in on
                  if v.value.state not in (PENDING, TERMINATING, NEED_MIGRATION)), None)
        if v is not None:
            v.value.move = f"drain {name}"
            plan.write(v)
    return plan
