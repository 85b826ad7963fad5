"""The HTTP API under /v1 (docs/api.md): JSON, bearer-token auth, errors with field paths."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from aiohttp import web

from sigmad import __version__, records, resize, spec
from sigmad.engine import EnginePool
from sigmad.errors import Conflict, NotFound, SigmaError, SpecError, Unauthorized
from sigmad.events import Event
from sigmad.leader import LeaderRecord, MasterRecord, masters_view
from sigmad.migration import port_releases
from sigmad.models import (
    DRAINING,
    NEED_MIGRATION,
    NOT_READY,
    READY,
    RUNNING,
    AppRecord,
    Instance,
    Node,
    now,
)
from sigmad.spec import AppSpec, Fields, Resources, quantity
from sigmad.store import Guard, Op, Store, Versioned
from sigmad.units import parse_cpu, parse_size

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY = 1 << 20


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(records.to_dict(data), status=status)


def make_app(store: Store, token: str) -> web.Application:
    """The aiohttp application serving the API against `store`."""

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if request.path.startswith("/v1/"):
                given = request.headers.get("Authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                    raise Unauthorized("missing or wrong bearer token")
            return await handler(request)
        except SigmaError as exc:
            return web.json_response(exc.to_dict(), status=exc.status)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = "not_found" if exc.status == 404 else "http"
            body = {"error": {"code": code, "message": exc.reason, "field": None}}
            return web.json_response(body, status=exc.status)

    api = Api(store)
    app = web.Application(middlewares=[errors], client_max_size=MAX_BODY)

    async def close_engines(_: web.Application) -> None:
        await api.engines.close()

    app.on_cleanup.append(close_engines)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/v1/nodes", api.list_nodes)
    app.router.add_get("/v1/nodes/{name}", api.get_node)
    app.router.add_post("/v1/nodes/{name}/drain", api.drain)
    app.router.add_post("/v1/nodes/{name}/uncordon", api.uncordon)
    app.router.add_get("/v1/apps", api.list_apps)
    app.router.add_put("/v1/apps", api.apply)
    app.router.add_get("/v1/apps/{ns}/{app}", api.get_app)
    app.router.add_delete("/v1/apps/{ns}/{app}", api.delete_app)
    app.router.add_post("/v1/apps/{ns}/{app}/resources", api.update_resources)
    app.router.add_get("/v1/instances", api.list_instances)
    app.router.add_get("/v1/events", api.events)
    app.router.add_get("/v1/pool", api.pool)
    app.router.add_get("/v1/instances/{ns}/{name}", api.get_instance)
    app.router.add_post("/v1/instances/{ns}/{name}/migrate", api.migrate)
    app.router.add_get("/v1/masters", api.masters)
    return app


class Api:
    """Route handlers; every read goes to etcd, the source of truth."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.keys = store.keys
        self.engines = EnginePool(store.keys.prefix)

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"ok": True, "version": __version__})

    async def _instances(self, namespace: str = "", app: str = "") -> list[Instance]:
        prefix = self.keys.instances(namespace, app) if namespace else self.keys.instances()
        items, _ = await self.store.scan(prefix, Instance)
        result = [v.value for v in items if not app or v.value.app == app]
        return sorted(result, key=lambda i: (i.namespace, i.app, i.index))

    async def _node_views(self, instances: list[Instance] | None = None) -> list[dict[str, Any]]:
        """Nodes with status, requests booked and instance counts (`instances` if already
        read)."""
        nodes, _ = await self.store.scan(self.keys.nodes(), Node)
        beats = {k.rsplit("/", 1)[-1] for k in await self.store.keys_under(self.keys.heartbeats())}
        by_node: dict[str, list[Resources]] = {}
        for inst in instances if instances is not None else await self._instances():
            by_node.setdefault(inst.node, []).append(inst.request)
        views = []
        for v in sorted(nodes, key=lambda v: v.value.name):
            node = v.value
            view = records.to_dict(node)
            view["status"] = DRAINING if node.draining else READY if node.name in beats \
                else NOT_READY
            view["requested"] = _sum(by_node.get(node.name, []))
            view["instances"] = len(by_node.get(node.name, []))
            views.append(view)
        return views

    async def list_nodes(self, request: web.Request) -> web.Response:
        return _json({"items": await self._node_views()})

    async def get_node(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        for view in await self._node_views():
            if view["name"] == name:
                return _json(view)
        raise NotFound(f"node {name} not found")

    async def _set_draining(self, request: web.Request, draining: bool) -> web.Response:
        name = request.match_info["name"]
        key = self.keys.node(name)
        for _ in range(5):  # the agent may rewrite its record meanwhile: CAS again
            rec = await self.store.get(key, Node)
            if rec is None:
                raise NotFound(f"node {name} not found: see 'sigmactl get nodes'")
            rec.value.draining = draining
            if await self.store.update(key, rec.value, rec.mod_revision):
                return await self.get_node(request)
        raise Conflict(f"node {name} kept changing: try again")

    async def drain(self, request: web.Request) -> web.Response:
        """Mark a node Draining: nothing new lands there, and its instances move off one at a
        time, each new copy ready before the old one stops."""
        return await self._set_draining(request, True)

    async def uncordon(self, request: web.Request) -> web.Response:
        """Undo drain: the node takes new instances again."""
        return await self._set_draining(request, False)

    def _app_view(self, rec: AppRecord, instances: list[Instance]) -> dict[str, Any]:
        s = rec.spec
        mine = [i for i in instances if i.namespace == s.namespace and i.app == s.app]
        return {
            "namespace": s.namespace, "app": s.app, "generation": rec.generation,
            "template_generation": rec.template_generation,
            "replicas": s.replicas, "running": sum(i.state == RUNNING for i in mine),
            "spec": records.to_dict(s), "created": rec.created, "updated": rec.updated,
        }

    async def list_apps(self, request: web.Request) -> web.Response:
        namespace = request.query.get("namespace", "")
        apps, _ = await self.store.scan(self.keys.apps(namespace or None), AppRecord)
        instances = await self._instances(namespace)
        items = sorted((v.value for v in apps), key=lambda r: r.spec.key)
        return _json({"items": [self._app_view(r, instances) for r in items]})

    async def get_app(self, request: web.Request) -> web.Response:
        ns, name = request.match_info["ns"], request.match_info["app"]
        rec = await self.store.get(self.keys.app(ns, name), AppRecord)
        if rec is None:
            raise NotFound(f"app {ns}/{name} not found")
        return _json(self._app_view(rec.value, await self._instances(ns, name)))

    async def apply(self, request: web.Request) -> web.Response:
        """Create or update every app in the body, all-or-nothing after validation.

        A change of resources only (and replicas) is applied to running containers in place
        (see sigmad.resize); any other change is a new template generation (a replace)."""
        specs = spec.parse(await request.text())
        dry_run = _flag(request, "dry_run")
        results, guards, ops, resizes = [], [], [], []
        for s in specs:
            key = self.keys.app(s.namespace, s.app)
            current = await self.store.get(key, AppRecord)
            if current is None:
                action, rec = "created", AppRecord(s, 1, 1, now(), now())
                guards.append(Guard(key, 0))
            elif records.to_dict(current.value.spec) == records.to_dict(s):
                action, rec = "unchanged", current.value
            elif _only_replicas(current.value.spec, s):
                old = current.value
                action = "updated"
                rec = AppRecord(s, old.generation + 1, old.template_generation, old.created, now())
                guards.append(Guard(key, current.mod_revision))
            elif resize.resources_only(current.value.spec, s):
                resizes.append(await resize.plan(self.store, self.engines, current, s,
                                                 _flag(request, "force")))
                old = current.value
                action = "resized in place"
                rec = AppRecord(s, old.generation + 1, old.template_generation, old.created, now())
            else:
                old = current.value
                action = "updated"
                rec = AppRecord(s, old.generation + 1, old.generation + 1, old.created, now())
                guards.append(Guard(key, current.mod_revision))
            if action in ("created", "updated"):
                ops.append(Op(key, rec))
            results.append({"app": s.key, "action": action, "generation": rec.generation})
        if not dry_run:
            if ops and not await self.store.commit(guards, ops):
                raise Conflict("another client changed these apps meanwhile: apply again")
            for plan in resizes:
                await resize.apply(self.store, self.engines, plan)
        for r in results:
            log.info("apply %s: %s (generation %d)%s", r["app"], r["action"], r["generation"],
                     " (dry run)" if dry_run else "")
        return _json({"items": results})

    async def update_resources(self, request: web.Request) -> web.Response:
        """Change an app's limits/requests on its running containers, in place."""
        ns, name = request.match_info["ns"], request.match_info["app"]
        current = await self.store.get(self.keys.app(ns, name), AppRecord)
        if current is None:
            raise NotFound(f"app {ns}/{name} not found")
        body = await _body(request)
        change = _change(body)
        new = resize.with_resources(current.value.spec, change)
        if records.to_dict(new) == records.to_dict(current.value.spec):
            return _json({"app": f"{ns}/{name}", "action": "unchanged",
                          "generation": current.value.generation})
        if not resize.resources_only(current.value.spec, new):
            raise SpecError("limit", "adding or removing a cap (0 = no cap) cannot be done in "
                            "place: change the spec and apply it to replace the containers")
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise SpecError("force", "must be true or false")
        plan = await resize.plan(self.store, self.engines, current, new, force)
        await resize.apply(self.store, self.engines, plan)
        return _json({"app": f"{ns}/{name}", "action": "resized in place",
                      "generation": current.value.generation + 1,
                      "containers": len(plan.updates)})

    async def delete_app(self, request: web.Request) -> web.Response:
        ns, name = request.match_info["ns"], request.match_info["app"]
        rec = await self.store.get(self.keys.app(ns, name), AppRecord)
        if rec is None:
            raise NotFound(f"app {ns}/{name} not found")
        await self.store.delete(rec.key)
        log.info("delete app %s/%s", ns, name)
        return _json({"app": f"{ns}/{name}", "action": "deleted"}, status=202)

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Recent events (`?limit=`, default 100), or with `?watch=true` a server-sent event
        stream of them followed by every new one."""
        match = _event_filter(request)
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            raise SpecError("limit", "must be a whole number") from None
        items, revision = await self.store.scan(self.keys.events(), Event)
        recent = [v.value for v in items if match(v.value)][-limit:] if limit > 0 else []
        if not _flag(request, "watch"):
            return _json({"items": recent})
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        })
        await response.prepare(request)
        for event in recent:
            await response.write(_sse(event))
        async for change in self.store.watch(self.keys.events(), revision + 1):
            if change.value is not None:
                event = records.loads(Event, change.value)
                if match(event):
                    await response.write(_sse(event))
        return response

    async def pool(self, request: web.Request) -> web.Response:
        """The pool as one server: allocatable, requested, free and limits committed, overall
        and per node label value (Ready nodes only)."""
        instances = await self._instances()
        nodes = [v for v in await self._node_views(instances) if v["status"] == READY]
        apps, _ = await self.store.scan(self.keys.apps(), AppRecord)
        limits = {v.value.spec.key: v.value.spec.limit() for v in apps}
        placed = [i for i in instances if i.node]
        by_node: dict[str, list[Instance]] = {}
        for inst in placed:
            by_node.setdefault(inst.node, []).append(inst)

        def summary(group: list[dict[str, Any]]) -> dict[str, Any]:
            mine = [i for n in group for i in by_node.get(n["name"], [])]
            lims = [limits.get(f"{i.namespace}/{i.app}", Resources()) for i in mine]
            total = _sum([records.from_dict(Resources, n["allocatable"]) for n in group])
            requested = _sum([i.request for i in mine])
            return {
                "nodes": len(group), "instances": len(mine), "allocatable": total,
                "requested": requested,
                "free": {k: total[k] - requested[k] for k in total},
                "limits": _sum(lims),
                "uncapped": {"cpu": sum(1 for r in lims if not r.cpu_m),
                             "memory": sum(1 for r in lims if not r.memory)},
            }

        by_label: dict[str, dict[str, Any]] = {}
        for key in sorted({k for n in nodes for k in n["labels"]}):
            values = sorted({n["labels"][key] for n in nodes if key in n["labels"]})
            by_label[key] = {
                value: summary([n for n in nodes if n["labels"].get(key) == value])
                for value in values
            }
        return _json({**summary(nodes), "by_label": by_label})

    async def list_instances(self, request: web.Request) -> web.Response:
        namespace = request.query.get("namespace", "")
        app = request.query.get("app", "")
        return _json({"items": [_instance_view(i) for i in await self._instances(namespace, app)]})

    async def _instance(self, request: web.Request) -> Versioned[Instance]:
        ns, name = request.match_info["ns"], request.match_info["name"]
        app, _, index = name.rpartition("-")
        if not app or not index.isdigit():
            raise SpecError("name", f"{name!r} is not an instance name (APP-INDEX)")
        rec = await self.store.get(self.keys.instance(ns, app, int(index)), Instance)
        if rec is None:
            raise NotFound(f"instance {ns}/{name} not found")
        return rec

    async def get_instance(self, request: web.Request) -> web.Response:
        return _json(_instance_view((await self._instance(request)).value))

    async def migrate(self, request: web.Request) -> web.Response:
        """Move a NeedMigration instance (its node is lost) to a node that fits, or to the
        node `to`; it keeps its name, IP and request."""
        rec = await self._instance(request)
        inst = rec.value
        to = (await _body(request)).get("to") or ""
        if not isinstance(to, str):
            raise SpecError("to", "must be a node name")
        if to and await self.store.get(self.keys.node(to), Node) is None:
            raise NotFound(f"node {to} not found: see 'sigmactl get nodes'")
        if inst.state != NEED_MIGRATION:
            raise Conflict(f"instance {inst.key} is {inst.state}, not NeedMigration: only an "
                           "instance whose node is lost is migrated")
        ops = [Op(rec.key, inst), *port_releases(self.keys, inst.node, inst.host_ports)]
        inst.unbind(f"migrating{' to ' + to if to else ''}: {inst.reason} (sigmactl migrate)")
        inst.target = to
        if not await self.store.commit([Guard(rec.key, rec.mod_revision)], ops):
            raise Conflict(f"instance {inst.key} changed meanwhile: try again")
        return _json(_instance_view(inst))

    async def masters(self, request: web.Request) -> web.Response:
        """The leader record and every running master with its role (sigmad.leader)."""
        leader = await self.store.get(self.keys.leader(), LeaderRecord)
        seen, _ = await self.store.scan(self.keys.masters(), MasterRecord)
        return _json(masters_view(leader.value if leader else None, [v.value for v in seen]))


def _event_filter(request: web.Request) -> Callable[[Event], bool]:
    namespace, app, kind = (request.query.get(k, "") for k in ("namespace", "app", "kind"))

    def match(e: Event) -> bool:
        return ((not namespace or e.namespace == namespace) and (not app or e.app == app)
                and (not kind or e.kind == kind))

    return match


def _sum(items: list[Resources]) -> dict[str, int]:
    return {"cpu_m": sum(r.cpu_m for r in items), "memory": sum(r.memory for r in items)}


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("1", "true", "yes")


def _only_replicas(old: AppSpec, new: AppSpec) -> bool:
    """Whether only what running containers do not depend on changed (replica count,
    migration policy): no container is replaced for it."""
    return records.to_dict(replace(old, replicas=0, migration="")) == \
        records.to_dict(replace(new, replicas=0, migration=""))


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise SpecError("", "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise SpecError("", "the body must be a JSON object")
    return body


def _change(body: dict[str, Any]) -> resize.Change:
    """A resize.Change from `{"container", "limit": {"cpu", "memory"}, "request": {...}}`."""
    fields = Fields("", body, "")
    container = fields.take("container")
    if container is not None and not isinstance(container, str):
        raise SpecError("container", "must be a container name")
    values: dict[str, int | None] = {}
    for part in ("limit", "request"):
        sub = Fields(part, fields.take(part) or {}, "")
        cpu, memory = sub.take("cpu"), sub.take("memory")
        sub.done()
        values[f"{part}_cpu"] = None if cpu is None else quantity(f"{part}.cpu", cpu, parse_cpu)
        values[f"{part}_memory"] = None if memory is None else quantity(
            f"{part}.memory", memory, parse_size)
    fields.take("force")
    fields.done()
    if all(v is None for v in values.values()):
        raise SpecError("limit", "nothing to change: give a limit or request (cpu or memory)")
    return resize.Change(container, **values)


def _sse(event: Event) -> bytes:
    return f"data: {json.dumps(records.to_dict(event))}\n\n".encode()


def _instance_view(inst: Instance) -> dict[str, Any]:
    view: dict[str, Any] = records.to_dict(inst)
    view["name"] = inst.name
    return view
