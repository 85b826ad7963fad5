"""Live resource changes: new caps on running containers in place (same id, no restart).

A change is first planned (every check, nothing touched), then applied: engine updates, then
one etcd transaction. A failure at any point rolls back what was changed, so nothing is ever
half-applied.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from sigmad import records
from sigmad.engine import LABEL_CONTAINER, LABEL_INSTANCE, EnginePool, cap_config
from sigmad.errors import Conflict, EngineError, SigmaError, SpecError
from sigmad.models import AppRecord, Instance, Node, NodeLock, now
from sigmad.scheduler.snapshot import build_snapshot
from sigmad.spec import AppSpec, Resources
from sigmad.store import Guard, Op, Store, Versioned
from sigmad.units import format_cpu, format_size

log = logging.getLogger(__name__)


class Refused(SigmaError):
    """The change cannot be applied as asked (capacity, usage); nothing was changed."""

    code = "refused"
    status = 409


def _without_resources(spec: AppSpec) -> dict[str, object]:
    containers = [replace(c, resources=replace(c.resources, request=Resources(),
                                               limit=Resources())) for c in spec.containers]
    result: dict[str, object] = records.to_dict(replace(spec, replicas=0, containers=containers))
    return result


def resources_only(old: AppSpec, new: AppSpec) -> bool:
    """Whether `new` differs from `old` in container resources (and replicas) only, in a way
    that running containers can take in place: a cap may change but not appear or vanish."""
    if len(old.containers) != len(new.containers):
        return False
    if _without_resources(old) != _without_resources(new):
        return False
    return all(
        bool(getattr(a.resources.limit, attr)) == bool(getattr(b.resources.limit, attr))
        for a, b in zip(old.containers, new.containers, strict=True)
        for attr in ("cpu_m", "memory")
    )


@dataclass
class Update:
    engine_url: str
    node: str
    container_id: str
    before: dict[str, int]
    after: dict[str, int]


@dataclass
class Plan:
    app: Versioned[AppRecord]
    spec: AppSpec
    instances: list[Versioned[Instance]]
    locks: dict[str, int]
    updates: list[Update] = field(default_factory=list)


async def plan(store: Store, engines: EnginePool, current: Versioned[AppRecord],
               spec: AppSpec, force: bool = False) -> Plan:
    """Check a resources-only change against every node and container; raise Refused."""
    keys = store.keys
    old = current.value.spec
    locks = {k.rsplit("/", 1)[-1]: r for k, r in (await store.revisions(keys.node_locks())).items()}
    nodes = {v.value.name: v.value for v in (await store.scan(keys.nodes(), Node))[0]}
    everything, revision = await store.scan(keys.instances(), Instance)
    mine = [v for v in everything if v.value.namespace == old.namespace
            and v.value.app == old.app]
    snap = build_snapshot(list(nodes.values()), set(nodes), [v.value for v in everything],
                          revision)
    new_request, old_request = spec.request(), old.request()
    for name in sorted({v.value.node for v in mine if v.value.node} & set(snap.nodes)):
        info = snap.nodes[name]
        count = info.apps.get(old.key, 0)
        grown = Resources((new_request.cpu_m - old_request.cpu_m) * count,
                          (new_request.memory - old_request.memory) * count)
        short = info.lacks(grown)
        if short:
            fmt = format_cpu if short[0] == "cpu" else format_size
            attr = "cpu_m" if short[0] == "cpu" else "memory"
            raise Refused(
                f"request {short[0]} {fmt(getattr(new_request, attr))} per instance does not "
                f"fit on node {name}: {fmt(getattr(info.requested, attr))} of "
                f"{fmt(getattr(info.capacity(), attr))} already booked there ({count} "
                f"instance{'s' if count > 1 else ''} of {old.app}); nothing was changed"
            )
    result = Plan(current, spec, mine, locks)
    limits = {c.name: c.resources.limit for c in spec.containers}
    old_limits = {c.name: c.resources.limit for c in old.containers}
    for v in mine:
        node = nodes.get(v.value.node)
        if node is None or not v.value.node:
            continue
        engine, _ = engines.get(node.name, node.engine)
        for c in await engine.find({LABEL_INSTANCE: v.value.key}):
            name = c.labels.get(LABEL_CONTAINER, "")
            if name not in limits or not c.running:
                continue
            new_memory = limits[name].memory
            if new_memory and new_memory < old_limits[name].memory and not force:
                used = await engine.memory_usage(c.id)
                if used > new_memory:
                    raise Refused(
                        f"container {name} of {v.value.name} uses {format_size(used)}, above "
                        f"the new memory limit {format_size(new_memory)}: nothing was changed "
                        "(use --force to lower it anyway; the kernel may then OOM-kill it)"
                    )
            result.updates.append(Update(engine.url, node.name, c.id,
                                         cap_config(old_limits[name]), cap_config(limits[name])))
    return result


async def apply(store: Store, engines: EnginePool, p: Plan) -> None:
    """Apply a plan: every container, then one transaction; roll back on any failure."""
    done: list[Update] = []
    try:
        for u in p.updates:
            engine, _ = engines.get(u.node, u.engine_url)
            await engine.update(u.container_id, u.after)
            done.append(u)
        if not await _commit(store, p):
            raise Conflict("the app or its instances changed meanwhile: nothing was changed; "
                           "try again")
    except (EngineError, Conflict) as exc:
        await _rollback(engines, done)
        if isinstance(exc, EngineError):
            raise Refused(f"the engine refused the new caps ({exc.message}); nothing was "
                          "changed") from None
        raise
    log.info("resized %s in place: %d containers", p.spec.key, len(done))


async def _rollback(engines: EnginePool, done: list[Update]) -> None:
    for u in reversed(done):
        engine, _ = engines.get(u.node, u.engine_url)
        try:
            await engine.update(u.container_id, u.before)
        except EngineError as exc:
            log.error("rollback of %s failed: %s", u.container_id[:12], exc.message)


async def _commit(store: Store, p: Plan) -> bool:
    keys = store.keys
    old = p.app.value
    rec = AppRecord(p.spec, old.generation + 1, old.template_generation, old.created, now())
    guards = [Guard(p.app.key, p.app.mod_revision)]
    ops = [Op(p.app.key, rec)]
    for v in p.instances:
        inst = v.value
        inst.request = p.spec.request()
        inst.updated = now()
        guards.append(Guard(v.key, v.mod_revision))
        ops.append(Op(v.key, inst))
    for node in sorted({v.value.node for v in p.instances if v.value.node}):
        guards.append(Guard(keys.node_lock(node), p.locks.get(node, 0)))
        ops.append(Op(keys.node_lock(node), NodeLock(f"resize {p.spec.key}")))
    return await store.commit(guards, ops)


@dataclass
class Change:
    """New values for one container's resources; None keeps the current value."""

    container: str | None = None
    limit_cpu: int | None = None
    limit_memory: int | None = None
    request_cpu: int | None = None
    request_memory: int | None = None


