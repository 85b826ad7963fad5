"""The scheduler's view of the cluster at one etcd revision: nodes and what they have booked."""

from __future__ import annotations

from dataclasses import dataclass, field

from sigmad.models import DEFAULT_PORT_RANGE, Instance, Node, Overcommit
from sigmad.spec import Resources


@dataclass
class NodeInfo:
    """One node as the scheduler sees it. Only requests are booked; limits are cgroup caps."""

    name: str
    labels: dict[str, str]
    allocatable: Resources
    ready: bool = True
    draining: bool = False
    requested: Resources = field(default_factory=Resources)
    overcommit: Overcommit = field(default_factory=Overcommit)
    ports: set[int] = field(default_factory=set)  # host ports in use
    port_range: tuple[int, int] = (DEFAULT_PORT_RANGE[0], DEFAULT_PORT_RANGE[1])
    apps: dict[str, int] = field(default_factory=dict)  # app key `ns/app` → replicas here
    lock: int = 0  # mod_revision of the node's lock key; 0 when absent

    def capacity(self) -> Resources:
        """What requests may add up to: allocatable times the overcommit ratio."""
        return Resources(
            int(self.allocatable.cpu_m * self.overcommit.cpu),
            int(self.allocatable.memory * self.overcommit.memory),
        )

    def free(self) -> Resources:
        """Capacity left for requests (negative when over-booked)."""
        cap = self.capacity()
        return Resources(cap.cpu_m - self.requested.cpu_m, cap.memory - self.requested.memory)

    def lacks(self, more: Resources) -> list[str]:
        """The resources ("cpu", "memory") that cannot grow by `more` here (only growth
        counts: a shrinking or best-effort request always fits)."""
        free = self.free()
        return [what for what, grow, room in (("cpu", more.cpu_m, free.cpu_m),
                                              ("memory", more.memory, free.memory))
                if grow > 0 and grow > room]

    def free_ports(self) -> int:
        """How many host ports of the range are not in use."""
        lo, hi = self.port_range
        return max(0, hi - lo + 1 - sum(1 for p in self.ports if lo <= p <= hi))


@dataclass
class Snapshot:
    revision: int
    nodes: dict[str, NodeInfo]


def build_snapshot(
    nodes: list[Node],
    ready: set[str],
    instances: list[Instance],
    revision: int,
    locks: dict[str, int] | None = None,
) -> Snapshot:
    """Nodes (by name) with what every instance bound to one (`node` set) books on it: its
    request, its host ports and one replica of its app."""
    locks = locks or {}
    infos = {
        n.name: NodeInfo(
            n.name, dict(n.labels), Resources(n.allocatable.cpu_m, n.allocatable.memory),
            n.name in ready, n.draining,
            overcommit=Overcommit(n.overcommit.cpu, n.overcommit.memory),
            port_range=(n.port_range[0], n.port_range[1]), lock=locks.get(n.name, 0),
        )
        for n in sorted(nodes, key=lambda n: n.name)
    }
    for inst in instances:
        # A moving instance books its node and the node it moves to.
        for node, ports in ((inst.node, inst.host_ports), (inst.next_node, inst.next_ports)):
            info = infos.get(node)
            if info is None:
                continue
            info.requested.cpu_m += inst.request.cpu_m
            info.requested.memory += inst.request.memory
            info.ports.update(ports.values())
            app = f"{inst.namespace}/{inst.app}"
            info.apps[app] = info.apps.get(app, 0) + 1
    return Snapshot(revision, infos)


class Room:
    """What is left on one node while a `place` call books onto it: free cpu, memory and
    host ports, plus the effective capacity the rankers share against. A working copy: the
    snapshot's NodeInfo is never changed. `version` grows with every booking, so a score
    cached against an older version is known to be stale."""

    __slots__ = ("cpu", "inv_cpu", "inv_memory", "memory", "ports", "taken", "version")

    def __init__(self, info: NodeInfo) -> None:
        cap = info.capacity()
        free = info.free()
        self.cpu = free.cpu_m
        self.memory = free.memory
        self.ports = info.free_ports()
        self.inv_cpu = 1.0 / cap.cpu_m if cap.cpu_m > 0 else 0.0
        self.inv_memory = 1.0 / cap.memory if cap.memory > 0 else 0.0
        self.taken: set[int] = set()  # host ports given out by this call
        self.version = 0

    def book(self, cpu: int, memory: int, ports: int) -> None:
        """Take a request and `ports` host ports."""
        self.cpu -= cpu
        self.memory -= memory
        self.ports -= ports
        self.version += 1
