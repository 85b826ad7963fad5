"""The scheduler's view of the cluster at one etcd revision: nodes and what they have booked."""

from __future__ import annotations

from dataclasses import dataclass, field

from sigmad.models import Instance, Node
from sigmad.spec import Resources


@dataclass
class NodeInfo:
    name: str
    labels: dict[str, str]
    allocatable: Resources
    ready: bool = True
    draining: bool = False
    requested: Resources = field(default_factory=Resources)

    def free(self) -> Resources:
        return Resources(
            self.allocatable.cpu_m - self.requested.cpu_m,
            self.allocatable.memory - self.requested.memory,
        )


@dataclass
class Snapshot:
    revision: int
    nodes: dict[str, NodeInfo]


def build_snapshot(
    nodes: list[Node], ready: set[str], instances: list[Instance], revision: int
) -> Snapshot:
    """Nodes with the requests of every instance bound to them subtracted (limits are caps only)."""
    infos = {
        n.name: NodeInfo(n.name, dict(n.labels), n.allocatable, n.name in ready, n.draining)
        for n in nodes
    }
    for inst in instances:
        info = infos.get(inst.node)
        if info is not None:
            info.requested.cpu_m += inst.request.cpu_m
            info.requested.memory += inst.request.memory
    return Snapshot(revision, infos)
