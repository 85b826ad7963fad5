"""The leader's controller (the shape of a Kubernetes controller): the state cache and the
engine watches turn every change into keys on a work queue; a fixed pool of workers syncs
one key at a time; the scheduler places in rounds; a periodic resync re-queues everything at
low priority. Nothing loops over the cluster per change.

Keys: ("app", record key), ("inst", record key), ("node", name), and ("stray", node,
instance) for containers on a node that no record places there.

Invariants:
- a sync reads the cache and its engine watch, never etcd: what it writes goes through the
  Writer, guarded by the revisions it read (sigmad.state.writes), so a sync that raced with
  another writer loses cleanly and is retried with back-off (`add_rate_limited`);
- one key is synced by one worker at a time (sigmad.control.queue); steps on one engine are
  bounded (`engine_parallel`), so many engines are driven in parallel and none is flooded;
- a step stuck on the engine of a node that is lost is abandoned, so the instance moves
  without waiting for the engine to time out;
- at most one live copy (DESIGN.md §6): an instance on a lost node moves only once its copy
  there is fenced, `fence_grace` seconds after the node's lease lapsed: by that node's engine
  stopping it, or, when the engine does not answer, by the lapse itself
  (sigmad.control.migration decides; `_fence` asks the engine). Its agent back within the
  grace (a restart) finds its copies untouched;
- at most FENCES_AT_ONCE fence calls are in flight, over all engines, and an engine that
  failed one is not asked again within FENCE_RETRY, also by the instances that waited for a
  slot meanwhile: after a mass lease lapse the engines that answer again are not buried
  under one call per instance per second (20,000 calls that each timed out behind the
  others, retried, and timed out again: nothing was ever fenced through them);
- containers carry labels: a new leader adopts what runs instead of starting copies.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Coroutine, Iterable
from typing import Any

from sigmad import configs, metrics
from sigmad.config import MasterConfig
from sigmad.control import drive, migration, moves, reconcile, reloads, rollout
from sigmad.control.containers import EngineWatch
from sigmad.control.drive import ConfigInput, Report, Runner
from sigmad.control.migration import Loss, Transition
from sigmad.control.queue import WorkQueue
from sigmad.engine import ContainerState, Engine, EnginePool
from sigmad.errors import Conflict, EngineError, SigmaError
from sigmad.events import EventLog
from sigmad.models import (
    SSD_BROKEN,
    AppRecord,
    ContainerStatus,
    Instance,
    Node,
    now,
    split_name,
)
from sigmad.network import ipam
from sigmad.reasons import SSD_LOST, Kill, Reason, State
from sigmad.scheduler import binder
from sigmad.state.cache import (
    APPLIED,
    APPS,
    BEATS,
    CONFIGS,
    CONFIGS_HELD,
    INSTANCES,
    IPS,
    NODES,
    REVISIONS,
    ROLLOUTS,
    SSD_CLAIMS,
    SSDS,
    Cache,
)
from sigmad.state.writes import Writer, Writes
from sigmad.store import Store, Versioned
from sigmad.tls import client_context

log = logging.getLogger(__name__)
Key = tuple[str, ...]
STEP_AGAIN = 0.5  # seconds before the next step of a starting instance (readiness probes)
SETTLE = 0.02  # seconds the scheduler lets a burst of changes gather before a round
RETRY_UNPLACED = 10.0  # seconds between rounds for instances that fit nowhere
ABANDONED = "abandoned"
FENCE_TIMEOUT = 3.0  # seconds a lost node's engine has to stop an instance's copy
FENCE_RETRY = 1.0  # seconds between fence attempts while neither engine nor lapse fences
FENCES_AT_ONCE = 32  # fence calls in flight over all the lost nodes' engines
ROLLOUT_TICK = 1.0  # seconds between passes of a running rollout (min_ready, deadlines)


class Controller:
    """Drives the cluster toward the apps' specs while this master leads."""

    def __init__(self, store: Store, cache: Cache, config: MasterConfig,
                 engines: EnginePool | None = None) -> None:
        self.store = store
        self.cache = cache
        self.keys = store.keys
        self.config = config
        self.net = ipam.OverlayNet(config.overlay_cidr)
        self.writes = Writes(self.keys)
        self.writer = Writer(store, cache)
        self.queue: WorkQueue[Key] = WorkQueue()
        self.engines = engines or EnginePool(
            self.keys.prefix, tls=client_context(config.engine_tls) if config.engine_tls
            else None)
        self.watches: dict[str, EngineWatch] = {}
        self.watch_tasks: dict[str, asyncio.Task[None]] = {}
        self.gates: dict[str, asyncio.Semaphore] = {}
        self.events = EventLog(store)
        self.pending: set[str] = set()  # instances for the scheduler
        self.taken: set[str] = set()  # claimed overlay IPs
        self.steps: dict[Key, tuple[asyncio.Task[None], str]] = {}  # worker, node it is on
        self.abandoned: set[Key] = set()  # steps cancelled because their node is lost
        self.lapsed: dict[str, float] = {}  # node → when its heartbeat lease lapsed (monotonic)
        self.unfenced: dict[str, float] = {}  # node → when its engine last failed a fence
        self.fence_slots = asyncio.Semaphore(FENCES_AT_ONCE)
        self.own: dict[str, Instance] = {}  # records a step is writing now (key → record)
        self.dependents: dict[str, set[str]] = {}  # `ns/app` → the apps that depend on it
        self.new_copies: dict[str, tuple[str, list[ContainerStatus]]] = {}  # instance →
        # a live move's new node and its copy's statuses at its last step (moves.move_step)
        self.flips: dict[tuple[str, str], tuple[float, float]] = {}  # (node, instance) →
        # when its old copy's stop began waiting for the agents, when they had all applied
        self.scheduling = asyncio.Event()
        self.rng = random.Random()
        self._tasks: list[asyncio.Task[Any]] = []

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until cancelled."""
        await self.cache.synced.wait()
        self.cache.subscribe(self._changed)
        self.taken = {k.rsplit("/", 1)[-1] for k in self.cache.table(IPS)}
        for name in self._node_names():  # lapsed before this master led: count from now
            if name not in self.cache.alive:
                self.lapsed[name] = time.monotonic()
        for a in self.cache.apps().values():
            self._note_dependencies(None, a.value)
        for v in self.cache.nodes().values():
            self._watch_engine(v.value)
        self._find_pending()
        self._enqueue_all(low=False)
        loops: list[Coroutine[Any, Any, None]] = [
            self.writer.run(), self.events.run(), self._schedule_loop(), self._resync_loop(),
            *(self._worker() for _ in range(self.config.workers)),
        ]
        self._tasks = [asyncio.create_task(c) for c in loops]
        metrics.watch_queue(self.queue)
        try:
            await asyncio.gather(*self._tasks)
        finally:
            metrics.watch_queue(None)
            self.cache.unsubscribe(self._changed)
            self.queue.close()
            tasks = [*self._tasks, *self.watch_tasks.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.engines.close()

    async def _worker(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        while True:
            key = await self.queue.get()
            started, result = time.monotonic(), "error"
            try:
                await self._sync(key)
                self.queue.forget(key)
                result = "ok"
            except asyncio.CancelledError:
                if key not in self.abandoned:
                    raise  # the controller stops
                self.abandoned.discard(key)
                me.uncancel()
                log.info("%s: abandoned (its node is lost)", "/".join(key[1:]))
                self.queue.add_rate_limited(key)
            except Conflict:
                result = "conflict"
                self.queue.add_rate_limited(key)
            except SigmaError as exc:
                log.warning("%s: %s", "/".join(key[1:]), exc.message)
                self.queue.add_rate_limited(key)
            except Exception:
                log.exception("%s: sync crashed", "/".join(key[1:]))
                self.queue.add_rate_limited(key)
            finally:
                self.steps.pop(key, None)
                self.queue.done(key)
                metrics.SYNCS.labels(result).inc()
                metrics.SYNC_SECONDS.observe(time.monotonic() - started)

    async def _sync(self, key: Key) -> None:
        kind = key[0]
        if kind == "inst":
            await self._sync_instance(key)
        elif kind == "app":
            await self._sync_app(key[1])
        elif kind == "node":
            await self._sync_node(key[1])
        elif kind == "stray":
            await self._sync_stray(key[1], key[2])

    def _find_pending(self) -> None:
        """Every instance that waits for the scheduler (at start, and on each resync)."""
        specs = {v.value.spec.key: v.value.spec for v in self.cache.apps().values()}
        for key, v in self.cache.instances().items():
            spec = specs.get(v.value.app_key)
            if binder.wants_a_node(v.value) or (spec is not None and
                                                binder.wants_a_rebooking(v.value, spec)):
                self.pending.add(key)
        if self.pending:
            self.scheduling.set()

    def _enqueue_all(self, low: bool) -> None:
        for key in self.cache.apps():
            self.queue.add(("app", key), low)
        for name in self._node_names():
            self.queue.add(("node", name), low)
        for key in self.cache.instances():
            self.queue.add(("inst", key), low)

    async def _resync_loop(self) -> None:
        """Everything again at low priority, and containers no record places, once every
        `reconcile_interval` seconds, spread over it (a slice a second: at 100,000
        instances a resync at once would be a burst of its own). A slice is skipped while
        the last one still waits behind real work, so a busy leader does not pile up a
        backlog of resyncs to work off later."""
        interval = self.config.reconcile_interval
        while True:
            keys: list[Key] = [*(("app", k) for k in self.cache.apps()),
                               *(("node", n) for n in self._node_names()),
                               *(("inst", k) for k in self.cache.instances())]
            slices = max(1, int(interval))
            step = -(-len(keys) // slices)
            for n in range(slices):
                await asyncio.sleep(interval / slices)
                if self.queue.low:
                    continue
                for key in keys[n * step:(n + 1) * step]:
                    self.queue.add(key, low=True)
            self._find_pending()
            for node, watch in self.watches.items():
                for owner in watch.instances():
                    self._container_changed(node, owner)

    # -- routing changes to keys -------------------------------------------------------------

    def _changed(self, kind: str, key: str, old: Versioned[Any] | None,
                 new: Versioned[Any] | None) -> None:
        """Cache subscriber: queue what a change concerns."""
        if kind == INSTANCES:
            self._instance_changed(key, old, new)
        elif kind == APPS:
            self._app_changed(key, old, new)
        elif kind == NODES:
            node = (new or old).value  # type: ignore[union-attr]
            if new is not None:
                self._watch_engine(new.value)
            self.queue.add(("node", node.name))
            self.scheduling.set()
        elif kind == BEATS:
            name = key.rsplit("/", 1)[-1]
            if new is None:
                self.lapsed[name] = time.monotonic()
            else:
                self.lapsed.pop(name, None)
            was = old is not None and old.value.engine
            if was != (name in self.cache.ready):
                self._readiness_changed(name, not was)
        elif kind == SSDS and new is not None and new.value.state == SSD_BROKEN:
            claim = self.cache.get(SSD_CLAIMS, self.keys.ssd_claim(new.value.node, new.value.id))
            owner = self._record_key(claim.value.owner) if claim is not None else ""
            if owner:
                self.queue.add(("inst", owner))
        elif kind == CONFIGS_HELD:
            held = (new or old).value  # type: ignore[union-attr]
            owner = self._record_key(held.instance)
            if owner:
                self.queue.add(("inst", owner))
        elif kind == ROLLOUTS:
            self.queue.add(("app", self.keys.apps() + key.removeprefix(self.keys.prefix +
                                                                       "/rollouts/")))
        elif kind == APPLIED:
            for node, owner in self.flips:
                self.queue.add(("stray", node, owner))
            for v in self.cache.instances_on(key.rsplit("/", 1)[-1]):  # drained: flip now
                if v.value.quiesce:
                    self.queue.add(("inst", v.key))
        elif kind == IPS:
            ip = key.rsplit("/", 1)[-1]
            if new is None:
                self.taken.discard(ip)
            else:
                self.taken.add(ip)

    def _instance_changed(self, key: str, old: Versioned[Instance] | None,
                          new: Versioned[Instance] | None) -> None:
        inst = (new or old).value  # type: ignore[union-attr]
        # A step's own write needs no step of its own, and a Pending instance waits for
        # the scheduler: neither is queued (each would be a sync that finds nothing to do).
        if new is None or (self.own.get(key) is not new.value
                           and new.value.state != State.PENDING):
            self.queue.add(("inst", key))
        app = self.cache.app(inst.app_key)
        if new is None or old is None or self._rolling(inst.namespace, inst.app) or (
                app is not None and _config_batch_moves(old.value, new.value, app.value)):
            self.queue.add(("app", self.keys.app(inst.namespace, inst.app)))
        if new is not None and (binder.wants_a_node(new.value) or (
                app is not None and binder.wants_a_rebooking(new.value, app.value.spec))):
            self.pending.add(key)
            self.scheduling.set()
        else:
            self.pending.discard(key)
        if new is None or old is None or old.value.node != new.value.node:
            self.scheduling.set()  # capacity was freed somewhere
        was = old.value.state if old else None
        now_state = new.value.state if new else None
        if (was == State.RUNNING) != (now_state == State.RUNNING):
            self._wake_dependents(inst.namespace, inst.app)
        for v in (old, new):
            if v is not None and v.value.node:
                node = self.cache.node(v.value.node)
                if node is not None and node.draining:
                    self.queue.add(("node", node.name))

    def _app_changed(self, key: str, old: Versioned[AppRecord] | None,
                     new: Versioned[AppRecord] | None) -> None:
        self.queue.add(("app", key))
        app = (new or old).value  # type: ignore[union-attr]
        self._note_dependencies(old.value if old else None, new.value if new else None)
        if old is None or new is None or old.value.spec != new.value.spec:
            for ikey, v in self.cache.instances_of(app.spec.key).items():
                self.queue.add(("inst", ikey))
                if new is not None and binder.wants_a_rebooking(v.value, new.value.spec):
                    self.pending.add(ikey)
            self.scheduling.set()
            self._wake_dependents(app.spec.namespace, app.spec.app)

    def _wake_dependents(self, namespace: str, app: str) -> None:
        """Queue the instances of apps that depend on `app` (their hold may be over)."""
        for dependent in self.dependents.get(f"{namespace}/{app}", ()):
            for ikey in self.cache.instances_of(dependent):
                self.queue.add(("inst", ikey))

    def _note_dependencies(self, old: AppRecord | None, new: AppRecord | None) -> None:
        """Keep `dependents` in step with an app's depends_on."""
        for rec, add in ((old, False), (new, True)):
            if rec is None:
                continue
            for dep in rec.spec.depends_on:
                deps = self.dependents.setdefault(f"{rec.spec.namespace}/{dep}", set())
                if add:
                    deps.add(rec.spec.key)
                else:
                    deps.discard(rec.spec.key)

    def _readiness_changed(self, name: str, ready: bool) -> None:
        self.events.emit("node", "", name, "", "node Ready" if ready else
                         "node NotReady: heartbeat lost", warning=not ready)
        if not ready:
            for key, (task, node) in list(self.steps.items()):
                if node == name and key not in self.abandoned:
                    self.abandoned.add(key)
                    task.cancel()  # the worker that runs the step carries on with others
        else:
            watch = self.watches.get(name)
            if watch is not None:  # it may hold strays: look again now
                for owner in watch.instances():
                    self._container_changed(name, owner)
        self.queue.add(("node", name))
        for v in self.cache.instances_on(name):
            self.queue.add(("inst", v.key))
        self.scheduling.set()

    def _container_changed(self, node: str, owner: str) -> None:
        """Engine watch subscriber: a container of instance `owner` changed on `node`."""
        key = self._record_key(owner)
        v = self.cache.instance(key) if key else None
        if v is not None and node in (v.value.node, v.value.next_node):
            self.queue.add(("inst", key))
        else:
            self.queue.add(("stray", node, owner))

    def _record_key(self, owner: str) -> str:
        """The record key of instance `ns/app-i` ("" if it is not one)."""
        ns, _, name = owner.partition("/")
        parts = split_name(name)
        return self.keys.instance(ns, *parts) if parts else ""

    # -- engines -----------------------------------------------------------------------------

    def _watch_engine(self, node: Node) -> None:
        engine, new = self.engines.get(node.name, node.engine)
        if not new and node.name in self.watches:
            return
        old = self.watch_tasks.pop(node.name, None)
        if old is not None:
            old.cancel()
        watch = self.watches[node.name] = EngineWatch(node.name, engine,
                                                      self._container_changed)
        self.watch_tasks[node.name] = asyncio.create_task(watch.run())
        self.gates.setdefault(node.name, asyncio.Semaphore(self.config.engine_parallel))

    def _engine(self, node: Node) -> tuple[Engine, EngineWatch] | None:
        """The engine of `node` and its watch, once the watch has listed it."""
        self._watch_engine(node)
        watch = self.watches[node.name]
        if not watch.synced.is_set():
            return None
        return watch.engine, watch

    def _on_engine(self, key: Key, node: str) -> None:
        """The current step talks to `node`'s engine (abandon it if the node is lost)."""
        task = asyncio.current_task()
        assert task is not None
        self.steps[key] = (task, node)

    # -- syncs -------------------------------------------------------------------------------

    async def _sync_app(self, key: str) -> None:
        rec: Versioned[AppRecord] | None = self.cache.get(APPS, key)
        ns, name = key.removeprefix(self.keys.apps()).split("/", 1)
        plan = reconcile.sync_app(self.writes, rec.value if rec else None,
                                  self.cache.instances_of(f"{ns}/{name}"), self.net, self.taken,
                                  now())
        if rec is not None and plan.app is not None:  # its config rollout failed
            if not await self.writer.write(self.writes.put_app(key, plan.app, rec.mod_revision)):
                raise Conflict(f"app {ns}/{name} changed meanwhile")
            for inst, message, warning in plan.events:
                self._emit(inst, message, warning)
                self.events.emit("app", ns, name, name, message, warning)
            return
        if plan.watching:
            self.queue.add_after(("app", key), ROLLOUT_TICK)
        results = await asyncio.gather(*(self.writer.write(c) for c in plan.changes))
        for inst, message, warning in plan.events:
            self._emit(inst, message, warning)
        if not all(results):
            raise Conflict(f"app {ns}/{name}: {results.count(0)} changes lost a race")
        if rec is not None and self._rolling(ns, name):
            await self._sync_rollout(rec)

    def _rolling(self, namespace: str, app: str) -> bool:
        """Whether the app has a rollout under way (running, reverting or in canary)."""
        v = self.cache.get(ROLLOUTS, self.keys.rollout(namespace, app))
        return v is not None and v.value.phase not in (rollout.Phase.DONE,
                                                       rollout.Phase.REVERTED)

    async def _sync_rollout(self, app: Versioned[AppRecord]) -> None:
        """One pass of the app's rolling release (sigmad.control.rollout): the record's new
        state first (with the app record the plan carries on a revert), then the
        instance steps, each guarded by its instance as read. Looked at again every
        ROLLOUT_TICK while it runs (min_ready, the progress deadline)."""
        spec = app.value.spec
        ns, name = spec.namespace, spec.app
        key = self.keys.rollout(ns, name)
        found: Versioned[rollout.Rollout] | None = self.cache.get(ROLLOUTS, key)
        if found is None:
            return
        record, policy, t = found.value, spec.update, now()
        live = [v for v in self.cache.ordered(f"{ns}/{name}")
                if v.value.state != State.TERMINATING and v.value.index < spec.replicas]
        target = rollout.target_of(record)
        if not record.recreate_reason and len(self.cache.ready) < 2:
            record = dataclasses.replace(record, recreate_reason="a live move needs a second "
                                         "Ready node: each instance stops, then starts again")
        request = spec.request()
        back = self.cache.get(REVISIONS, self.keys.revision(ns, name, record.from_revision))
        p = rollout.plan(record, [rollout.view(v.value, target, t, request) for v in live],
                         app.value, back.value if back is not None else None, t)
        p.kind = "recreate" if record.recreate_reason else "move"
        if p.rollout != record:
            p.rollout.updated = t
            change = self.writes.put_rollout(key, p.rollout, found.mod_revision)
            if p.app is not None:
                change += self.writes.put_app(app.key, p.app, app.mod_revision)
            if not await self.writer.write(change):
                raise Conflict(f"rollout of {ns}/{name} changed meanwhile")
            if p.rollout.phase != record.phase:
                self.events.emit("app", ns, name, name, _phase_text(p.rollout),
                                 p.rollout.phase in (rollout.Phase.PAUSED,
                                                     rollout.Phase.REVERTING))
            if p.revert:
                return  # the app is rewritten: the next pass rolls back from it
        by_index = {v.value.index: v for v in live}
        todo = rollout.steps(p.rollout, [v.value for v in live], p, policy.min_ready, t)
        if todo and record.recreate_reason and any(s.index in p.start for s in todo):
            self.events.emit("app", ns, name, name, f"rolling to revision {target} without "
                             f"live moves: {record.recreate_reason}", True)
        results = await asyncio.gather(*(self._write_step(by_index[s.index], s)
                                         for s in todo))
        if not all(results):
            raise Conflict(f"rollout of {ns}/{name}: a step lost a race")
        if p.rollout.phase not in (rollout.Phase.DONE, rollout.Phase.REVERTED):
            self.queue.add_after(("app", app.key), ROLLOUT_TICK)

    async def _write_step(self, v: Versioned[Instance], s: rollout.Step) -> bool:
        change = self.writes.update_instance(v, s.new)
        for node, ports in s.releases:
            change += self.writes.release_ports(node, ports)
        done = bool(await self.writer.write(change))
        if done:
            self._emit(s.new, s.event, s.warning)
            if s.releases:
                self.queue.add(("stray", s.releases[0][0], v.value.key))
        return done

    def _revision_app(self, inst: Instance, app: AppRecord, moving: bool) -> AppRecord:
        """The app as `inst` runs it: the current template once it is on it, or once its
        release step to it has begun (a live move's new copy, `moving`; an in-place
        recreate); else the spec of its own revision, so a rolling release replaces nothing
        before its turn (the current one if that revision is no longer kept)."""
        stepping = inst.release == app.template_generation and not inst.release_failed
        if inst.generation == app.template_generation or (
                stepping and (moving or not (inst.move or inst.next_node))):
            return app
        v = self.cache.get(REVISIONS, self.keys.revision(inst.namespace, inst.app,
                                                         inst.generation))
        return app if v is None else rollout.app_at(v.value, app, app.generation, app.updated)

    async def _sync_node(self, name: str) -> None:
        node = self.cache.node(name)
        if node is None or not node.draining:
            return
        v = migration.drain_next(name, self.cache.instances_on(name))
        if v is not None:
            await self._write(v, Transition(v.value.move_asked(f"drain {name}")))

    async def _sync_stray(self, node: str, owner: str) -> None:
        """Remove the containers of `owner` on `node` unless its record places it there."""
        key = self._record_key(owner)
        v = self.cache.instance(key) if key else None
        if v is not None and node in (v.value.node, v.value.next_node):
            return
        info = self.cache.node(node)
        if info is None or node not in self.cache.ready:
            return  # removed when the node is back (its readiness re-queues strays)
        found = self._engine(info)
        if found is None:
            return
        engine, watch = found
        containers = watch.of(owner)
        if not containers:
            self.flips.pop((node, owner), None)
            return
        if v is not None and v.value.node != node and any(c.running for c in containers):
            wait = self._flip_wait(node, owner, v.mod_revision)
            if wait > 0:
                self.queue.add_after(("stray", node, owner), wait)
                return
        self.flips.pop((node, owner), None)
        reason = Reason.killed(Kill.MIGRATED if v is not None else Kill.DELETED)
        self._on_engine(("stray", node, owner), node)
        async with self.gates[node]:
            await _stop_all(engine, watch, containers)
        ns, _, name = owner.partition("/")
        self.events.emit("instance", ns, name, name.rpartition("-")[0],
                         f"stray containers on {node} removed: {reason}", True)

    def _flip_wait(self, node: str, owner: str, revision: int) -> float:
        """Seconds the old copy of a moved instance on `node` keeps running (0: stop it
        now). It stops FLIP_GRACE after every Ready node's agent has applied the flip to its
        overlay FDB (`overlay-applied/{node}` at or past the record's `revision`), so no
        peer sends to it any more; or FLIP_WAIT after the wait began if some agent never
        says so (one that cannot program its FDB). A node whose agent never said what it
        applied (an older agent, a hollow host) is not waited for."""
        started, applied = self.flips.setdefault((node, owner), (time.monotonic(), 0.0))
        clock = time.monotonic()
        if not applied:
            said = {n: self.cache.get(APPLIED, self.keys.overlay_applied(n))
                    for n in self.cache.ready if n != node}
            lagging = [n for n, v in said.items() if v is not None and v.value.revision < revision]
            if lagging and clock - started < moves.FLIP_WAIT:
                return min(moves.FLIP_RECHECK, moves.FLIP_WAIT - (clock - started))
            if lagging:
                log.warning("%s: the agents of %s did not apply its move within %gs; "
                            "stopping its old copy on %s anyway", owner, ", ".join(lagging),
                            moves.FLIP_WAIT, node)
            applied = clock
            self.flips[(node, owner)] = (started, applied)
        return max(0.0, moves.FLIP_GRACE - (clock - applied))

    async def _sync_instance(self, key: Key) -> None:
        v: Versioned[Instance] | None = self.cache.instance(key[1])
        if v is None:
            return
        inst = v.value
        app = self.cache.app(inst.app_key)
        if inst.state == State.TERMINATING:
            await self._terminate(key, v, app)
            return
        policy = app.value.spec.migration if app else "auto"
        t = migration.node_change(inst, self.cache.ready, policy)
        if t is not None:
            await self._write(v, t)
            return
        if migration.needs_fence(inst, self.cache.ready):
            await self._fence(key, v, policy)
            return
        t = migration.disk_change(inst, self._broken_disks(inst), policy)
        if t is not None:
            await self._lose_disk(key, v, app, t)
            return
        if inst.state in (State.PENDING, State.NEED_MIGRATION) or app is None or not inst.node:
            return
        node = self.cache.node(inst.node)
        found = self._engine(node) if node is not None else None
        if node is None or found is None:
            self.queue.add_after(key, STEP_AGAIN)  # its engine's containers are not known yet
            return
        engine, watch = found
        if inst.next_node:
            await self._move(key, v, app.value)
            return
        self.new_copies.pop(inst.key, None)  # (a move that has ended)
        hold = ""
        if app.value.spec.depends_on:
            running = {d: sum(1 for i in self.cache.instances_of(d).values()
                              if i.value.state == State.RUNNING)
                       for d in (f"{inst.namespace}/{dep}" for dep in app.value.spec.depends_on)}
            hold = reconcile.unmet_dependencies(
                app.value, {k: a.value for k, a in self._apps_by_key().items()}, running)
        work = inst.copy()
        runs = self._revision_app(inst, app.value, moving=False)
        self._on_engine(key, node.name)
        try:
            async with self.gates[node.name]:
                await Runner(engine, watch, work, runs, node, self._reporter(work),
                             self._config_input(inst, node.name, runs),
                             app.value.spec.request()).step(hold)
        except EngineError as exc:
            work.reason = f"engine: {exc.message}"
            await self._save(v, work)
            raise
        if work.state != inst.state and work.state != State.RUNNING:
            self._emit(work, f"{inst.state} → {work.state}" +
                       (f": {work.reason}" if work.reason else ""),
                       work.state in (State.FAILED, State.FAILED_TO_START))
        await self._save(v, work)
        self._revisit(key, work, hold)

    async def _move(self, key: Key, v: Versioned[Instance], app: AppRecord) -> None:
        inst = v.value
        target = self.cache.node(inst.next_node)
        found = self._engine(target) if target is not None else None
        if target is None or found is None:
            self.queue.add_after(key, STEP_AGAIN)
            return
        engine, watch = found
        runs = self._revision_app(inst, app, moving=True)
        releasing = inst.release == runs.template_generation and not inst.release_failed
        applied = self.cache.get(APPLIED, self.keys.overlay_applied(inst.node))
        old = moves.OldCopy(inst.node in self.cache.ready,
                            applied.value.drained if applied is not None else None)
        t = moves.drained_flip(inst, runs, watch, old, self.new_copies, now())
        if t is not None:  # (no engine call: it does not wait for the engine's gate)
            await self._write(v, t)
            log.info("%s: flipped %.2fs after the quiesce mark", inst.key, now() - inst.quiesce)
            self.queue.add(("stray", inst.node, inst.key))
            return
        self._on_engine(key, target.name)
        async with self.gates[target.name]:
            t = await moves.move_step(inst, runs, engine, target, watch, self._reporter(inst),
                                      self._config_input(inst, target.name, runs),
                                      app.spec.update.min_ready if releasing else 0.0, old,
                                      self.new_copies)
        if t is None:
            self.queue.add_after(key, STEP_AGAIN)
            return
        await self._write(v, t)
        if inst.quiesce and t.new.node == inst.next_node:
            log.info("%s: flipped %.2fs after the quiesce mark", inst.key, now() - inst.quiesce)
        if t.new.quiesce:  # the old copy drains: its agent's word re-queues it (or the bound)
            self.queue.add_after(key, STEP_AGAIN)
        elif t.new.node == inst.next_node:  # flipped: the old copy is now a stray
            self.queue.add(("stray", inst.node, inst.key))
        else:  # called off: the new copy is a stray
            self.queue.add(("stray", inst.next_node, inst.key))

    async def _fence(self, key: Key, v: Versioned[Instance], policy: str) -> None:
        """Fence the copy of an instance on its lost node: the node's engine stops it, else
        it counts as fenced once the node's lease has lapsed plus the grace; until then the
        instance waits (NeedMigration), saying why, and is looked at again. A node whose
        agent is alive says its engine does not answer: it is not asked (a stop that reached
        the engine as it woke would kill a copy that is about to resume there)."""
        inst = v.value
        node = self.cache.node(inst.node)
        loss = self._loss(inst.node)
        stopped = None
        failed = self.unfenced.get(inst.node, 0.0)
        grace = self.config.fence_grace
        wait = migration.fence_wait(loss, grace, time.monotonic())
        # The engine is asked only once the grace has passed too: an agent that restarts
        # (an upgrade) may let its lease lapse and be back a moment later, its copies
        # untouched. (An engine that just failed one fence is not asked again at once for
        # the others: a dead host's hundreds of instances would each wait FENCE_TIMEOUT.)
        if node is not None and wait == 0 and time.monotonic() - failed >= FENCE_RETRY:
            async with self.fence_slots:
                failed = self.unfenced.get(inst.node, 0.0)  # (it may have failed meanwhile)
                if time.monotonic() - failed >= FENCE_RETRY:
                    self._watch_engine(node)  # (the engine client of the node's record)
                    stopped = await drive.fence(self.watches[node.name].engine, inst.key,
                                                FENCE_TIMEOUT)
                    if stopped is None:
                        self.unfenced[inst.node] = time.monotonic()
                    else:
                        self.unfenced.pop(inst.node, None)
        if stopped is not None:
            how = (f"{len(stopped)} container(s) stopped on {inst.node} through its engine"
                   if stopped else f"{inst.node}'s engine runs no container of it")
        else:
            wait = migration.fence_wait(loss, grace, time.monotonic())
            if wait is None or wait > 0:
                why = ("waiting for a fence: its engine does not answer and its agent is "
                       "alive, so the copy there may still run" if wait is None else
                       f"waiting for a fence: {grace:g}s after its node's heartbeat lease "
                       "lapsed, its engine is asked to stop the copy (if it does not "
                       "answer, the copy then counts as fenced)")
                if not inst.reason.endswith(why):
                    await self._write(v, Transition(inst.waiting_for_fence(why), [],
                                                    [(why, True)]))
                self.queue.add_after(key, FENCE_RETRY if wait is None else
                                     min(wait, FENCE_RETRY))
                return
            how = (f"the heartbeat lease of {inst.node} lapsed {grace:g}s ago and its "
                   "engine does not answer")
        await self._write(v, migration.fenced(inst, how, stopped or [], self.cache.ready,
                                              policy))

    def _config_input(self, inst: Instance, node: str, app: AppRecord) -> ConfigInput:
        """What the Runner needs of `inst`'s configs on `node`: the versions its agent has
        delivered, and the environment of `env_from` at the pinned versions."""
        held = self.cache.get(CONFIGS_HELD, self.keys.config_held(node, inst.key))
        versions = {}
        for e in app.spec.env_from:
            number = inst.configs.get(e.config, 0)
            v = self.cache.get(CONFIGS, self.keys.config_version(inst.namespace, e.config,
                                                                 number))
            if v is not None:
                versions[(e.config, number)] = v.value
        env, wait = configs.env_of(app.spec, inst.configs, versions)
        return ConfigInput(dict(held.value.versions) if held is not None else {}, env, wait)

    def _loss(self, node: str) -> Loss:
        """What this master knows of lost `node` (a lapse it did not see counts from now)."""
        if node in self.cache.alive:
            return Loss(alive=True)
        return Loss(alive=False, lapsed=self.lapsed.setdefault(node, time.monotonic()))

    async def _terminate(self, key: Key, v: Versioned[Instance],
                         app: Versioned[AppRecord] | None) -> None:
        """Stop and remove its containers (when its node answers), then delete the record
        and its claims. A lost node's containers are removed as strays when it is back."""
        inst = v.value
        for name in (inst.node, inst.next_node):
            node = self.cache.node(name) if name else None
            if node is None or name not in self.cache.ready:
                continue
            found = self._engine(node)
            if found is None:
                self.queue.add_after(key, STEP_AGAIN)
                return
            engine, watch = found
            containers = watch.of(inst.key)
            if containers:
                self._on_engine(key, name)
                async with self.gates[name]:
                    if app is not None:
                        work = inst.copy()
                        await Runner(engine, watch, work, app.value, node,
                                     self._reporter(work)).remove_all(containers, inst.reason)
                    else:
                        await _stop_all(engine, watch, containers)
        owner = self.cache.get(IPS, self.keys.ip(inst.ip)) if inst.ip else None
        disks = {d.disk: self.cache.get(SSDS, self.keys.ssd(inst.node, d.disk))
                 for d in inst.ssds}
        if await self.writer.write(self.writes.delete_instance(v, owner, disks)):
            self._emit(inst, f"gone ({inst.reason})", False)
        else:
            raise Conflict(f"{inst.key} changed meanwhile")

    def _broken_disks(self, inst: Instance) -> dict[str, str]:
        """The broken disks among `inst`'s on its node: id → error."""
        out = {}
        for d in inst.ssds:
            v = self.cache.get(SSDS, self.keys.ssd(inst.node, d.disk))
            if v is not None and v.value.state == SSD_BROKEN:
                out[d.disk] = v.value.error
        return out

    async def _lose_disk(self, key: Key, v: Versioned[Instance],
                         app: Versioned[AppRecord] | None, t: Transition) -> None:
        """An instance's disk broke: its containers are stopped and removed first (when its
        node answers: a copy elsewhere, or on new disks here, never runs beside them), then
        the transition is written."""
        inst = v.value
        node = self.cache.node(inst.node)
        found = self._engine(node) if node is not None and inst.node in self.cache.ready \
            else None
        if node is not None and found is not None:
            engine, watch = found
            containers = watch.of(inst.key)
            if containers:
                self._on_engine(key, node.name)
                async with self.gates[node.name]:
                    if app is not None:
                        work = inst.copy()
                        await Runner(engine, watch, work, app.value, node,
                                     self._reporter(work)).remove_all(containers, SSD_LOST)
                        t.new.terminations = work.terminations
                    else:
                        await _stop_all(engine, watch, containers)
        await self._write(v, t)

    # -- writing -----------------------------------------------------------------------------

    async def _write(self, v: Versioned[Instance], t: Transition) -> None:
        """Write a transition (with its port releases); Conflict if the record moved on."""
        change = self.writes.update_instance(v, t.new)
        for node, ports in t.releases:
            change += self.writes.release_ports(node, ports)
        if not await self.writer.write(change):
            raise Conflict(f"{v.value.key} changed meanwhile")
        for message, warning in t.events:
            self._emit(t.new, message, warning)

    async def _save(self, v: Versioned[Instance], work: Instance) -> None:
        """Write what a step changed, if anything (the step says itself when it needs to
        step again: `_revisit`)."""
        if _fingerprint(work) == _fingerprint(v.value):
            return
        work.updated = now()
        self.own[v.key] = work
        try:
            if not await self.writer.write(self.writes.update_instance(v, work)):
                raise Conflict(f"{work.key}: record changed meanwhile")
        finally:
            self.own.pop(v.key, None)

    def _revisit(self, key: Key, inst: Instance, hold: str) -> None:
        """Step again when this instance needs it: when its restart back-off ends, or soon
        while it starts (readiness probes). Other changes arrive as events."""
        if inst.state == State.RUNNING or (hold and not inst.containers):
            return
        if inst.state in (State.STARTING, State.SCHEDULED, State.FAILED_TO_START) or \
                inst.next_start:
            self.queue.add_after(key, max(inst.next_start - now(), 0.0) or STEP_AGAIN)

    # -- the scheduler -----------------------------------------------------------------------

    async def _schedule_loop(self) -> None:
        """Place what waits, in rounds, whenever something that matters changed."""
        while True:
            try:
                await asyncio.wait_for(self.scheduling.wait(), RETRY_UNPLACED)
            except TimeoutError:
                if not self.pending:
                    continue
            self.scheduling.clear()
            await asyncio.sleep(SETTLE)
            try:
                await self._schedule()
            except SigmaError as exc:
                log.warning("scheduling round failed: %s", exc.message)
                await asyncio.sleep(STEP_AGAIN)
                self.scheduling.set()

    async def _schedule(self) -> None:
        apps = {k.removeprefix(self.keys.apps()): v.value.spec
                for k, v in self.cache.apps().items()}
        started = time.monotonic()
        result = await binder.schedule(self.cache, self.writer, self.writes, apps,
                                       sorted(self.pending), self.rng, max_rounds=1)
        metrics.PLACEMENT_ROUNDS.observe(time.monotonic() - started)
        metrics.PLACEMENTS.inc(len(result.scheduled))
        for ikey, (node, ip) in result.scheduled.items():
            ns, name = ikey.split("/", 1)
            self.events.emit("instance", ns, name, name.rsplit("-", 1)[0],
                             f"scheduled on {node} (IP {ip})")
        for ikey, reason in result.pending.items():
            ns, name = ikey.split("/", 1)
            self.events.emit("instance", ns, name, name.rsplit("-", 1)[0], f"Pending: {reason}",
                             warning=True)
        if result.conflicts:
            self.scheduling.set()  # re-plan what lost, from the cache as it is then

    # -- helpers -----------------------------------------------------------------------------

    def _node_names(self) -> Iterable[str]:
        return (v.value.name for v in self.cache.nodes().values())

    def _apps_by_key(self) -> dict[str, Versioned[AppRecord]]:
        return {v.value.spec.key: v for v in self.cache.apps().values()}

    def _emit(self, inst: Instance, message: str, warning: bool) -> None:
        self.events.emit("instance", inst.namespace, inst.name, inst.app, message, warning)

    def _reporter(self, inst: Instance) -> Report:
        def report(message: str, warning: bool) -> None:
            log.log(logging.INFO if warning else logging.DEBUG, "%s: %s", inst.key, message)
            self._emit(inst, message, warning)
        return report


