"""The API's writes: apply, resize, delete, migrate, drain — each checked against the state
cache, then written as one guarded change (sigmad.state.writes) and answered with what it
did. The API never drives an engine: the leader's controller acts on what is written.

Invariants:
- every check happens before anything is written; a refused change writes nothing;
- each call is one transaction: all of its apps, or none;
- a resize (caps and requests only, replicas too) keeps the template generation, so no
  container is replaced: the leader updates the caps of running containers in place and the
  scheduler books the new requests; a request that cannot fit its node, or a memory cap
  below what a container uses now (unless forced), is refused.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from typing import Any

from sigmad import configs, records
from sigmad.api.configs import config_guards, resolve_for
from sigmad.control import migration, reloads
from sigmad.control.rollout import (
    Phase,
    Revision,
    Rollout,
    begun,
    failure,
    prune,
    ready_for,
)
from sigmad.engine import EnginePool
from sigmad.errors import Conflict, EngineError, NotFound, SigmaError, SpecError
from sigmad.models import (
    CORDONED,
    SSD_BROKEN,
    SSD_FREE,
    AppRecord,
    Instance,
    Node,
    Ssd,
    SsdClaim,
    now,
    split_name,
)
from sigmad.reasons import State
from sigmad.scheduler.snapshot import node_info
from sigmad.spec import AppSpec, Resources, UpdateSpec, image_reference, shown
from sigmad.state.cache import APPS, ROLLOUTS, SSD_CLAIMS, SSDS, Cache
from sigmad.state.writes import Change, Writes, commit
from sigmad.store import MAX_TXN_OPS, Guard, Op, Store, Versioned
from sigmad.units import format_cpu, format_size

log = logging.getLogger(__name__)
MAX_APPS = MAX_TXN_OPS - 1  # apps one apply may write (one transaction, with its fence)


class Refused(SigmaError):
    """The change cannot be applied as asked (capacity, usage); nothing was changed."""

    code = "refused"
    status = 409


@dataclass
class Result:
    app: str
    action: str  # created | updated | resized in place | unchanged | deleted
    generation: int
    containers: int = 0  # containers whose caps change in place

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"app": self.app, "action": self.action,
                               "generation": self.generation}
        if self.action == "resized in place":
            out["containers"] = self.containers
        return out


def only_replicas(old: AppSpec, new: AppSpec) -> bool:
    """Whether only what running containers do not depend on changed (replica count,
    migration policy, update policy): no container is replaced for it."""
    return records.to_dict(replace(_unpinned(old), replicas=0, migration="",
                                   update=UpdateSpec())) == \
        records.to_dict(replace(_unpinned(new), replicas=0, migration="", update=UpdateSpec()))


def _unpinned(spec: AppSpec) -> AppSpec:
    """`spec` without its configs' version pins: a pin that moves re-pins the instances,
    which reload (sigmad.api.configs); it makes no container anew by itself."""
    return replace(spec, configs=[replace(c, version=0) for c in spec.configs])


def _without_resources(spec: AppSpec) -> dict[str, object]:
    containers = [replace(c, resources=replace(c.resources, request=Resources(),
                                               limit=Resources())) for c in spec.containers]
    result: dict[str, object] = records.to_dict(replace(_unpinned(spec), replicas=0,
                                                        migration="", containers=containers,
                                                        update=UpdateSpec()))
    return result


def resources_only(old: AppSpec, new: AppSpec) -> bool:
    """Whether `new` differs from `old` in container resources (and replicas) only: running
    containers take that in place (a cap may change, appear or be lifted)."""
    return len(old.containers) == len(new.containers) and \
        _without_resources(old) == _without_resources(new)


def caps_changing(cache: Cache, old: AppSpec, new: AppSpec) -> int:
    """How many running containers of the app get new caps."""
    changed = {a.name for a, b in zip(old.containers, new.containers, strict=True)
               if a.resources.limit != b.resources.limit}
    return sum(1 for v in cache.instances_of(old.key).values() for c in v.value.containers
               if c.name in changed and c.state == "running")


def check_fit(cache: Cache, old: AppSpec, new: AppSpec) -> None:
    """Refused if the app's new request per instance does not fit on a node that runs it."""
    grow = Resources(new.request().cpu_m - old.request().cpu_m,
                     new.request().memory - old.request().memory)
    if grow.cpu_m <= 0 and grow.memory <= 0:
        return
    for name, usage in sorted(cache.usage.items()):
        count = usage.apps.get(old.key, 0)
        node = cache.node(name)
        if not count or node is None:
            continue
        info = node_info(node, True, usage)
        short = info.short(Resources(grow.cpu_m * count, grow.memory * count))
        if short is None:
            continue
        fmt, attr = (format_cpu, "cpu_m") if short == "cpu" else (format_size, "memory")
        raise Refused(
            f"request {short} {fmt(getattr(new.request(), attr))} per instance does not fit "
            f"on node {name}: {fmt(getattr(info.requested, attr))} of "
            f"{fmt(getattr(info.capacity(), attr))} already booked there ({count} "
            f"instance{'s' if count > 1 else ''} of {old.app}); nothing was changed")


