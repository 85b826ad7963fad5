"""The HTTP API under /v1 (docs/api.md): JSON, bearer-token auth, errors with field paths."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from aiohttp import web

from sigmad import __version__, records, spec
from sigmad.errors import Conflict, NotFound, SigmaError, SpecError, Unauthorized
from sigmad.models import DRAINING, NOT_READY, READY, RUNNING, AppRecord, Instance, Node, now
from sigmad.store import Guard, Op, Store

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
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/v1/nodes", api.list_nodes)
    app.router.add_get("/v1/nodes/{name}", api.get_node)
    app.router.add_get("/v1/apps", api.list_apps)
    app.router.add_put("/v1/apps", api.apply)
    app.router.add_get("/v1/apps/{ns}/{app}", api.get_app)
    app.router.add_delete("/v1/apps/{ns}/{app}", api.delete_app)
    app.router.add_get("/v1/instances", api.list_instances)
    app.router.add_get("/v1/instances/{ns}/{name}", api.get_instance)
    return app


class Api:
    """Route handlers; every read goes to etcd, the source of truth."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.keys = store.keys

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"ok": True, "version": __version__})

    async def _instances(self, namespace: str = "", app: str = "") -> list[Instance]:
        prefix = self.keys.instances(namespace, app) if namespace else self.keys.instances()
        items, _ = await self.store.scan(prefix, Instance)
        result = [v.value for v in items if not app or v.value.app == app]
        return sorted(result, key=lambda i: (i.namespace, i.app, i.index))

    async def _node_views(self) -> list[dict[str, Any]]:
        nodes, _ = await self.store.scan(self.keys.nodes(), Node)
        beats = {k.rsplit("/", 1)[-1] for k in await self.store.keys_under(self.keys.heartbeats())}
        instances = await self._instances()
        views = []
        for v in sorted(nodes, key=lambda v: v.value.name):
            node = v.value
            mine = [i for i in instances if i.node == node.name]
            view = records.to_dict(node)
            view["status"] = DRAINING if node.draining else READY if node.name in beats \
                else NOT_READY
            view["requested"] = {
                "cpu_m": sum(i.request.cpu_m for i in mine),
                "memory": sum(i.request.memory for i in mine),
            }
            view["instances"] = len(mine)
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

    def _app_view(self, rec: AppRecord, instances: list[Instance]) -> dict[str, Any]:
        s = rec.spec
        mine = [i for i in instances if i.namespace == s.namespace and i.app == s.app]
        return {
            "namespace": s.namespace, "app": s.app, "generation": rec.generation,
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
        """Create or update every app in the body, all-or-nothing after validation."""
        text = await request.text()
        specs = spec.parse(text)
        dry_run = request.query.get("dry_run", "").lower() in ("1", "true", "yes")
        results, guards, ops = [], [], []
        for s in specs:
            key = self.keys.app(s.namespace, s.app)
            current = await self.store.get(key, AppRecord)
            if current is None:
                action, rec = "created", AppRecord(s, 1, 1, now(), now())
                guards.append(Guard(key, 0))
            elif records.to_dict(current.value.spec) == records.to_dict(s):
                action, rec = "unchanged", current.value
            else:
                old = current.value
                template = old.template_generation
                if records.to_dict(replace(old.spec, replicas=0)) != records.to_dict(
                    replace(s, replicas=0)
                ):
                    template = old.generation + 1
                action = "updated"
                rec = AppRecord(s, old.generation + 1, template, old.created, now())
                guards.append(Guard(key, current.mod_revision))
            if action != "unchanged":
                ops.append(Op(key, rec))
            results.append({"app": s.key, "action": action, "generation": rec.generation})
        if ops and not dry_run and not await self.store.commit(guards, ops):
            raise Conflict("another client changed these apps meanwhile: apply again")
        for r in results:
            log.info("apply %s: %s (generation %d)%s", r["app"], r["action"], r["generation"],
                     " (dry run)" if dry_run else "")
        return _json({"items": results})

    async def delete_app(self, request: web.Request) -> web.Response:
        ns, name = request.match_info["ns"], request.match_info["app"]
        rec = await self.store.get(self.keys.app(ns, name), AppRecord)
        if rec is None:
            raise NotFound(f"app {ns}/{name} not found")
        await self.store.delete(rec.key)
        log.info("delete app %s/%s", ns, name)
        return _json({"app": f"{ns}/{name}", "action": "deleted"}, status=202)

    async def list_instances(self, request: web.Request) -> web.Response:
        namespace = request.query.get("namespace", "")
        app = request.query.get("app", "")
        return _json({"items": [_instance_view(i) for i in await self._instances(namespace, app)]})

    async def get_instance(self, request: web.Request) -> web.Response:
        ns, name = request.match_info["ns"], request.match_info["name"]
        app, _, index = name.rpartition("-")
        if not app or not index.isdigit():
            raise SpecError("name", f"{name!r} is not an instance name (APP-INDEX)")
        rec = await self.store.get(self.keys.instance(ns, app, int(index)), Instance)
        if rec is None:
            raise NotFound(f"instance {ns}/{name} not found")
        return _json(_instance_view(rec.value))


def _instance_view(inst: Instance) -> dict[str, Any]:
    view: dict[str, Any] = records.to_dict(inst)
    view["name"] = inst.name
    return view