async def _stop_all(engine: Engine, watch: EngineWatch,
                    containers: list[ContainerState]) -> None:
    """Stop (briefly) and remove containers no record wants."""
    for c in containers:
        if c.running:
            await engine.stop(c.id, timeout=2)
        await engine.remove(c.id)
        watch.drop(c.id)


def _phase_text(r: rollout.Rollout) -> str:
    """The event a rollout's new phase gives."""
    text = {rollout.Phase.RUNNING: f"rolling out revision {r.to_revision}",
            rollout.Phase.CANARY: f"canary of revision {r.to_revision} ready: waiting for "
                                  "'sigmactl rollout promote'",
            rollout.Phase.PAUSED: f"rollout to revision {r.to_revision} paused",
            rollout.Phase.REVERTING: f"rollout to revision {r.to_revision} failed: "
                                     f"reverting to revision {r.from_revision}",
            rollout.Phase.DONE: f"revision {r.to_revision} rolled out",
            rollout.Phase.REVERTED: f"reverted to revision {r.from_revision}"}[r.phase]
    return f"{text}: {r.reason}" if r.reason else text


def _fingerprint(inst: Instance) -> tuple[object, ...]:
    return (
        inst.state, inst.reason, inst.ip, inst.restarts, inst.next_start, inst.generation,
        [(c.id, c.state, c.exit_code, c.ready, c.limit) for c in inst.containers],
        len(inst.terminations), inst.configs_have, inst.reloaded_at,
    )


def _config_batch_moves(old: Instance, new: Instance, app: AppRecord) -> bool:
    """An instance took a reload, or its state moved while its reload is checked, or it
    became available on the app's config versions, or stopped being so: its check, or the
    next batch of a config rollout, may be due (sigmad.control.reloads)."""
    return bool(app.configs) and (
        reloads.checking(old) != reloads.checking(new)
        or (reloads.checking(new) and old.state != new.state)
        or (new.configs == app.configs and reloads.settled(old) != reloads.settled(new)))