async def check_usage(cache: Cache, engines: EnginePool, old: AppSpec, new: AppSpec) -> None:
    """Refused if a lowered memory cap is below what a running container uses now."""
    lowered = {b.name: b.resources.limit.memory
               for a, b in zip(old.containers, new.containers, strict=True)
               if b.resources.limit.memory and (not a.resources.limit.memory or
                                                b.resources.limit.memory <
                                                a.resources.limit.memory)}
    if not lowered:
        return
    for v in cache.instances_of(old.key).values():
        inst = v.value
        node = cache.node(inst.node) if inst.node else None
        if node is None:
            continue
        engine, _ = engines.get(node.name, node.engine)
        for c in inst.containers:
            cap = lowered.get(c.name)
            if cap is None or c.state != "running":
                continue
            try:
                used = await engine.memory_usage(c.id)
            except EngineError as exc:
                raise Refused(f"cannot read the memory use of {inst.name} on {node.name} "
                              f"({exc.message}): nothing was changed (use --force to lower "
                              "it anyway)") from None
            if used > cap:
                raise Refused(
                    f"container {c.name} of {inst.name} uses {format_size(used)}, above the "
                    f"new memory limit {format_size(cap)}: nothing was changed (use --force "
                    "to lower it anyway; the kernel may then OOM-kill it)")


