"""The scheduler's view of the cluster at one etcd revision: nodes and what they have booked.

Built from the state cache's per-node usage (O(nodes): nothing is re-summed per round), or
from plain lists of records (tests, benchmarks) through the same NodeUsage arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from sigmad.models import (
    DEFAULT_PORT_RANGE,
    MAX_OVERCOMMIT,
    SSD_READY,
    SSD_RETAINED,
    Instance,
    Node,
    Overcommit,
    Ssd,
    SsdClaim,
)
from sigmad.node.disks import data_path
from sigmad.scheduler.fit import NodeUsage, fit, match_ssds
from sigmad.spec import Resources
from sigmad.store import Versioned


@dataclass(frozen=True, slots=True)
class FreeSsd:
    """A disk that may be claimed: `ready`, with no claim. Its claim guards `revision` (its
    record's), so it is never claimed once its agent changed it (e.g. to wipe it)."""

    id: str
    size: int
    revision: int
    source: str  # the host directory bound into the containers


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
    ssds: list[FreeSsd] = field(default_factory=list)  # free disks, smallest first

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

    def short(self, more: Resources, ports: int = 0) -> str | None:
        """The dimension that cannot grow by `more` (and `ports` host ports) here, if any
        (only growth counts: a shrinking or best-effort request always fits)."""
        free = self.free()
        return fit(free.cpu_m, free.memory, self.free_ports(), max(more.cpu_m, 0),
                   max(more.memory, 0), ports)

    def book(self, more: Resources) -> None:
        """Add `more` to what is requested here (a booking made while planning)."""
        self.requested = Resources(self.requested.cpu_m + more.cpu_m,
                                   self.requested.memory + more.memory)

    def free_ports(self) -> int:
        """How many host ports of the range are not in use."""
        lo, hi = self.port_range
        return max(0, hi - lo + 1 - sum(1 for p in self.ports if lo <= p <= hi))


@dataclass(frozen=True, slots=True)
class RetainedSsd:
    """A disk still claimed for an instance's volume while the instance runs elsewhere or
    nowhere (`retained`, mounted, its data kept): given back to that volume when the
    instance is placed on its node again. Its reuse guards the claim's revision."""

    node: str
    id: str
    volume: str
    size: int
    claim: str  # the claim's key
    revision: int  # the claim's
    source: str  # the host directory bound into the containers


@dataclass
class Snapshot:
    revision: int
    nodes: dict[str, NodeInfo]
    retained: dict[str, list[RetainedSsd]] = field(default_factory=dict)  # owner → its disks


def _ratio(value: float) -> float:
    """An overcommit ratio as recorded, or 1.0 (none) for one that is not a number from 1 to
    MAX_OVERCOMMIT (a record its agent's config check did not write: NaN or infinity would
    make every placement pass raise)."""
    return float(value) if isinstance(value, int | float) and \
        1.0 <= value <= MAX_OVERCOMMIT else 1.0


NODE_LABEL = "sigma.node"  # every node carries its name as this label (e.g. to move away from it)


def node_info(node: Node, ready: bool, usage: NodeUsage | None, lock: int = 0,
              ssds: list[FreeSsd] | None = None) -> NodeInfo:
    """The scheduler's NodeInfo of `node` with what `usage` books on it (copied) and its
    free disks."""
    return NodeInfo(
        node.name, {**node.labels, NODE_LABEL: node.name},
        Resources(node.allocatable.cpu_m, node.allocatable.memory),
        ready, node.draining,
        requested=usage.requested if usage else Resources(),
        overcommit=Overcommit(_ratio(node.overcommit.cpu), _ratio(node.overcommit.memory)),
        ports=set(usage.ports) if usage else set(),
        port_range=(node.port_range[0], node.port_range[1]),
        apps=dict(usage.apps) if usage else {},
        lock=lock,
        ssds=sorted(ssds or [], key=lambda d: (d.size, d.id)),
    )


def snapshot_of(nodes: Iterable[Node], ready: set[str] | frozenset[str],
                usage: Mapping[str, NodeUsage], revision: int,
                locks: Mapping[str, int] | None = None,
                ssds: Mapping[str, list[FreeSsd]] | None = None) -> Snapshot:
    """Nodes (by name) with their usage, lock revision and free disks."""
    locks, ssds = locks or {}, ssds or {}
    return Snapshot(revision, {
        n.name: node_info(n, n.name in ready, usage.get(n.name), locks.get(n.name, 0),
                          ssds.get(n.name))
        for n in sorted(nodes, key=lambda n: n.name)
    })


def free_ssds(disks: Iterable[Versioned[Ssd]], claimed: set[tuple[str, str]]
              ) -> dict[str, list[FreeSsd]]:
    """node → its disks that may be claimed: `ready`, mounted, and not in `claimed`
    ((node, id) of every claim)."""
    out: dict[str, list[FreeSsd]] = {}
    for v in disks:
        d = v.value
        if d.state == SSD_READY and d.mount and (d.node, d.id) not in claimed:
            out.setdefault(d.node, []).append(FreeSsd(d.id, d.size, v.mod_revision,
                                                      data_path(d.mount)))
    return out


def retained_ssds(disks: Iterable[Versioned[Ssd]], claims: Mapping[str, Versioned[SsdClaim]],
                  claim_key: Callable[[str, str], str]) -> dict[str, list[RetainedSsd]]:
    """Instance key → its disks that are `retained` (mounted, claimed for one of its volumes
    by name): what it gets back if it is placed on their node again."""
    out: dict[str, list[RetainedSsd]] = {}
    for v in disks:
        d = v.value
        if d.state != SSD_RETAINED or not d.mount:
            continue
        key = claim_key(d.node, d.id)
        claim = claims.get(key)
        if claim is None or not claim.value.volume or claim.value.owner != d.owner:
            continue
        out.setdefault(d.owner, []).append(RetainedSsd(
            d.node, d.id, claim.value.volume, d.size, key, claim.mod_revision, data_path(d.mount)))
    return out


def usage_of(instances: Iterable[Instance]) -> dict[str, NodeUsage]:
    """What every instance bound to a node (or moving to one) books there."""
    usage: dict[str, NodeUsage] = {}
    for inst in instances:
        for node, ports in ((inst.node, inst.host_ports), (inst.next_node, inst.next_ports)):
            if node:
                usage.setdefault(node, NodeUsage()).add(inst.request, inst.app_key,
                                                        ports.values())
    return usage


def build_snapshot(
    nodes: list[Node],
    ready: set[str],
    instances: list[Instance],
    revision: int,
    locks: dict[str, int] | None = None,
) -> Snapshot:
    """Nodes (by name) with what every instance bound to one books on it: its request, its
    host ports and one replica of its app (a moving instance books both of its nodes)."""
    return snapshot_of(nodes, ready, usage_of(instances), revision, locks)


class Room:
    """What is left on one node while a `place` call books onto it: free cpu, memory and
    host ports, plus the effective capacity the rankers share against. A working copy: the
    snapshot's NodeInfo is never changed. `version` grows with every booking, so a score
    cached against an older version is known to be stale."""

    __slots__ = ("cpu", "inv_cpu", "inv_memory", "memory", "ports", "ssd_sizes", "ssds",
                 "taken", "version")

    def __init__(self, info: NodeInfo) -> None:
        cap = info.capacity()
        free = info.free()
        self.cpu = free.cpu_m
        self.memory = free.memory
        self.ports = info.free_ports()
        self.inv_cpu = 1.0 / cap.cpu_m if cap.cpu_m > 0 else 0.0
        self.inv_memory = 1.0 / cap.memory if cap.memory > 0 else 0.0
        self.taken: set[int] = set()  # host ports given out by this call
        self.ssds = list(info.ssds)  # free disks not given out by this call
        self.ssd_sizes = [d.size for d in self.ssds]
        self.version = 0

    def book(self, cpu: int, memory: int, ports: int) -> None:
        """Take a request and `ports` host ports."""
        self.cpu -= cpu
        self.memory -= memory
        self.ports -= ports
        self.version += 1

    def take_ssds(self, needs: list[int]) -> list[FreeSsd]:
        """Give out a free disk for each of `needs` (see fit.match_ssds: the caller checked
        that they fit)."""
        found = match_ssds(self.ssd_sizes, needs)
        assert found is not None
        disks = [self.ssds[i] for i in found]
        for i in sorted(found, reverse=True):
            del self.ssds[i], self.ssd_sizes[i]
        self.version += 1
        return disks
