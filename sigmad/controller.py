"""Reconcile apps → instances → containers (leader only).

One pass reads the whole state from etcd, creates and retires instance records, places
Pending instances, and hands every placed instance to a worker that drives its containers
on its node's engine. Every write is a CAS on the record's mod_revision, so a pass that
raced with another writer just loses and retries next pass. Containers carry labels, so a
restarted master adopts what runs instead of starting duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sigmad import scheduler
from sigmad.engine import (
    LABEL_CONTAINER,
    LABEL_GENERATION,
    LABEL_INSTANCE,
    ContainerState,
    Engine,
    container_config,
    container_name,
)
from sigmad.errors import EngineError, SigmaError
from sigmad.models import (
    EXITED,
    FAILED,
    FAILED_TO_START,
    PENDING,
    RUNNING,
    SCHEDULED,
    STARTING,
    TERMINATING,
    AppRecord,
    ContainerStatus,
    Instance,
    Node,
    now,
)
from sigmad.spec import AppSpec
from sigmad.store import Guard, Op, Store, Versioned, WatchCompacted

log = logging.getLogger(__name__)
MAX_BACKOFF = 60.0
BATCH = 64


def restart_backoff(restarts: int) -> float:
    """Seconds to wait before restart number `restarts` (1, 2, 4 … capped at a minute)."""
    return float(min(2 ** max(restarts - 1, 0), MAX_BACKOFF))


def should_restart(policy: str, reason: str) -> bool:
    """Whether the restart policy restarts a container that ended for `reason`."""
    if policy == "always":
        return True
    return policy == "on-failure" and reason != "Exited(0)"


@dataclass
class ClusterState:
    """Everything one pass needs, read from etcd."""

    apps: dict[str, Versioned[AppRecord]]
    instances: dict[str, Versioned[Instance]]
    nodes: dict[str, Node]
    ready: set[str]
    revision: int


class Controller:
    """Drives the cluster toward the apps' specs."""

    def __init__(self, store: Store, interval: float = 5.0) -> None:
        self.store = store
        self.keys = store.keys
        self.interval = interval
        self.engines: dict[str, Engine] = {}
        self.workers: dict[str, asyncio.Task[None]] = {}
        self.listeners: dict[str, asyncio.Task[None]] = {}
        self.wake = asyncio.Event()

    async def run(self) -> None:
        """Reconcile until cancelled: on every etcd change under the prefix, and periodically."""
        watcher = asyncio.create_task(self._watch())
        try:
            while True:
                try:
                    await self.reconcile()
                except SigmaError as exc:
                    log.warning("reconcile pass failed: %s", exc.message)
                except Exception:
                    log.exception("reconcile pass crashed; retrying")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), self.interval)
                self.wake.clear()
        finally:
            tasks = [watcher, *self.workers.values(), *self.listeners.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for engine in self.engines.values():
                await engine.close()

    async def _watch(self) -> None:
        while True:
            try:
                revision = await self.store.ping()
                async for _ in self.store.watch(self.keys.prefix + "/", revision + 1):
                    self.wake.set()
            except (WatchCompacted, SigmaError) as exc:
                log.info("watch restarted: %s", exc)
                await asyncio.sleep(1)

    async def read(self) -> ClusterState:
        apps, _ = await self.store.scan(self.keys.apps(), AppRecord)
        instances, revision = await self.store.scan(self.keys.instances(), Instance)
        nodes, _ = await self.store.scan(self.keys.nodes(), Node)
        beats = await self.store.keys_under(self.keys.heartbeats())
        return ClusterState(
            apps={v.value.spec.key: v for v in apps},
            instances={v.value.key: v for v in instances},
            nodes={v.value.name: v.value for v in nodes},
            ready={k.rsplit("/", 1)[-1] for k in beats},
            revision=revision,
        )

    async def reconcile(self) -> None:
        """One pass: instance records, placement, workers, orphan containers."""
        state = await self.read()
        await self._sync_instances(state)
        state = await self.read()
        await self._schedule(state)
        state = await self.read()
        self._refresh_engines(state)
        for key, inst in state.instances.items():
            if inst.value.state != PENDING and key not in self.workers:
                self._spawn(key, self._drive(inst.key))  # worker per instance, keyed by name
        await self._sweep_orphans(state)

    def _spawn(self, key: str, work: Awaitable[None]) -> None:
        async def runner() -> None:
            try:
                await work
            except SigmaError as exc:
                log.warning("%s: %s", key, exc.message)
            except Exception:
                log.exception("%s: worker crashed", key)
            finally:
                self.workers.pop(key, None)

        self.workers[key] = asyncio.create_task(runner())

    async def _commit(self, items: list[tuple[Guard, Op]]) -> None:
        """Write (guard, op) pairs in bounded batches; a lost batch is retried one by one so
        that only what really conflicted is skipped (the next pass re-reads it)."""
        for start in range(0, len(items), BATCH):
            chunk = items[start:start + BATCH]
            if await self.store.commit([g for g, _ in chunk], [o for _, o in chunk]):
                continue
            for guard, op in chunk:
                await self.store.commit([guard], [op])

    async def _sync_instances(self, state: ClusterState) -> None:
        """Create missing instances `APP-INDEX`, retire surplus and orphaned ones."""
        items: list[tuple[Guard, Op]] = []
        by_app: dict[str, set[int]] = {}
        for key, inst in state.instances.items():
            i = inst.value
            app = state.apps.get(f"{i.namespace}/{i.app}")
            by_app.setdefault(f"{i.namespace}/{i.app}", set()).add(i.index)
            if i.state == TERMINATING:
                continue
            if app is None:
                why = "KilledBySigma(deleted)"
            elif i.index >= app.value.spec.replicas:
                why = "KilledBySigma(scaled-down)"
            else:
                continue
            i.state, i.reason, i.updated = TERMINATING, why, now()
            items.append((Guard(inst.key, inst.mod_revision), Op(inst.key, i)))
            log.info("%s: terminating (%s)", key, why)
        for app_key, rec in state.apps.items():
            spec = rec.value.spec
            have = by_app.get(app_key, set())
            for index in range(spec.replicas):
                if index in have:
                    continue
                new = Instance(
                    namespace=spec.namespace, app=spec.app, index=index,
                    generation=rec.value.template_generation, request=spec.request(),
                    created=now(), updated=now(),
                )
                key = self.keys.instance(spec.namespace, spec.app, index)
                items.append((Guard(key, 0), Op(key, new)))
                log.info("%s: created", new.key)
        await self._commit(items)

    async def _schedule(self, state: ClusterState) -> None:
        """Place Pending instances on nodes (the scheduler is a pure function)."""
        pending = [v for v in state.instances.values() if v.value.state == PENDING]
        if not pending:
            return
        bound = [v.value for v in state.instances.values() if v.value.node]
        snap = scheduler.build_snapshot(
            list(state.nodes.values()), state.ready, bound, state.revision
        )
        requests = []
        for v in pending:
            app = state.apps.get(f"{v.value.namespace}/{v.value.app}")
            labels = app.value.spec.placement.labels if app else {}
            requests.append(scheduler.Request(v.key, v.value.request, labels))
        placed, unplaced = scheduler.place(snap, requests)
        items: list[tuple[Guard, Op]] = []
        for v in pending:
            inst = v.value
            if v.key in placed:
                inst.node, inst.state, inst.reason = placed[v.key], SCHEDULED, ""
                log.info("%s: scheduled on %s", inst.key, inst.node)
            elif inst.reason != unplaced[v.key]:
                inst.reason = unplaced[v.key]
            else:
                continue
            inst.updated = now()
            items.append((Guard(v.key, v.mod_revision), Op(v.key, inst)))
        await self._commit(items)

    def _refresh_engines(self, state: ClusterState) -> None:
        for name, node in state.nodes.items():
            engine = self.engines.get(name)
            if engine is None or engine.url != node.engine:
                if engine is not None:
                    self.listeners.pop(name).cancel()
                    self._spawn(f"close-engine/{name}", engine.close())
                engine = self.engines[name] = Engine(node.engine)
                self.listeners[name] = asyncio.create_task(self._listen(name, engine))

    async def _listen(self, name: str, engine: Engine) -> None:
        """Wake a pass as soon as a sigma container on `name` changes state."""
        delay = 1.0
        while True:
            try:
                async for event in engine.events({LABEL_INSTANCE: ""}):
                    delay = 1.0
                    if event.get("status") in ("die", "oom", "destroy", "stop", "start"):
                        self.wake.set()
            except EngineError as exc:
                log.debug("node %s: %s", name, exc.message)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _sweep_orphans(self, state: ClusterState) -> None:
        """Remove sigma containers on Ready nodes that no instance record places there."""
        wanted = {
            (i.value.key, i.value.node) for i in state.instances.values()
        }
        for name in sorted(state.ready & set(self.engines)):
            engine = self.engines[name]
            try:
                found = await engine.list({LABEL_INSTANCE: ""})
            except EngineError as exc:
                log.warning("node %s: cannot list containers: %s", name, exc.message)
                continue
            for c in found:
                owner = c.labels.get(LABEL_INSTANCE, "")
                if (owner, name) in wanted or owner in self.workers:
                    continue
                log.info("node %s: removing orphan container %s of %s", name, c.name, owner)
                await engine.remove(c.id)

    async def _drive(self, record_key: str) -> None:
        """One step of one instance (etcd key `record_key`) toward its desired state."""
        rec = await self.store.get(record_key, Instance)
        if rec is None:
            return
        inst = rec.value
        key = inst.key
        app = await self.store.get(self.keys.app(inst.namespace, inst.app), AppRecord)
        engine = self.engines.get(inst.node)
        if inst.state == TERMINATING:
            await self._terminate(rec, engine)
            return
        if engine is None:
            return
        if app is None:  # the next pass marks it Terminating
            return
        before = _fingerprint(inst)
        try:
            await Runner(engine, inst, app.value, self._progress(inst)).step()
        except EngineError as exc:
            inst.reason = f"engine: {exc.message}"
        if _fingerprint(inst) != before:
            inst.updated = now()
            if not await self.store.update(rec.key, inst, rec.mod_revision):
                log.info("%s: record changed meanwhile; next pass retries", key)
        if inst.state in (STARTING, SCHEDULED) or inst.next_start > now():
            self.wake.set()

    def _progress(self, inst: Instance) -> Callable[[str], None]:
        def report(message: str) -> None:
            log.info("%s: %s", inst.key, message)

        return report

    async def _terminate(self, rec: Versioned[Instance], engine: Engine | None) -> None:
        inst = rec.value
        if engine is not None and inst.node:
            found = await engine.list({LABEL_INSTANCE: inst.key})
            order = {c.name: i for i, c in enumerate(inst.containers)}
            found.sort(key=lambda c: -order.get(c.labels.get(LABEL_CONTAINER, ""), 0))
            for c in found:
                if c.running:
                    await engine.stop(c.id)
                    inst.terminated(c.labels.get(LABEL_CONTAINER, ""), inst.reason, c.id)
                await engine.remove(c.id)
                log.info("%s: removed container %s (%s)", inst.key, c.name, inst.reason)
        if await self.store.delete(rec.key, rec.mod_revision):
            log.info("%s: gone (%s)", inst.key, inst.reason)


def _fingerprint(inst: Instance) -> tuple[object, ...]:
    return (
        inst.state, inst.reason, inst.ip, inst.restarts, inst.next_start, inst.generation,
        [(c.id, c.state, c.exit_code) for c in inst.containers], len(inst.terminations),
    )


class Runner:
    """Brings one instance's containers on one engine in line with its app, in spec order."""

    def __init__(
        self, engine: Engine, inst: Instance, app: AppRecord, progress: Callable[[str], None]
    ) -> None:
        self.engine = engine
        self.inst = inst
        self.app = app
        self.spec: AppSpec = app.spec
        self.progress = progress

    async def step(self) -> None:
        inst = self.inst
        found = await self.engine.list({LABEL_INSTANCE: inst.key})
        if inst.generation != self.app.template_generation:
            await self._replace(found)
            found = []
        wanted = {s.name for s in self.spec.containers}
        by_name = {c.labels.get(LABEL_CONTAINER): c for c in found}
        for stale in found:
            if stale.labels.get(LABEL_CONTAINER) not in wanted:
                await self.engine.remove(stale.id)
        statuses: list[ContainerStatus] = []
        first_id = ""
        for spec in self.spec.containers:
            c = by_name.get(spec.name)
            if c is not None and not c.running and c.status != "created":
                if not await self._ended(c):
                    statuses.append(_status(spec.name, c))
                    break
                c = None
            if c is None:
                if inst.next_start > now():
                    inst.reason = inst.reason or "waiting to restart"
                    break
                c = await self._create(spec.name, first_id)
                if c is None:
                    break
            if not c.running:
                await self.engine.start(c.id)
                c = await self.engine.inspect(c.id) or c
                self.progress(f"started container {spec.name} ({c.id[:12]})")
            statuses.append(_status(spec.name, c))
            first_id = first_id or c.id
            if not c.running:
                break
        inst.containers = statuses
        if len(statuses) == len(self.spec.containers) and all(s.state == "running" for s in
                                                              statuses):
            inst.state, inst.reason = RUNNING, ""
            inst.ip = (await self.engine.inspect(first_id) or found[0]).ip if first_id else ""
        elif inst.state not in (EXITED, FAILED, FAILED_TO_START):
            inst.state = STARTING

    async def _replace(self, found: list[ContainerState]) -> None:
        for c in sorted(found, key=lambda c: c.name, reverse=True):
            if c.running:
                self.inst.terminated(
                    c.labels.get(LABEL_CONTAINER, ""), "KilledBySigma(updated)", c.id
                )
            await self.engine.remove(c.id)
        self.inst.generation = self.app.template_generation
        self.inst.request = self.spec.request()
        self.inst.state, self.inst.reason = SCHEDULED, "updated"
        self.progress(f"replacing containers for generation {self.app.template_generation}")

    async def _ended(self, c: ContainerState) -> bool:
        """Record a container end; True if it was removed for a restart."""
        inst = self.inst
        name = c.labels.get(LABEL_CONTAINER, "")
        reason = c.end_reason()
        if not any(t.container_id == c.id for t in inst.terminations):
            inst.terminated(name, reason, c.id)
            self.progress(f"container {name} ended: {reason}")
        if not should_restart(self.spec.restart, reason):
            inst.state = EXITED if reason == "Exited(0)" else FAILED
            inst.reason = reason
            return False
        await self.engine.remove(c.id)
        inst.restarts += 1
        delay = restart_backoff(inst.restarts)
        inst.next_start = now() + delay
        inst.state, inst.reason = STARTING, f"{reason}; restarting in {delay:g}s"
        return True

    async def _create(self, name: str, network_of: str) -> ContainerState | None:
        inst = self.inst
        spec = next(s for s in self.spec.containers if s.name == name)
        try:
            await self.engine.ensure_image(spec.image, self.progress)
        except EngineError as exc:
            inst.restarts += 1
            inst.next_start = now() + restart_backoff(inst.restarts)
            inst.state, inst.reason = FAILED_TO_START, f"FailedToStart({exc.message})"
            return None
        config = container_config(inst, self.spec, spec)
        if network_of:
            config["HostConfig"]["NetworkMode"] = f"container:{network_of}"
        cname = container_name(inst, name)
        try:
            cid = await self.engine.create(cname, config)
        except EngineError as exc:
            if exc.engine_status != 409:
                inst.state, inst.reason = FAILED_TO_START, f"FailedToStart({exc.message})"
                return None
            # A container of that name exists without our labels for this generation:
            # a leftover of an earlier generation or of a crash mid-create. Replace it.
            await self.engine.remove(cname)
            cid = await self.engine.create(cname, config)
        inst.next_start = 0.0
        return await self.engine.inspect(cid)


def _status(name: str, c: ContainerState) -> ContainerStatus:
    return ContainerStatus(
        name=name, id=c.id, state=c.status,
        exit_code=None if c.running else c.exit_code,
        started_at=c.started_at, finished_at="" if c.running else c.finished_at,
    )


__all__ = ["LABEL_GENERATION", "Controller", "restart_backoff", "should_restart"]
