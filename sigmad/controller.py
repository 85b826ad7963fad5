"""Reconcile apps → instances → containers (leader only).

One pass reads the whole state from etcd, creates and retires instance records, places
Pending instances, and hands every placed instance to a worker that drives its containers
on its node's engine (sigmad.runtime). Every write is a CAS on the record's mod_revision, so a
pass that raced with another writer just loses and retries next pass. Containers carry labels,
so a restarted master adopts what runs instead of starting duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from dataclasses import dataclass

from sigmad import migration, moves, scheduler
from sigmad.config import DEFAULT_OVERLAY_CIDR
from sigmad.engine import LABEL_INSTANCE, Engine, EnginePool
from sigmad.errors import EngineError, SigmaError
from sigmad.events import EventLog
from sigmad.migration import Change
from sigmad.models import (
    FAILED_TO_START,
    NEED_MIGRATION,
    PENDING,
    RUNNING,
    SCHEDULED,
    STARTING,
    TERMINATING,
    AppRecord,
    Instance,
    Node,
    NodeLock,
    Owner,
    now,
)
from sigmad.network import ipam
from sigmad.runtime import Runner
from sigmad.spec import AppSpec, Resources
from sigmad.store import Guard, Op, Store, Versioned, WatchCompacted, batches

log = logging.getLogger(__name__)
RESYNC = 30.0  # seconds between passes that check every instance's containers, events or not
STEP_AGAIN = 0.5  # seconds before the next step of a starting instance (readiness probes)


@dataclass
class ClusterState:
    """Everything one pass needs, read from etcd."""

    apps: dict[str, Versioned[AppRecord]]
    instances: dict[str, Versioned[Instance]]
    nodes: dict[str, Node]
    ready: set[str]
    revision: int


def unmet_dependencies(app: AppRecord, state: ClusterState) -> str:
    """Why `app` must wait for its depends_on apps ("" when all have every replica Running)."""
    waiting = []
    for dep in app.spec.depends_on:
        rec = state.apps.get(f"{app.spec.namespace}/{dep}")
        if rec is None:
            waiting.append(f"{dep} (no such app)")
            continue
        running = sum(
            1 for i in state.instances.values()
            if i.value.namespace == app.spec.namespace and i.value.app == dep
            and i.value.state == RUNNING
        )
        if running < rec.value.spec.replicas:
            waiting.append(f"{dep} ({running}/{rec.value.spec.replicas} running)")
    return f"waiting for depends_on: {', '.join(waiting)}" if waiting else ""


class Controller:
    """Drives the cluster toward the apps' specs."""

    def __init__(self, store: Store, interval: float = 5.0,
                 overlay_cidr: str = DEFAULT_OVERLAY_CIDR) -> None:
        self.store = store
        self.net = ipam.OverlayNet(overlay_cidr)
        self.keys = store.keys
        self.interval = interval
        self.engines = EnginePool(store.keys.prefix)
        self.events = EventLog(store)
        self.workers: dict[str, asyncio.Task[None]] = {}
        self.worker_nodes: dict[str, str] = {}  # instance → the node its worker's engine is on
        self.listeners: dict[str, asyncio.Task[None]] = {}
        self.wake = asyncio.Event()
        self.last_ready: set[str] | None = None
        self.dirty: set[str] = set()  # instances whose containers the engines reported on
        self.last_full = float("-inf")  # when every instance was last checked on its engine

    async def run(self) -> None:
        """Reconcile until cancelled: on every etcd change under the prefix, and periodically."""
        background = [asyncio.create_task(self._watch()), asyncio.create_task(self.events.run())]
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
            tasks = [*background, *self.workers.values(), *self.listeners.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.engines.close()

    async def _watch(self) -> None:
        while True:
            try:
                revision = await self.store.ping()
                async for event in self.store.watch(self.keys.prefix + "/", revision + 1):
                    if not event.key.startswith(self.keys.events()):
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
        taken = await self._sync_instances(state)
        await self._claim_ips(state, taken)
        await self._commit(self._losses_and_drains(state))
        await self._schedule(state)
        if any(
            (app := state.apps.get(f"{v.value.namespace}/{v.value.app}")) is not None
            and v.value.generation != app.value.template_generation
            for v in state.instances.values()
        ):
            await self._admit_updates()
        state = await self.read()
        self._node_events(state)
        self._refresh_engines(state)
        loop = asyncio.get_running_loop()
        full = loop.time() - self.last_full >= RESYNC
        if full:
            self.last_full = loop.time()
        holds = {key: unmet_dependencies(rec.value, state)
                 for key, rec in state.apps.items() if rec.value.spec.depends_on}
        self._abandon_lost(state.ready)
        for key, inst in state.instances.items():
            if inst.value.state in (PENDING, NEED_MIGRATION) or key in self.workers:
                continue
            app = state.apps.get(f"{inst.value.namespace}/{inst.value.app}")
            settled = (
                inst.value.state == RUNNING and app is not None and not inst.value.next_node
                and inst.value.generation == app.value.template_generation
            )
            if settled and not full and key not in self.dirty:
                continue  # nothing changed for it: the engine's events would have said
            self.dirty.discard(key)
            hold = holds.get(f"{inst.value.namespace}/{inst.value.app}", "")
            ready = inst.value.node in state.ready
            self._spawn(key, self._drive(inst.key, hold, ready), inst.value.node if ready else "")
        if full:
            await self._sweep_orphans(state)

    def _losses_and_drains(self, state: ClusterState) -> list[Change]:
        """What lost and draining nodes call for (sigmad.migration), events emitted."""
        instances = list(state.instances.values())
        policies = {k: rec.value.spec.migration for k, rec in state.apps.items()}
        plans = [
            migration.node_losses(self.keys, instances, policies, state.ready),
            migration.drains([n for n, node in state.nodes.items() if node.draining],
                             instances),
        ]
        for plan in plans:
            for inst, message, warning in plan.events:
                self.events.emit("instance", inst.namespace, inst.name, inst.app, message,
                                 warning)
        return [change for plan in plans for change in plan.changes]

    def _node_events(self, state: ClusterState) -> None:
        if self.last_ready is not None:
            for name in sorted(state.ready - self.last_ready):
                self.events.emit("node", "", name, "", "node Ready")
                self.last_full = float("-inf")  # check it at once: it may hold orphans
            for name in sorted(self.last_ready - state.ready):
                self.events.emit("node", "", name, "", "node NotReady: heartbeat lost",
                                 warning=True)
        self.last_ready = set(state.ready)

    def _spawn(self, key: str, work: Awaitable[None], node: str = "") -> None:
        """Run one step of instance `key` in a worker task; `node`: the Ready node whose
        engine it talks to (its worker is abandoned if that node is lost)."""
        async def runner() -> None:
            try:
                await work
            except SigmaError as exc:
                log.warning("%s: %s", key, exc.message)
            except Exception:
                log.exception("%s: worker crashed", key)
            finally:
                self.workers.pop(key, None)
                self.worker_nodes.pop(key, None)

        self.workers[key] = asyncio.create_task(runner())
        if node:
            self.worker_nodes[key] = node

    def _abandon_lost(self, ready: set[str]) -> None:
        """Cancel steps waiting on the engine of a node that is lost (a hung engine would
        hold them until the request times out): the instance is moved without them."""
        for key, node in list(self.worker_nodes.items()):
            task = self.workers.get(key)
            if node not in ready and task is not None and not task.done():
                log.info("%s: node %s is lost: abandoning the step on its engine", key, node)
                task.cancel()

    async def _commit(self, items: list[Change]) -> None:
        """Write changes (guards, ops) in transactions of bounded size; a lost transaction is
        retried one change at a time so that only what really conflicted is skipped (the next
        pass re-reads it)."""
        for chunk in batches(items, lambda c: len(c[0]) + len(c[1])):
            if await self.store.commit([g for c in chunk for g in c[0]],
                                       [o for c in chunk for o in c[1]]):
                continue
            for guards, ops in chunk:
                await self.store.commit(guards, ops)

    async def _admit_updates(self) -> None:
        """Book the new request of instances whose app changed its template, before their
        containers are replaced on the same node: a bigger request must still fit there.
        Node locks are read before the instances (as the scheduler does) and every booking
        guards and bumps its node's lock, so it never races a placement into overbooking.
        An update that does not fit waits, and the old containers keep running."""
        locks = await self.store.revisions(self.keys.node_locks())
        state = await self.read()
        snap = scheduler.build_snapshot(
            list(state.nodes.values()), state.ready,
            [v.value for v in state.instances.values()], state.revision,
        )
        for v in state.instances.values():
            inst = v.value
            app = state.apps.get(f"{inst.namespace}/{inst.app}")
            info = snap.nodes.get(inst.node)
            if app is None or info is None or inst.state in (PENDING, TERMINATING):
                continue
            new = app.value.spec.request()
            if inst.generation == app.value.template_generation or inst.request == new:
                continue
            grown = Resources(new.cpu_m - inst.request.cpu_m, new.memory - inst.request.memory)
            short = info.lacks(grown)
            if short:
                why = f"update waits: the new request does not fit on {inst.node} " \
                      f"(insufficient {' and '.join(short)}); the old containers keep running"
                if inst.reason != why:
                    inst.reason = why
                    await self.store.update(v.key, inst, v.mod_revision)
                    self.events.emit("instance", inst.namespace, inst.name, inst.app, why,
                                     warning=True)
                continue
            lock = self.keys.node_lock(inst.node)
            inst.request, inst.updated = new, now()
            if await self.store.commit(
                [Guard(v.key, v.mod_revision), Guard(lock, locks.get(lock, 0))],
                [Op(v.key, inst), Op(lock, NodeLock(f"update {inst.key}"))],
            ):
                info.requested.cpu_m += grown.cpu_m
                info.requested.memory += grown.memory
                locks.pop(lock, None)  # bumped: a second booking there waits for a pass

    async def _sync_instances(self, state: ClusterState) -> set[str] | None:
        """Create missing instances `APP-INDEX`, each with its overlay IP claimed in the same
        transaction, and retire surplus and orphaned ones. The IPs known taken (None if
        nothing needed them)."""
        items: list[Change] = []
        taken: set[str] | None = None
        by_app: dict[str, set[int]] = {}
        for inst in state.instances.values():
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
            items.append(([Guard(inst.key, inst.mod_revision)], [Op(inst.key, i)]))
            self.events.emit("instance", i.namespace, i.name, i.app, f"terminating: {why}")
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
                if taken is None:
                    taken = await self._taken_ips()
                guards, ops = self._ip_change(new, spec, taken)
                items.append(([Guard(key, 0), *guards], [Op(key, new), *ops]))
                self.events.emit("instance", new.namespace, new.name, new.app,
                                 f"created with IP {new.ip}" if new.ip else "created")
        await self._commit(items)
        return taken

    async def _taken_ips(self) -> set[str]:
        return {k.rsplit("/", 1)[-1] for k in await self.store.keys_under(self.keys.ips())}

    def _ip_change(self, inst: Instance, spec: AppSpec, taken: set[str]) -> Change:
        """Give `inst` the overlay IP it should have: its fixed one (`network.ip`), the one
        it holds, or a free one. The claim (create-if-absent) and the release of an IP it
        gives up; if it can get none, the reason goes to `inst.reason`."""
        ip, why = ipam.choose(self.net, spec.network.fixed_ip(inst.index), inst.ip, taken)
        if why:
            inst.reason = f"waiting for an overlay IP: {why}"
            return [], []
        if inst.reason.startswith("waiting for an overlay IP"):
            inst.reason = ""
        if ip == inst.ip:
            return [], []
        taken.add(ip)
        guards, ops = [Guard(self.keys.ip(ip), 0)], [Op(self.keys.ip(ip), Owner(inst.key))]
        if inst.ip and not self.net.usable(inst.ip):
            ops.append(Op(self.keys.ip(inst.ip), delete=True))
        inst.ip = ip
        return guards, ops

    async def _claim_ips(self, state: ClusterState, taken: set[str] | None) -> None:
        """Instances without the overlay IP they should have (a fixed IP that was held, or
        changed in the spec) claim it; each claim is guarded by the instance's revision."""
        items: list[Change] = []
        for v in state.instances.values():
            inst = v.value
            app = state.apps.get(f"{inst.namespace}/{inst.app}")
            if app is None or inst.state == TERMINATING:
                continue
            fixed = app.value.spec.network.fixed_ip(inst.index)
            if inst.ip and (fixed or inst.ip) == inst.ip and not self.net.usable(inst.ip):
                continue
            if taken is None:
                taken = await self._taken_ips()
            reason = inst.reason
            guards, ops = self._ip_change(inst, app.value.spec, taken)
            if ops or inst.reason != reason:
                inst.updated = now()
                items.append(([Guard(v.key, v.mod_revision), *guards], [Op(v.key, inst), *ops]))
        await self._commit(items)

    async def _schedule(self, state: ClusterState) -> None:
        """Place Pending instances and commit the placements (sigmad.scheduler.binder)."""
        result = await scheduler.schedule_pending(
            self.store, {key: rec.value.spec for key, rec in state.apps.items()}
        )
        for key, node in sorted(result.scheduled.items()):
            ns, name = key.split("/", 1)
            self.events.emit("instance", ns, name, name.rsplit("-", 1)[0], f"scheduled on {node}")
        for key, reason in sorted(result.pending.items()):
            ns, name = key.split("/", 1)
            self.events.emit("instance", ns, name, name.rsplit("-", 1)[0], f"Pending: {reason}",
                             warning=True)

    def _refresh_engines(self, state: ClusterState) -> None:
        for name, node in state.nodes.items():
            engine, new = self.engines.get(name, node.engine)
            if new:
                old = self.listeners.pop(name, None)
                if old is not None:
                    old.cancel()
                self.listeners[name] = asyncio.create_task(self._listen(name, engine))

    async def _listen(self, name: str, engine: Engine) -> None:
        """Wake a pass as soon as a sigma container on `name` changes state."""
        delay = 1.0
        while True:
            try:
                async for event in engine.events({LABEL_INSTANCE: ""}):
                    delay = 1.0
                    if event.get("status") in ("die", "oom", "destroy", "stop", "start"):
                        attributes = (event.get("Actor") or {}).get("Attributes") or {}
                        self.dirty.add(attributes.get(LABEL_INSTANCE, ""))
                        self.wake.set()
            except EngineError as exc:
                log.debug("node %s: %s", name, exc.message)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _sweep_orphans(self, state: ClusterState) -> None:
        """Remove sigma containers on Ready nodes that no instance record places there."""
        wanted = {(i.value.key, node) for i in state.instances.values()
                  for node in (i.value.node, i.value.next_node) if node}
        for name in sorted(state.ready & set(state.nodes)):
            engine, _ = self.engines.get(name, state.nodes[name].engine)
            try:
                found = await engine.find({LABEL_INSTANCE: ""})
            except EngineError as exc:
                log.warning("node %s: cannot list containers: %s", name, exc.message)
                continue
            for c in found:
                owner = c.labels.get(LABEL_INSTANCE, "")
                if (owner, name) in wanted or owner in self.workers:
                    continue
                log.info("node %s: removing orphan container %s of %s", name, c.name, owner)
                await engine.remove(c.id)

    async def _drive(self, record_key: str, hold: str, node_ready: bool) -> None:
        """One step of one instance (etcd key `record_key`) toward its desired state."""
        rec = await self.store.get(record_key, Instance)
        if rec is None:
            return
        inst = rec.value
        node = await self.store.get(self.keys.node(inst.node), Node) if inst.node else None
        app = await self.store.get(self.keys.app(inst.namespace, inst.app), AppRecord)
        engine = self.engines.get(inst.node, node.value.engine)[0] if node else None

        def report(message: str, warning: bool) -> None:
            log.info("%s: %s", inst.key, message)
            self.events.emit("instance", inst.namespace, inst.name, inst.app, message, warning)

        if inst.state == TERMINATING:
            if not node_ready:
                # Its node is gone: the record goes now; the node's containers are removed as
                # orphans when it comes back (the sweep finds no record for them).
                engine = None
            await self._terminate(rec, engine, app.value if app else None, report)
            return
        if engine is None or node is None or app is None:
            return  # no node to run on yet, or the next pass marks it Terminating
        if inst.next_node:
            target = await self.store.get(self.keys.node(inst.next_node), Node)
            if target is not None:
                new = self.engines.get(inst.next_node, target.value.engine)[0]
                await moves.move_step(self.store, rec, app.value, engine, new,
                                      target.value.address, report, self._again)
            return
        before = _fingerprint(inst)
        state = inst.state
        try:
            await Runner(engine, inst, app.value, node.value.address, report).step(hold)
        except EngineError as exc:
            inst.reason = f"engine: {exc.message}"
        if inst.state != state:
            report(f"{state} → {inst.state}" + (f": {inst.reason}" if inst.reason else ""),
                   inst.state in ("Failed", "FailedToStart"))
        if _fingerprint(inst) != before:
            inst.updated = now()
            if not await self.store.update(rec.key, inst, rec.mod_revision):
                log.info("%s: record changed meanwhile; next pass retries", inst.key)
                self.dirty.add(inst.key)
        self._revisit(inst, hold)

    def _again(self) -> None:
        """Ask for a pass soon (a step in progress, e.g. a live move's readiness probes)."""
        asyncio.get_running_loop().call_later(STEP_AGAIN, self.wake.set)

    def _revisit(self, inst: Instance, hold: str) -> None:
        """Ask for a pass when this instance needs another step: when its restart back-off
        ends, or soon while it starts (readiness probes). Other changes arrive as etcd or
        engine events."""
        if inst.state == RUNNING or (hold and not inst.containers):
            return
        delay = max(inst.next_start - now(), 0.0) or STEP_AGAIN
        if inst.state in (STARTING, SCHEDULED, FAILED_TO_START) or inst.next_start:
            asyncio.get_running_loop().call_later(delay, self.wake.set)

    async def _terminate(self, rec: Versioned[Instance], engine: Engine | None,
                         app: AppRecord | None, report: Runner.Report) -> None:
        inst = rec.value
        if engine is not None and app is not None:
            found = await engine.find({LABEL_INSTANCE: inst.key})
            await Runner(engine, inst, app, "", report).remove_all(found, inst.reason)
        elif engine is not None:
            for c in await engine.find({LABEL_INSTANCE: inst.key}):
                await engine.remove(c.id)
        ops = [Op(rec.key, delete=True),
               *migration.port_releases(self.keys, inst.node, inst.host_ports)]
        if inst.ip:
            owner = await self.store.get(self.keys.ip(inst.ip), Owner)
            if owner is not None and owner.value.owner == inst.key:
                ops.append(Op(self.keys.ip(inst.ip), delete=True))
        if await self.store.commit([Guard(rec.key, rec.mod_revision)], ops):
            report(f"gone ({inst.reason})", False)


def _fingerprint(inst: Instance) -> tuple[object, ...]:
    return (
        inst.state, inst.reason, inst.ip, inst.restarts, inst.next_start, inst.generation,
        [(c.id, c.state, c.exit_code, c.ready) for c in inst.containers],
        len(inst.terminations),
    )
