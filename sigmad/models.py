"""Cluster records kept in etcd (nodes, apps, instances: DESIGN.md §2, §3) and the instance's
state transitions.

Invariants:
- a record read from the cache is shared: it is never changed in place. Every transition
  returns a new Instance (`copy` first, then change the copy), so a snapshot never moves
  under its reader;
- an instance, not its container, owns its name, IP, request and (while bound) host ports;
  a transition that leaves a node says which host-port claims to release, the caller
  releases them in the same transaction.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import TypeVar

from sigmad import records
from sigmad.reasons import NODE_LOST, SSD_LOST, Kill, Reason, State
from sigmad.spec import AppSpec, Resources

# Node states (an instance's are sigmad.reasons.State).
READY = "Ready"
NOT_READY = "NotReady"
DRAINING = "Draining"

MAX_TERMINATIONS = 5
MAX_LOG_LINES = 50  # lines of a container's output kept with its termination
MAX_LOG_BYTES = 4096  # and at most this many bytes of them (the newest kept)
R = TypeVar("R")


def now() -> float:
    """Wall-clock seconds; records carry wall time so operators can read them."""
    return time.time()


@dataclass(slots=True)
class Overcommit:
    """How far a node's requests may exceed its allocatable: 1.0 = not at all, at most
    MAX_OVERCOMMIT (checked in the node's config)."""

    cpu: float = 1.0
    memory: float = 1.0


MAX_OVERCOMMIT = 100.0
_INSTANCE_NAME = re.compile(r"(?P<app>[a-z0-9]([-a-z0-9]*[a-z0-9])?)-(?P<index>[0-9]{1,9})")


def split_name(name: str) -> tuple[str, int] | None:
    """(app, index) of an instance name `APP-INDEX`, or None if `name` is not one (the whole
    of it, ASCII digits only: "web-²" and "web-0\n" are not)."""
    match = _INSTANCE_NAME.fullmatch(name)
    return None if match is None else (match["app"], int(match["index"]))


DEFAULT_PORT_RANGE = [31000, 32767]


@dataclass(slots=True)
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
    ssds: int = 0  # disks on the node's allow-list (their records: `ssds/{node}/`)
    ssd_bytes: int = 0  # their summed size
    config_dir: str = ""  # where its agent delivers configs (sigmad.node.configs)
    updated: float = 0.0


# SSD states (DESIGN.md §2): the agent moves a disk along
#   free ─format─▶ formatting ─▶ ready ─claimed─▶ bound ─released─▶ wiping ─▶ ready
# and a bound disk whose owner moved away without wiping is retained; any of them can
# become broken (vanished device, I/O error, a format that failed its check).
SSD_FREE, SSD_FORMATTING, SSD_READY, SSD_BOUND = "free", "formatting", "ready", "bound"
SSD_RETAINED, SSD_WIPING, SSD_BROKEN = "retained", "wiping", "broken"
CORDONED = "cordoned"  # the owner of a claim made by `sigmactl ssd cordon` (no instance's key)
SSD_STATES = (SSD_FREE, SSD_FORMATTING, SSD_READY, SSD_BOUND, SSD_RETAINED, SSD_WIPING,
              SSD_BROKEN)


@dataclass(slots=True)
class Ssd:
    """The value of `ssds/{node}/{id}`: one disk of a node's allow-list, as its agent sees
    it. Only `ready` disks (a fresh, checked, mounted ext4 with no claim) may be claimed."""

    node: str
    id: str
    path: str  # the allow-listed path (e.g. /dev/disk/by-id/…, /dev/loop3)
    size: int = 0  # bytes
    rotational: bool = False
    state: str = SSD_FREE
    error: str = ""  # why it is broken
    mount: str = ""  # where the agent mounted it (nodev,nosuid) while ready or bound
    fs_uuid: str = ""  # the filesystem made by the last format (a wipe makes a new one)
    owner: str = ""  # the instance key it is bound to or retained for
    updated: float = 0.0


@dataclass(slots=True)
class Beat:
    """The value of the leased `heartbeats/{node}` key. Its presence says the node's agent
    is alive (it holds its lease); `engine` says whether the node's engine answers it. A
    node is Ready when both hold; an alive agent whose engine does not answer cannot fence
    the containers that engine runs, so the master never counts its lease as lapsed."""

    node: str = ""
    since: float = 0.0
    engine: bool = True


@dataclass(slots=True)
class OverlayApplied:
    """The value of the leased `overlay-applied/{node}` key: the store revision whose
    instances and nodes this node's tunnel FDB has applied. The controller stops the old copy
    of a live move only once every Ready node has applied the flip (sigmad.control.moves)."""

    node: str = ""
    revision: int = 0
    at: float = 0.0
    # instance key → the `quiesce` stamp of its record for which this node's old copy is
    # drained: new connections no longer reach it and none it had is left (or the bound
    # passed); the controller flips a live move on this (sigmad.control.moves). None: an
    # agent that does not drain (an older one): the controller does not wait for it
    drained: dict[str, float] | None = None


@dataclass(slots=True)
class HostUsed:
    """What a host uses now: cores (on average since the last sample) and bytes of memory
    (page cache that may be dropped left out)."""

    cpu: float = 0.0
    memory: int = 0


@dataclass(slots=True)
class InstanceUsed:
    """What an instance's containers use together now, and bytes used on its SSDs."""

    cpu: float = 0.0
    memory: int = 0
    disk: int = 0


@dataclass(slots=True)
class DiskUsed:
    """Bytes used and the size of one SSD's filesystem."""

    used: int = 0
    size: int = 0


USAGE_MACHINE = "machine"  # `UsageRecord.scope`: the host figures are the whole machine's


@dataclass(slots=True)
class UsageRecord:
    """The value of the leased `usage/{node}` key: the latest sample of a node's agent
    (sigmad.node.usage), replaced at every sample (no history in etcd). `instances` is
    keyed by instance key (`ns/app-index`), `ssds` by disk id. `scope` says what `host`
    measures: "machine" (the whole machine) or "cgroup:PARENT" (only what the engine's
    containers under that cgroup parent use: a lab host's own share of the machine)."""

    node: str = ""
    at: float = 0.0
    host: HostUsed = field(default_factory=HostUsed)
    instances: dict[str, InstanceUsed] = field(default_factory=dict)
    ssds: dict[str, DiskUsed] = field(default_factory=dict)
    scope: str = USAGE_MACHINE


@dataclass(slots=True)
class NodeLock:
    """The value of `alloc/node/{node}`: who last placed there (every booking on the node
    bumps this key and guards its previous revision)."""

    by: str = ""
    token: str = ""


@dataclass(slots=True)
class Owner:
    """The value of `alloc/port/{node}/{port}` and `alloc/ip/{ip}`: the owning instance
    (`ns/app-index`)."""

    owner: str = ""


@dataclass(slots=True)
class SsdClaim:
    """The value of `alloc/ssd/{node}/{id}`: the instance that owns the disk, and which of its
    volumes the disk holds ("" in claims written before volumes were recorded, and for
    `sigmactl ssd cordon`). The volume lets a returning instance get each disk back for the
    volume whose data it holds."""

    owner: str = ""
    volume: str = ""


@dataclass(slots=True)
class AppRecord:
    """An app's desired state. `generation` grows on every change of the spec;
    `template_generation` only when what an instance runs changes (anything but `replicas`,
    the migration policy and the containers' resources), so scaling and resizing never
    replace running instances."""

    spec: AppSpec
    generation: int = 1
    template_generation: int = 1
    created: float = 0.0
    updated: float = 0.0
    configs: dict[str, int] = field(default_factory=dict)  # config → version the spec resolves to
    configs_from: dict[str, int] = field(default_factory=dict)  # the versions before the last
    # change of `configs`: what a failed config rollout reverts to (sigmad.control.reloads)
    configs_halt: str = ""  # why the last config rollout failed ("" = it did not)


@dataclass(slots=True)
class ContainerStatus:
    name: str
    id: str = ""
    state: str = ""
    exit_code: int | None = None
    started_at: str = ""
    finished_at: str = ""
    ready: bool = False
    limit: Resources = field(default_factory=Resources)  # the cgroup caps applied (0 = none)


@dataclass(slots=True)
class BoundSsd:
    """One of an instance's volumes: the disk claimed for it on its node, and the host
    directory of that disk bound into its containers."""

    volume: str
    disk: str
    source: str
    reclaim: str = "wipe"  # the volume's: wiped when the instance goes, or retained


@dataclass(slots=True)
class Termination:
    """One end of an instance's container, with its one authoritative reason."""

    container: str
    reason: str
    at: float
    container_id: str = ""
    logs: list[str] = field(default_factory=list)  # its last lines (bounded: MAX_LOG_*)


@dataclass(slots=True)
class Instance:
    """One replica `APP-INDEX` of an app; it, not its container, owns its place and resources."""

    namespace: str
    app: str
    index: int
    generation: int  # the app's template_generation its containers were made from
    state: State = State.PENDING
    reason: str = ""
    unschedulable: dict[str, int] = field(default_factory=dict)  # filter reason → node count
    node: str = ""
    ip: str = ""
    host_ports: dict[str, int] = field(default_factory=dict)  # port name → host port
    target: str = ""  # the node a `migrate --to` asked for ("" = wherever it fits)
    move: str = ""  # why a live move was asked for (e.g. "drain h2"); the scheduler books it
    next_node: str = ""  # a live move in progress: booked there too, started there first
    next_ports: dict[str, int] = field(default_factory=dict)  # host ports booked on it
    quiesce: float = 0.0  # a live move's new copy is ready: when the old copy began draining
    fence: str = ""  # how the copy on its lost node was fenced (set before any copy elsewhere)
    request: Resources = field(default_factory=Resources)
    ssds: list[BoundSsd] = field(default_factory=list)  # its volumes' disks on `node`
    containers: list[ContainerStatus] = field(default_factory=list)
    restarts: int = 0
    streak: int = 0  # failures in a row (each ran less than a minute): drives the backoff
    next_start: float = 0.0
    terminations: list[Termination] = field(default_factory=list)
    configs: dict[str, int] = field(default_factory=dict)  # config → version pinned (wanted)
    configs_have: dict[str, int] = field(default_factory=dict)  # config → version it runs with
    reloaded_at: float = 0.0  # when its on_change ran for `configs_have` (a signal sent, its
    # containers made anew); 0 once its readiness passed again after that (control/reloads.py)
    release: int = 0  # the revision a rolling release is moving it to (0: no step under way)
    release_at: float = 0.0  # when that step began (the progress deadline counts from it)
    release_failed: str = ""  # why that step failed ("" = it did not)
    created: float = 0.0
    updated: float = 0.0

    @property
    def name(self) -> str:
        """The stable name `APP-INDEX`."""
        return f"{self.app}-{self.index}"

    @property
    def key(self) -> str:
        """`namespace/APP-INDEX`, the value of the `sigma.instance` container label."""
        return f"{self.namespace}/{self.app}-{self.index}"

    @property
    def app_key(self) -> str:
        """`namespace/app`."""
        return f"{self.namespace}/{self.app}"

    def copy(self) -> Instance:
        """A copy whose lists and maps (and container statuses) may be changed without
        touching this record (nested values are shared: they are never changed in place)."""
        new = _shallow(self)
        new.unschedulable, new.host_ports = dict(self.unschedulable), dict(self.host_ports)
        new.next_ports, new.terminations = dict(self.next_ports), list(self.terminations)
        new.ssds = list(self.ssds)
        new.configs, new.configs_have = dict(self.configs), dict(self.configs_have)
        new.containers = [_shallow(c) for c in self.containers]
        return new

    def terminated(self, container: str, reason: str, container_id: str = "",
                   logs: list[str] | None = None) -> None:
        """Record a container end on this working copy with its last output lines (cut to
        MAX_LOG_LINES and MAX_LOG_BYTES), keeping the last few ends."""
        self.terminations.append(Termination(container, reason, now(), container_id,
                                             last_lines(logs or [])))
        del self.terminations[:-MAX_TERMINATIONS]

    # -- transitions: each returns a new record -------------------------------------------

    def unbound(self, reason: str) -> Instance:
        """Back to Pending, to be placed anew: it keeps its name, IP and request; its node,
        host ports, disks and containers stay behind (release `host_ports` of `node`; its
        disks' claims stay: their data is retained there)."""
        new = self.copy()
        new.state, new.reason = State.PENDING, reason
        new.node, new.host_ports, new.containers, new.ssds = "", {}, [], []
        new.move, new.next_node, new.next_ports, new.quiesce = "", "", {}, 0.0
        new.next_start, new.streak, new.updated = 0.0, 0, now()
        new.reloaded_at = 0.0  # (its containers will start anew: no reload to check)
        return new

    def bound(self, node: str, ports: dict[str, int],
              ssds: list[BoundSsd] | None = None) -> Instance:
        """Pending → Scheduled on `node` with its host ports and its volumes' disks."""
        new = self.copy()
        new.state, new.node, new.host_ports = State.SCHEDULED, node, ports
        new.ssds = list(ssds or [])
        new.reason, new.unschedulable, new.target, new.updated = "", {}, "", now()
        new.fence = ""
        return new

    def move_asked(self, why: str) -> Instance:
        """A live move is wanted (e.g. "drain h2"): the scheduler books where it goes."""
        new = self.copy()
        new.move, new.updated = why, now()
        return new

    def move_booked(self, node: str, ports: dict[str, int]) -> Instance:
        """A live move booked onto `node`: the new copy starts there, the old keeps serving."""
        new = self.copy()
        new.next_node, new.next_ports, new.unschedulable = node, ports, {}
        new.reason, new.updated = f"moving to {node} ({self.move})", now()
        return new

    def unplaced(self, reason: str, counts: dict[str, int]) -> Instance:
        """Stays where it is (Pending, or not moving yet) with why no node fits."""
        new = self.copy()
        new.reason, new.unschedulable, new.updated = reason, counts, now()
        return new

    def rebooked(self, request: Resources) -> Instance:
        """Its node now holds `request` for it (a resize or a template change)."""
        new = self.copy()
        new.request, new.updated = request, now()
        if new.reason.startswith(("update waits", "resize waits")):
            new.reason = ""
        return new

    def terminating(self, reason: str) -> Instance:
        """Asked to go: its containers stop, then the record and its claims are deleted."""
        new = self.copy()
        new.state, new.reason, new.updated = State.TERMINATING, reason, now()
        return new

    def lost_node(self) -> Instance:
        """Its node is NotReady: NeedMigration (NodeLost). It keeps its node (and a move's
        next node) until its copy there is fenced (`fenced`): only then may a copy start
        elsewhere."""
        new = self.copy()
        for c in new.containers:
            if c.id and not c.finished_at:
                new.terminated(c.name, NODE_LOST, c.id)
        new.state, new.reason = State.NEED_MIGRATION, f"{NODE_LOST}: node {self.node} is NotReady"
        new.fence, new.updated = "", now()
        return new

    def waiting_for_fence(self, why: str) -> Instance:
        """NeedMigration, and why its old copy does not count as fenced yet."""
        new = self.copy()
        new.reason = f"{NODE_LOST}: node {self.node} is NotReady; {why}"
        new.updated = now()
        return new

    def fenced(self, how: str, stopped: list[str]) -> Instance:
        """Its copy on its lost node is fenced (`how`); the containers `stopped` through
        the node's engine end as KilledBySigma(fenced) instead of NodeLost."""
        new = self.copy()
        killed = Reason.killed(Kill.FENCED)
        new.terminations = [Termination(t.container, killed, t.at, t.container_id)
                            if t.container_id in stopped and t.reason == NODE_LOST else t
                            for t in new.terminations]
        new.fence = how
        new.reason = f"{NODE_LOST}: node {self.node} is NotReady; fenced: {how}"
        new.updated = now()
        return new

    def lost_ssd(self, why: str, auto: bool) -> Instance:
        """A disk of one of its volumes broke (`why`): NeedMigration (SSDLost), and with
        `auto` straight back to Pending, to be placed with new disks (release `host_ports`
        of `node`; the broken disk's claim stays: what is left of its data is there)."""
        new = self.copy()
        new.state, new.reason, new.updated = State.NEED_MIGRATION, f"{SSD_LOST}: {why}", now()
        return new.unbound(f"migrating: {new.reason}") if auto else new

    def continued_on_next(self) -> Instance:
        """Its node is lost mid-move: it lands on the node booked for the move (release
        `host_ports` of `node`)."""
        new = self.copy()
        new.reason = f"{NODE_LOST}: node {self.node} is NotReady; continuing on {self.next_node}"
        new.node, new.host_ports = self.next_node, dict(self.next_ports)
        new.move, new.next_node, new.next_ports, new.quiesce = "", "", {}, 0.0
        new.state, new.containers, new.updated = State.SCHEDULED, [], now()
        return new

    def quiescing(self, at: float) -> Instance:
        """A live move's new copy is ready: the old copy drains (its node's agent stops new
        connections reaching it and says when it has none left) before the flip."""
        new = self.copy()
        new.quiesce, new.updated = at, now()
        new.reason = f"moving to {self.next_node} ({self.move}): draining the copy on {self.node}"
        return new

    def move_cancelled(self, reason: str) -> Instance:
        """The move is off (release `next_ports` of `next_node`)."""
        new = self.copy()
        new.move, new.next_node, new.next_ports, new.quiesce = "", "", {}, 0.0
        new.reason, new.updated = reason, now()
        return new

    def resumed(self) -> Instance:
        """NeedMigration and its node is back: it resumes there. Its containers' NodeLost
        ends are taken back: they may run on (a hung engine), else their real end is
        recorded from the engine."""
        new = self.copy()
        new.state, new.reason, new.updated = State.SCHEDULED, f"node {self.node} is back", now()
        new.fence = ""
        ids = {c.id for c in new.containers}
        new.terminations = [t for t in new.terminations
                            if t.reason != NODE_LOST or t.container_id not in ids]
        return new

    def flipped(self, containers: list[ContainerStatus]) -> Instance:
        """A live move's new copy is ready: the record now places it on `next_node`
        (release `host_ports` of the old `node`; its containers are then stopped)."""
        new = self.copy()
        for c in self.containers:
            new.terminated(c.name, Reason.killed(Kill.MIGRATED), c.id)
        new.node, new.host_ports, new.containers = self.next_node, dict(self.next_ports), \
            containers
        new.state, new.reason, new.move, new.next_node, new.next_ports = \
            State.RUNNING, "", "", "", {}
        new.quiesce = 0.0
        new.next_start, new.streak, new.updated = 0.0, 0, now()
        return new


def last_lines(lines: list[str]) -> list[str]:
    """The newest of `lines` that fit MAX_LOG_LINES and MAX_LOG_BYTES (a longer line is cut
    to its end: the end of a line says most about why a program stopped)."""
    kept: list[str] = []
    room = MAX_LOG_BYTES
    for line in reversed(lines[-MAX_LOG_LINES:]):
        data = line.encode()
        if len(data) > room:
            if not kept:
                kept.append(data[-room:].decode(errors="ignore"))
            break
        kept.append(line)
        room -= len(data)
    return kept[::-1]


def _shallow(record: R) -> R:
    """A shallow copy of a dataclass record (what dataclasses.replace does, without running
    __init__: this is on the leader's hot path)."""
    new = object.__new__(type(record))
    for name in records.field_names(type(record)):  # type: ignore[arg-type]
        object.__setattr__(new, name, getattr(record, name))
    return new


def new_instance(spec: AppSpec, index: int, template_generation: int,
                 configs: dict[str, int] | None = None) -> Instance:
    """A fresh Pending instance `APP-INDEX` of `spec`, pinned to the config versions
    `configs`."""
    return Instance(
        namespace=spec.namespace, app=spec.app, index=index, generation=template_generation,
        request=spec.request(), configs=dict(configs or {}), created=now(), updated=now(),
    )
