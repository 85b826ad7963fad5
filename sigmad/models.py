"""Cluster records kept in etcd: nodes, apps, instances (DESIGN.md §2, §3)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sigmad.spec import AppSpec, Resources

# Instance states (DESIGN.md §3).
PENDING = "Pending"
SCHEDULED = "Scheduled"
STARTING = "Starting"
RUNNING = "Running"
EXITED = "Exited"
FAILED = "Failed"
FAILED_TO_START = "FailedToStart"
NEED_MIGRATION = "NeedMigration"
TERMINATING = "Terminating"

# Node states.
READY = "Ready"
NOT_READY = "NotReady"
DRAINING = "Draining"

MAX_TERMINATIONS = 5


def now() -> float:
    """Wall-clock seconds; records carry wall time so operators can read them."""
    return time.time()


@dataclass
class Overcommit:
    """How far a node's requests may exceed its allocatable: 1.0 = not at all."""

    cpu: float = 1.0
    memory: float = 1.0


DEFAULT_PORT_RANGE = [31000, 32767]


@dataclass
class Node:
    """A host: its engine, labels and capacity. The agent writes it; readiness is the
    presence of its leased heartbeat key."""

    name: str
    engine: str
    address: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    capacity: Resources = field(default_factory=Resources)
    allocatable: Resources = field(default_factory=Resources)
    overcommit: Overcommit = field(default_factory=Overcommit)
    port_range: list[int] = field(default_factory=lambda: list(DEFAULT_PORT_RANGE))
    draining: bool = False
    engine_version: str = ""
    updated: float = 0.0


@dataclass
class NodeLock:
    """The value of `alloc/node/{node}`: who last placed there, and a token unique to that
    transaction (so a scheduler can tell its own write from another's)."""

    by: str = ""
    token: str = ""


@dataclass
class Owner:
    """The value of `alloc/port/{node}/{port}` and `alloc/ip/{ip}`: the owning instance
    (`ns/app-index`)."""

    owner: str = ""


@dataclass
class AppRecord:
    """An app's desired state. `generation` grows on every change of the spec;
    `template_generation` only when what an instance runs changes (anything but `replicas`),
    so scaling never replaces running instances."""

    spec: AppSpec
    generation: int = 1
    template_generation: int = 1
    created: float = 0.0
    updated: float = 0.0


@dataclass
class ContainerStatus:
    name: str
    id: str = ""
    state: str = ""
    exit_code: int | None = None
    started_at: str = ""
    finished_at: str = ""
    ready: bool = False


@dataclass
class Termination:
    """One end of an instance's container, with its one authoritative reason."""

    container: str
    reason: str
    at: float
    container_id: str = ""


@dataclass
class Instance:
    """One replica `APP-INDEX` of an app; it, not its container, owns its place and resources."""

    namespace: str
    app: str
    index: int
    generation: int  # the app's template_generation its containers were made from
    state: str = PENDING
    reason: str = ""
    unschedulable: dict[str, int] = field(default_factory=dict)  # filter reason → node count
    node: str = ""
    ip: str = ""
    host_ports: dict[str, int] = field(default_factory=dict)  # port name → host port
    target: str = ""  # the node a `migrate --to` asked for ("" = wherever it fits)
    move: str = ""  # why a live move was asked for (e.g. "drain h2"); the scheduler books it
    next_node: str = ""  # a live move in progress: booked there too, started there first
    next_ports: dict[str, int] = field(default_factory=dict)  # host ports booked on it
    request: Resources = field(default_factory=Resources)
    containers: list[ContainerStatus] = field(default_factory=list)
    restarts: int = 0
    streak: int = 0  # failures in a row (each ran less than a minute): drives the backoff
    next_start: float = 0.0
    terminations: list[Termination] = field(default_factory=list)
    created: float = 0.0
    updated: float = 0.0

    @property
    def name(self) -> str:
        """The stable name `APP-INDEX`."""
        return f"{self.app}-{self.index}"

    @property
    def key(self) -> str:
        """`namespace/APP-INDEX`, the value of the `sigma.instance` container label."""
        return f"{self.namespace}/{self.name}"

    def unbind(self, reason: str) -> None:
        """Back to Pending, to be placed anew: it keeps its name, IP and request; its node,
        host ports and containers stay behind (the caller releases the port keys)."""
        self.state, self.reason = PENDING, reason
        self.node, self.host_ports, self.containers = "", {}, []
        self.move, self.next_node, self.next_ports = "", "", {}
        self.next_start, self.streak, self.updated = 0.0, 0, now()

    def terminated(self, container: str, reason: str, container_id: str = "") -> None:
        """Record a container end, keeping the last few."""
        self.terminations.append(Termination(container, reason, now(), container_id))
        del self.terminations[:-MAX_TERMINATIONS]