class AppWrites:
    """The API's write calls against one store and its cache."""

    def __init__(self, store: Store, cache: Cache, engines: EnginePool) -> None:
        self.store = store
        self.cache = cache
        self.keys = store.keys
        self.writes = Writes(store.keys)
        self.engines = engines

    async def _commit(self, change: Change, what: str) -> int:
        revision = await commit(self.store, self.cache, change)
        if not revision:
            raise Conflict(f"{what} changed meanwhile: try again")
        return revision

    async def apply(self, specs: list[AppSpec], dry_run: bool, force: bool) -> list[Result]:
        """Create or update every app, all-or-nothing (see the module docstring)."""
        if len(specs) > MAX_APPS:
            raise SpecError("body", f"{len(specs)} apps in one apply: at most {MAX_APPS}")
        change, results = Change(), []
        pins = resolve_for(self.cache, self.keys, specs)
        for s in specs:
            key = self.keys.app(s.namespace, s.app)
            current: Versioned[AppRecord] | None = self.cache.get(APPS, key)
            resolved = pins[s.key]
            if current is None:
                rec, action = AppRecord(s, 1, 1, now(), now(), resolved), "created"
                result = Result(s.key, action, 1)
            else:
                old = current.value
                if records.to_dict(old.spec) == records.to_dict(s) and old.configs == resolved:
                    results.append(Result(s.key, "unchanged", old.generation))
                    continue
                if old.spec.volumes != s.volumes:
                    raise SpecError("volumes", f"{s.key}: the volumes of an app cannot change "
                                    "(each instance's data is on its disks): keep them, or "
                                    "delete the app and apply it again")
                template = old.template_generation
                action = "updated"
                reenv = configs.env_changed(s, old.configs, resolved)
                if resources_only(old.spec, s) and not only_replicas(old.spec, s) and \
                        not reenv:
                    check_fit(self.cache, old.spec, s)
                    if not force:
                        await check_usage(self.cache, self.engines, old.spec, s)
                    action = "resized in place"
                elif not only_replicas(old.spec, s) or reenv:
                    template = old.generation + 1
                back, halt = reloads.carried(old, resolved, (
                    i.value.configs for i in self.cache.instances_of(s.key).values()))
                rec = AppRecord(s, old.generation + 1, template, old.created, now(), resolved,
                                back, halt)
                in_place = action == "resized in place"  # the same containers, new caps
                result = Result(s.key, action, rec.generation,
                                caps_changing(self.cache, old.spec, s) if in_place else 0)
            change += self.writes.put_app(key, rec, current.mod_revision if current else 0)
            change += config_guards(self.cache, self.keys, s)
            if current is None or rec.template_generation != current.value.template_generation:
                change += await self._revision(rec)
            if current is not None and \
                    rec.template_generation != current.value.template_generation:
                change += self.writes.start_rollout(current.value, rec)
            results.append(result)
        if change.ops and not dry_run:
            await self._commit(change, "another client changed these apps")
        for r in results:
            log.info("apply %s: %s (generation %d)%s", r.app, r.action, r.generation,
                     " (dry run)" if dry_run else "")
        return results

    async def _revision(self, rec: AppRecord, restart: bool = False) -> Change:
        """The new template generation as a revision (the history `rollout undo` and the
        rollout controller will read), dropping all but the last KEEP_REVISIONS."""
        s, n = rec.spec, rec.template_generation
        have = await self._revisions(s.namespace, s.app)
        return self.writes.revision(s, Revision(n, s, dict(rec.configs), now(), restart),
                                    prune([*have, n], n))

    async def restart(self, namespace: str, name: str) -> dict[str, Any]:
        """Every instance of the app made anew, rolled out as its update: block says (live
        moves, max_parallel): a new revision with the same spec and config versions, marked
        as a restart. Refused while a rollout is under way. The rollout record as written."""
        current = self.app(namespace, name)
        key = self.keys.rollout(namespace, name)
        v: Versioned[Rollout] | None = self.cache.get(ROLLOUTS, key)
        if v is not None and v.value.phase not in (Phase.DONE, Phase.REVERTED):
            raise Conflict(f"the rollout of {namespace}/{name} to revision "
                           f"{v.value.to_revision} is {v.value.phase}: restart once it has "
                           f"ended (see sigmactl rollout status {name} -w)")
        old = current.value
        rec = AppRecord(old.spec, old.generation + 1, old.generation + 1, old.created, now(),
                        dict(old.configs))
        change = self.writes.put_app(current.key, rec, current.mod_revision)
        change += await self._revision(rec, restart=True)
        record = begun(old, rec, now())
        change += self.writes.put_rollout(key, record, v.mod_revision if v is not None else 0)
        await self._commit(change, f"app {namespace}/{name}")
        log.info("restart %s/%s: revision %d", namespace, name, rec.template_generation)
        return records.to_dict(record)

    async def rollout_action(self, namespace: str, name: str, action: str) -> dict[str, Any]:
        """Pause, resume or promote the app's rollout, or restart the app; the rollout record
        as written."""
        if action == "restart":
            return await self.restart(namespace, name)
        self.app(namespace, name)
        key = self.keys.rollout(namespace, name)
        v: Versioned[Rollout] | None = self.cache.get(ROLLOUTS, key)
        if v is None:
            raise NotFound(f"app {namespace}/{name} has no rollout (a template change, e.g. "
                           "sigmactl release, starts one)")
        r = replace(v.value, done=list(v.value.done), updated=now())
        live = (Phase.RUNNING, Phase.REVERTING, Phase.CANARY)
        if action == "pause" and r.phase in live:
            r.phase, r.reason = Phase.PAUSED, "paused by sigmactl rollout pause"
            r.resume = v.value.phase
        elif action == "resume" and r.phase == Phase.PAUSED:
            r.phase, r.reason = Phase(r.resume) if r.resume else Phase.RUNNING, ""
        elif action == "promote" and r.phase in (Phase.CANARY, Phase.RUNNING, Phase.PAUSED):
            r.promoted = True
            r.phase = Phase.RUNNING if r.phase == Phase.CANARY else r.phase
        elif action in ("pause", "resume", "promote"):
            raise Conflict(f"the rollout of {namespace}/{name} is {r.phase}: nothing to "
                           f"{action} (see sigmactl rollout status {name})")
        else:
            raise SpecError("action", f"{shown(action)} is not pause, resume, promote or "
                            "restart")
        await self._commit(self.writes.put_rollout(key, r, v.mod_revision),
                           f"the rollout of {namespace}/{name}")
        return records.to_dict(r)

    async def release(self, namespace: str, name: str, image: object,
                      container: object) -> Result:
        """The app with a new image for one container (`sigmactl release APP --image`): a
        template change like any apply."""
        spec = self.app(namespace, name).value.spec
        ref = image_reference("image", image)
        names = [c.name for c in spec.containers]
        if container is None and len(names) > 1:
            raise SpecError("container", f"app {namespace}/{name} has several containers "
                            f"({', '.join(names)}): name the one to release")
        target = names[0] if container is None else container
        if target not in names:
            raise SpecError("container", f"{shown(target)} is not a container of app "
                            f"{namespace}/{name} ({', '.join(names)})")
        new = replace(spec, containers=[replace(c, image=ref) if c.name == target else c
                                        for c in spec.containers])
        (result,) = await self.apply([new], dry_run=False, force=False)
        return result

    async def undo(self, namespace: str, name: str, to: object) -> Result:
        """Apply again the spec of a kept revision (default: the one before the current),
        with the replicas the app has now: a new revision like any template change."""
        current = self.app(namespace, name).value
        kept = sorted(await self._revisions(namespace, name))
        if to is None:
            earlier = [n for n in kept if n < current.template_generation]
            if not earlier:
                raise SpecError("to", f"app {namespace}/{name} has no earlier revision kept "
                                "(see sigmactl rollout history)")
            to = earlier[-1]
        if isinstance(to, bool) or not isinstance(to, int) or to not in kept:
            raise SpecError("to", f"{shown(to)} is not a kept revision of app "
                            f"{namespace}/{name} ({', '.join(map(str, kept)) or 'none'})")
        found = await self.store.get(self.keys.revision(namespace, name, to), Revision)
        if found is None:
            raise Conflict(f"revision {to} of app {namespace}/{name} was just dropped")
        new = replace(found.value.spec, replicas=current.spec.replicas)
        (result,) = await self.apply([new], dry_run=False, force=False)
        return result

    async def _revisions(self, namespace: str, name: str) -> list[int]:
        """The numbers of an app's kept revisions."""
        prefix = self.keys.revisions(namespace, name)
        return [int(k.removeprefix(prefix)) for k in await self.store.keys_under(prefix)]

    async def history(self, namespace: str, name: str) -> dict[str, Any]:
        """An app's kept revisions (oldest first, each with its spec) and its current one."""
        current = self.app(namespace, name).value.template_generation
        found, _ = await self.store.range_raw(self.keys.revisions(namespace, name))
        revisions = sorted((records.loads(Revision, i.value) for i in found), key=lambda r: r.n)
        v = self.cache.get(ROLLOUTS, self.keys.rollout(namespace, name))
        return {"current": current,
                "rollout": records.to_dict(v.value) if v is not None else None,
                "instances": self._progress(namespace, name),
                "revisions": [{"revision": r.n, "images": [c.image for c in r.spec.containers],
                               "configs": r.configs, "created": r.created,
                               "restart": r.restart, "spec": records.to_dict(r.spec)}
                              for r in revisions]}

    def _progress(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """Each instance's revision and whether it is ready or failing (`rollout status`)."""
        out = []
        for v in self.cache.ordered(f"{namespace}/{name}"):
            i = v.value
            out.append({"name": i.name, "revision": i.generation, "state": str(i.state),
                        "ready": ready_for(i, now()) >= 0, "release": i.release,
                        "moving": bool(i.move or i.next_node),
                        "failing": i.release_failed or failure(i, i.release)})
        return out

    def app(self, namespace: str, name: str) -> Versioned[AppRecord]:
        v: Versioned[AppRecord] | None = self.cache.get(APPS, self.keys.app(namespace, name))
        if v is None:
            raise NotFound(f"app {namespace}/{name} not found")
        return v

    async def resize(self, namespace: str, name: str, new: AppSpec, force: bool) -> Result:
        """A resources-only change of one app (`sigmactl update`)."""
        current = self.app(namespace, name)
        old = current.value
        if records.to_dict(new) == records.to_dict(old.spec):
            return Result(old.spec.key, "unchanged", old.generation)
        (result,) = await self.apply([new], dry_run=False, force=force)
        return result

    async def delete(self, namespace: str, name: str) -> Result:
        v = self.app(namespace, name)
        revisions = await self._revisions(namespace, name)
        await self._commit(self.writes.delete_app(v, revisions), f"app {namespace}/{name}")
        log.info("delete app %s/%s", namespace, name)
        return Result(f"{namespace}/{name}", "deleted", v.value.generation)

    async def migrate(self, v: Versioned[Instance], to: str) -> Instance:
        """Place a NeedMigration instance anew (only on `to` if given), once its copy on its
        lost node is fenced (at most one live copy: DESIGN.md §6)."""
        inst = v.value
        if to and self.cache.node(to) is None:
            raise NotFound(f"node {to} not found: see 'sigmactl get nodes'")
        if inst.state != State.NEED_MIGRATION:
            raise Conflict(f"instance {inst.key} is {inst.state}, not NeedMigration: only an "
                           "instance whose node is lost is migrated")
        wait = migration.unfenced(inst, self.cache.ready)
        if wait:
            raise Conflict(f"instance {inst.key} cannot move yet: {wait}")
        t = migration.migrate(inst, to)
        change = self.writes.update_instance(v, t.new)
        for node, ports in t.releases:
            change += self.writes.release_ports(node, ports)
        await self._commit(change, f"instance {inst.key}")
        return t.new

    async def release_ssd(self, node: str, disk: str) -> str:
        """`sigmactl ssd release NODE/ID`: delete the claim of a retained disk (its owner is
        gone or placed elsewhere), so its agent wipes it; the former owner."""
        claim: Versioned[SsdClaim] | None = self.cache.get(SSD_CLAIMS,
                                                        self.keys.ssd_claim(node, disk))
        if claim is None:
            raise NotFound(f"disk {node}/{disk} is not claimed: see 'sigmactl get ssds'")
        owner = claim.value.owner
        ns, _, name = owner.partition("/")
        parts = split_name(name)
        key = self.keys.instance(ns, *parts) if parts else ""
        v = self.cache.instance(key) if key else None
        if v is not None and v.value.node == node and any(d.disk == disk
                                                          for d in v.value.ssds):
            raise Conflict(f"disk {node}/{disk} is in use by instance {owner}: delete or "
                           "scale down its app first")
        change = self.writes.release_ssd(claim, self.cache.get(SSDS, self.keys.ssd(node, disk)))
        if key:  # the owner's record as judged: not placed here meanwhile
            change += Change([Guard(key, v.mod_revision if v else 0)], [])
        await self._commit(change, f"disk {node}/{disk}")
        log.info("released disk %s/%s of %s", node, disk, owner)
        return owner

    async def cordon_ssd(self, node: str, disk: str) -> None:
        """`sigmactl ssd cordon NODE/ID`: claim a disk for no instance, so nothing is placed
        on it (its agent keeps it as it is, `retained`); 409 if it is claimed already."""
        if self.cache.get(SSDS, self.keys.ssd(node, disk)) is None:
            raise NotFound(f"disk {node}/{disk} not found: see 'sigmactl get ssds'")
        claim = self.keys.ssd_claim(node, disk)
        if not await commit(self.store, self.cache,
                            Change([Guard(claim, 0)], [Op(claim, SsdClaim(CORDONED))])):
            raise Conflict(f"disk {node}/{disk} is claimed: release it first")
        log.info("cordoned disk %s/%s", node, disk)

    async def uncordon_ssd(self, node: str, disk: str) -> str:
        """`sigmactl ssd uncordon NODE/ID`: a cordoned disk's claim is deleted, a broken
        disk (unclaimed, or claimed by a cordon) is made `free` again; either way its agent
        makes a fresh filesystem before it is `ready` (a disk still broken is reported
        broken again). What was done, in words."""
        record: Versioned[Ssd] | None = self.cache.get(SSDS, self.keys.ssd(node, disk))
        if record is None:
            raise NotFound(f"disk {node}/{disk} not found: see 'sigmactl get ssds'")
        claim: Versioned[SsdClaim] | None = self.cache.get(SSD_CLAIMS,
                                                        self.keys.ssd_claim(node, disk))
        if claim is not None and claim.value.owner != CORDONED:
            raise Conflict(f"disk {node}/{disk} is claimed by {claim.value.owner}: "
                           "sigmactl ssd release it first")
        change = Change() if claim is None else self.writes.release_ssd(claim)
        if record.value.state == SSD_BROKEN:
            fresh = replace(record.value, state=SSD_FREE, error="", updated=now())
            change += Change([Guard(record.key, record.mod_revision)], [Op(record.key, fresh)])
        elif claim is None:
            raise Conflict(f"disk {node}/{disk} is neither cordoned nor broken")
        await self._commit(change, f"disk {node}/{disk}")
        log.info("uncordoned disk %s/%s", node, disk)
        return "formatted afresh, then ready"

    async def set_draining(self, name: str, draining: bool) -> Node:
        """Mark a node Draining (or not); the agent may rewrite its record meanwhile, so the
        guarded write is tried a few times."""
        key = self.keys.node(name)
        for _ in range(5):
            v = await self.store.get(key, Node)
            if v is None:
                raise NotFound(f"node {name} not found: see 'sigmactl get nodes'")
            node = replace(v.value, draining=draining)
            if await commit(self.store, self.cache, self.writes.update_node(v, node)):
                return node
            await asyncio.sleep(0.05)
        raise Conflict(f"node {name} kept changing: try again")


@dataclass
class ResourceChange:
    """New values for one container's resources; None keeps the current value."""

    container: str | None = None
    limit_cpu: int | None = None
    limit_memory: int | None = None
    request_cpu: int | None = None
    request_memory: int | None = None


def _pick(new: int | None, old: int) -> int:
    return old if new is None else new


def with_resources(spec: AppSpec, change: ResourceChange) -> AppSpec:
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