def _pick(new: int | None, old: int) -> int:
    return old if new is None else new


def with_resources(spec: AppSpec, change: Change) -> AppSpec:
    """A copy of `spec` with `change` applied to the named container (or the only one)."""
    container = change.container
    names = [c.name for c in spec.containers]
    if container is not None and container not in names:
        raise SpecError("container", f"{container!r} is not a container of {spec.app} "
                        f"(it has {', '.join(names)})")
    if container is None and len(names) > 1:
        raise SpecError("container", f"{spec.app} has {len(names)} containers: name one")
    out = []
    for c in spec.containers:
        if c.name == (container or names[0]):
            old_lim, old_req = c.resources.limit, c.resources.request
            lim = Resources(_pick(change.limit_cpu, old_lim.cpu_m),
                            _pick(change.limit_memory, old_lim.memory))
            req = Resources(_pick(change.request_cpu, old_req.cpu_m),
                            _pick(change.request_memory, old_req.memory))
            for key, low, high in (("cpu", req.cpu_m, lim.cpu_m), ("memory", req.memory,
                                                                   lim.memory)):
                if high and high < low:
                    raise SpecError(f"limit.{key}", "is below the request")
            c = replace(c, resources=replace(c.resources, limit=lim, request=req))
        out.append(c)
    return replace(spec, containers=out)
