"""The HTTP API under /v1 (docs/api.md): a thin adapter. JSON in and out, bearer tokens with
roles, per-token caps and an audit of every change (sigmad.api.auth), errors with field
paths (one exception tree, mapped here at the edge). Reads are answered
from the state cache (sigmad.api.views), writes go through sigmad.api.apps.

Bad input is a 4xx, never a 500: a body is at most MAX_BODY bytes of UTF-8, and it is
decoded and parsed on a thread of PARSERS (`Api.parsed`), never on a serving loop, by
parsers bounded in cost (sigmad.spec); names in paths are checked before use.

The API may be served from a thread of its own (sigmad.master): a leader's loop busy with a
burst then never delays a read. Reads only read the cache; everything that talks to etcd or
an engine, or writes to the cache, runs on the cache's own loop (`on_main`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry

from sigmad import __version__, backup, events, records, spec
from sigmad import metrics as prom
from sigmad.api import logs, sse, terminals, views
from sigmad.api.apps import AppWrites, ResourceChange, with_resources
from sigmad.api.audit import AuditLog
from sigmad.api.auth import AUDIT_APPS, DEFAULT_CAPS, GATE, Gate, TokenApi, TokenCaps, caller
from sigmad.api.configs import ConfigApi
from sigmad.api.console import ConsoleApi, Feed
from sigmad.api.serving import Limits, read_body
from sigmad.engine import EnginePool
from sigmad.errors import NotFound, SigmaError, SpecError, StoreUnavailable
from sigmad.events import Event
from sigmad.leader import LeaderRecord
from sigmad.metrics import Metrics
from sigmad.models import Instance, split_name
from sigmad.spec import Fields, quantity
from sigmad.state.cache import Cache
from sigmad.store import Store, Versioned
from sigmad.tokens import check_namespaces
from sigmad.units import parse_cpu, parse_size

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY = 1 << 20
PARSERS = 2  # threads that decode and parse request bodies
T = TypeVar("T")
STALE_AFTER = 1.0  # seconds without etcd after which reads are refused, not served stale
EVENT_BACKLOG = 10_000  # events queued for one watching client
READY_TIMEOUT = 2.0  # seconds /readyz waits for etcd


def _json(data: Any, status: int = 200, revision: int = 0) -> web.Response:
    headers = {"X-Sigma-Revision": str(revision)} if revision else None
    return web.json_response(records.to_dict(data), status=status, headers=headers)


OnMain = Callable[[Coroutine[Any, Any, T]], Awaitable[T]]


async def _here(coro: Coroutine[Any, Any, T]) -> T:
    return await coro


def make_app(store: Store, cache: Cache, token: str, engines: EnginePool | None = None,
             on_main: OnMain[Any] = _here, limits: Limits | None = None,
             metrics: Metrics | None = None, caps: TokenCaps = DEFAULT_CAPS,
             audit_log: str = "", master_id: str = "") -> web.Application:
    """The aiohttp application serving the API from `cache`, writing to `store`;
    `on_main(coro)` runs `coro` on the loop that owns the cache and the store (by default
    the one that serves). `limits` bound bodies and event streams (sigmad.api.serving);
    `metrics` counts what they bound. `token` is the bootstrap admin token; `caps` bound
    each token's calls; `audit_log` is a JSON-lines file that gets every audit entry
    (sigmad.api.audit). `master_id` is this master's (/readyz and /metrics say whether it
    leads)."""
    audit = AuditLog(store, audit_log, on_main)
    gate = Gate(cache, token, audit, caps)

    async def fresh(request: web.Request, handler: Handler) -> web.StreamResponse:
        if cache.stale_for() > STALE_AFTER:
            raise StoreUnavailable(
                f"etcd is unreachable (for {cache.stale_for():.0f}s): this master's "
                f"view stopped at revision {cache.revision}; try again, or another master")
        return await handler(request)

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if request.path.startswith("/v1/") or request.path == "/metrics":
                return await gate.guard(request, lambda r: fresh(r, handler))
            return await handler(request)
        except SigmaError as exc:
            return web.json_response(exc.to_dict(), status=exc.status)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = "not_found" if exc.status == 404 else "http"
            field = "body" if exc.status == 413 else None  # too large
            body = {"error": {"code": code, "message": exc.reason, "field": field}}
            return web.json_response(body, status=exc.status)

    pool = engines or EnginePool(store.keys.prefix)
    limits = limits or Limits()
    metrics = metrics or Metrics()
    api = Api(store, cache, AppWrites(store, cache, pool), on_main, limits, metrics)
    api.master_id = master_id
    api.registry = prom.registry(metrics, functools.partial(prom.cluster_figures, cache,
                                                            master_id), prom.queue_figures)
    app = web.Application(middlewares=[errors, read_body(limits, metrics)],
                          client_max_size=MAX_BODY)
    app[GATE] = gate

    async def close_engines(_: web.Application) -> None:
        await on_main(pool.close())
        audit.close()

    async def stop_parsers(_: web.Application) -> None:
        api.parsers.shutdown(wait=False, cancel_futures=True)

    app.on_cleanup.append(close_engines)
    app.on_cleanup.append(stop_parsers)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/metrics", api.metrics_text)
    app.router.add_get("/v1/nodes", api.list_nodes)
    app.router.add_get("/v1/nodes/{name}", api.get_node)
    app.router.add_post("/v1/nodes/{name}/drain", api.drain)
    app.router.add_post("/v1/nodes/{name}/uncordon", api.uncordon)
    app.router.add_get("/v1/apps", api.list_apps)
    app.router.add_put("/v1/apps", api.apply)
    app.router.add_get("/v1/apps/{ns}/{app}", api.get_app)
    app.router.add_delete("/v1/apps/{ns}/{app}", api.delete_app)
    app.router.add_post("/v1/apps/{ns}/{app}/resources", api.update_resources)
    app.router.add_get("/v1/apps/{ns}/{app}/rollout", api.rollout)
    app.router.add_post("/v1/apps/{ns}/{app}/release", api.release)
    app.router.add_post("/v1/apps/{ns}/{app}/undo", api.undo)
    app.router.add_post("/v1/apps/{ns}/{app}/rollout/{action}", api.rollout_action)
    app.router.add_get("/v1/instances", api.list_instances)
    app.router.add_get("/v1/events", api.events)
    app.router.add_get("/v1/pool", api.pool)
    app.router.add_get("/v1/usage", api.usage)
    app.router.add_get("/v1/ssds", api.list_ssds)
    app.router.add_post("/v1/ssds/{node}/{id}/release", api.release_ssd)
    app.router.add_post("/v1/ssds/{node}/{id}/cordon", api.cordon_ssd)
    app.router.add_post("/v1/ssds/{node}/{id}/uncordon", api.uncordon_ssd)
    app.router.add_get("/v1/instances/{ns}/{name}", api.get_instance)
    app.router.add_post("/v1/instances/{ns}/{name}/migrate", api.migrate)
    app.router.add_get("/v1/masters", api.masters)
    app.router.add_get("/v1/backup", api.backup)
    app.router.add_get("/v1/instances/{ns}/{name}/logs", api.logs)
    app.router.add_post("/v1/instances/{ns}/{name}/exec", api.exec_)
    app.router.add_get("/v1/exec/{id}", api.terminal)
    TokenApi(store, cache, audit, on_main, api.body).add_routes(app.router)
    ConsoleApi(cache, gate, Feed(cache), api.body, api.console_events,
               limits.stream_heartbeat, metrics).add_routes(app)
    ConfigApi(store, cache, on_main, api.body).add_routes(app.router)
    return app


class Api:
    """Route handlers."""

    def __init__(self, store: Store, cache: Cache, writes: AppWrites,
                 on_main: OnMain[Any], limits: Limits, metrics: Metrics) -> None:
        self.store = store
        self.cache = cache
        self.keys = store.keys
        self.writes = writes
        self.main = on_main
        self.limits = limits
        self.metrics = metrics
        self.master_id = ""
        self.terminals = terminals.Terminals(limits.exec_idle)
        self.registry: CollectorRegistry | None = None
        self.encoded = views.Encoded()
        self.parsers = ThreadPoolExecutor(PARSERS, thread_name_prefix="api-parse")

    async def parsed(self, request: web.Request, parse: Callable[[str], T]) -> T:
        """`parse` of the request's body (UTF-8, at most MAX_BODY bytes: 413 beyond), run on
        a parser thread so a big or hostile body never holds up this loop."""
        raw = await request.read()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.parsers, _decoded_then, parse, raw)

    async def body(self, request: web.Request) -> dict[str, Any]:
        """The request's body as a JSON object (SpecError if it is not one)."""
        return await self.parsed(request, _json_object)

    async def backup(self, request: web.Request) -> web.Response:
        """Every key under the prefix at one revision (sigmad.backup): admin only."""
        taken = await self.main(backup.take(self.store))
        return web.Response(body=backup.encode(taken), content_type="application/json",
                            headers={"X-Sigma-Revision": str(taken.revision)})

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"ok": True, "version": __version__})

    async def list_nodes(self, request: web.Request) -> web.Response:
        return _json({"items": views.nodes(self.cache)}, revision=self.cache.revision)

    async def get_node(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        node = self.cache.node(name)
        if node is None:
            raise NotFound(f"node {name} not found")
        return _json(views.node_view(self.cache, node), revision=self.cache.revision)

    async def drain(self, request: web.Request) -> web.Response:
        """Mark a node Draining: nothing new lands there, and its instances move off one at a
        time, each new copy ready before the old one stops."""
        node = await self.main(self.writes.set_draining(request.match_info["name"], True))
        return _json(views.node_view(self.cache, node))

    async def uncordon(self, request: web.Request) -> web.Response:
        """Undo drain: the node takes new instances again."""
        node = await self.main(self.writes.set_draining(request.match_info["name"],
                                                        False))
        return _json(views.node_view(self.cache, node))

    async def list_apps(self, request: web.Request) -> web.Response:
        namespace = request.query.get("namespace", "")
        return _json({"items": views.apps(self.cache, namespace)}, revision=self.cache.revision)

    async def get_app(self, request: web.Request) -> web.Response:
        v = self.writes.app(request.match_info["ns"], request.match_info["app"])
        return _json(views.app_view(self.cache, v.value), revision=self.cache.revision)

    async def rollout(self, request: web.Request) -> web.Response:
        """The app's kept revisions, its current one and its rollout record with the
        progress of its instances (`sigmactl rollout history|status`)."""
        found = await self.main(self.writes.history(request.match_info["ns"],
                                                    request.match_info["app"]))
        return _json(found)

    async def rollout_action(self, request: web.Request) -> web.Response:
        """Pause, resume or promote the app's rollout (no body)."""
        record = await self.main(self.writes.rollout_action(
            request.match_info["ns"], request.match_info["app"], request.match_info["action"]))
        return _json(record)

    async def release(self, request: web.Request) -> web.Response:
        """A new image for one of the app's containers (body: image, container)."""
        body = await self.body(request)
        _only(body, "image", "container")
        result = await self.main(self.writes.release(
            request.match_info["ns"], request.match_info["app"], body.get("image"),
            body.get("container")))
        return _json(result.to_dict())

    async def undo(self, request: web.Request) -> web.Response:
        """Back to a kept revision (body: to; default the one before the current)."""
        body = await self.body(request)
        _only(body, "to")
        result = await self.main(self.writes.undo(
            request.match_info["ns"], request.match_info["app"], body.get("to")))
        return _json(result.to_dict())

    async def apply(self, request: web.Request) -> web.Response:
        """Create or update every app in the body, all-or-nothing after validation.

        A change of resources only (and replicas) is applied to running containers in place;
        any other change is a new template generation (a replace)."""
        specs = await self.parsed(request, spec.parse)
        request[AUDIT_APPS] = [f"{s.namespace}/{s.app}" for s in specs]
        check_namespaces(caller(request), {s.namespace for s in specs})
        results = await self.main(self.writes.apply(specs, _flag(request, "dry_run"),
                                                    _flag(request, "force")))
        return _json({"items": [r.to_dict() for r in results]})

    async def update_resources(self, request: web.Request) -> web.Response:
        """Change an app's limits/requests; its running containers take them in place."""
        ns, name = request.match_info["ns"], request.match_info["app"]
        current = self.writes.app(ns, name)
        body = await self.body(request)
        new = with_resources(current.value.spec, _change(body))
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise SpecError("force", "must be true or false")
        result = await self.main(self.writes.resize(ns, name, new, force))
        return _json(result.to_dict())

    async def delete_app(self, request: web.Request) -> web.Response:
        result = await self.main(self.writes.delete(request.match_info["ns"],
                                                    request.match_info["app"]))
        return _json(result.to_dict(), status=202)

    async def list_instances(self, request: web.Request) -> web.StreamResponse:
        found = views.instances(self.cache, request.query.get("namespace", ""),
                                request.query.get("app", ""))
        response = web.StreamResponse(headers={
            "Content-Type": "application/json; charset=utf-8",
            "X-Sigma-Revision": str(self.cache.revision)})
        await response.prepare(request)
        async for part in views.stream_items(found, self.encoded):
            await response.write(part)
        await response.write_eof()
        self.encoded.prune(self.cache)
        return response

    def _instance(self, request: web.Request) -> Versioned[Instance]:
        ns, name = request.match_info["ns"], request.match_info["name"]
        parts = split_name(name)
        if parts is None:
            raise SpecError("name", f"{spec.shown(name)} is not an instance name (APP-INDEX)")
        v = self.cache.instance(self.keys.instance(ns, *parts))
        if v is None:
            raise NotFound(f"instance {ns}/{name} not found")
        return v

    async def get_instance(self, request: web.Request) -> web.Response:
        return web.Response(body=views.instance_json(self._instance(request)),
                            content_type="application/json",
                            headers={"X-Sigma-Revision": str(self.cache.revision)})

    async def migrate(self, request: web.Request) -> web.Response:
        """Move a NeedMigration instance (its node is lost) to a node that fits, or to the
        node `to`; it keeps its name, IP and request."""
        v = self._instance(request)
        to = (await self.body(request)).get("to") or ""
        if not isinstance(to, str):
            raise SpecError("to", "must be a node name")
        return _json(views.instance_view(await self.main(self.writes.migrate(v, to))))

    async def events(self, request: web.Request) -> web.StreamResponse:
        """The newest events (`?limit=`, default 100, at most events.MAX_LIMIT; `?since=R`:
        only those written after store revision R), oldest first, read by range
        (sigmad.events.recent); or with `?watch=true` a server-sent event stream of them
        followed by every new one, with heartbeats while idle (sigmad.api.sse)."""
        match = _event_filter(request)
        limit = _whole(request, "limit", 100, events.MAX_LIMIT)
        since = _whole(request, "since", 0, 2**63 - 1)
        found = await self.main(events.recent(self.store, limit, match, since))
        if not _flag(request, "watch"):
            return _json({"items": found.items, "revision": found.revision,
                          "more": found.more}, revision=found.revision)
        stream = sse.Stream(EVENT_BACKLOG)
        following = self.follow_events(stream, match, found.revision)
        try:
            return await stream.serve(
                request, [sse.message(records.dumps(e)) for e in found.items],
                self.limits.stream_heartbeat, self.metrics)
        finally:
            following.cancel()

    def follow_events(self, stream: sse.Stream, match: Callable[[Event], bool], revision: int,
                      wrap: Callable[[bytes], bytes] = bytes) -> asyncio.Future[None]:
        """Hand `wrap(event JSON)` of each event written after `revision` that matches to
        `stream` (from the store's loop), until the returned future is cancelled; end the
        stream if the watch ends."""
        metrics = self.metrics

        async def follow() -> None:
            metrics.api_watches_open += 1
            try:
                async for change in self.store.watch(self.keys.events(), revision + 1):
                    if change.value is None:
                        continue
                    event = events.decode(change.value)
                    if event is not None and match(event):
                        stream.offer(wrap(change.value))
            finally:
                metrics.api_watches_open -= 1

        def ended(done: asyncio.Future[None]) -> None:
            if not done.cancelled():
                why = done.exception() or "the watch ended"
                stream.end(f"the event watch ended ({why}): reconnect to go on watching")

        following = asyncio.ensure_future(self.main(follow()))
        following.add_done_callback(ended)
        return following

    async def console_events(self, stream: sse.Stream, limit: int
                             ) -> tuple[list[bytes], asyncio.Future[None]]:
        """For a console's stream: the newest `limit` events as its messages, and the
        future that follows the new ones (`follow_events`)."""
        found = await self.main(events.recent(self.store, limit, _every_event, 0))
        following = self.follow_events(stream, _every_event, found.revision, console_event)
        return [sse.message(console_event(records.dumps(e))) for e in found.items], following

    async def metrics_text(self, request: web.Request) -> web.Response:
        """This master's metrics in Prometheus' text format (sigmad.metrics), for any
        token."""
        assert self.registry is not None
        return web.Response(body=prom.render(self.registry),
                            headers={"Content-Type": prom.CONTENT_TYPE})

    async def exec_(self, request: web.Request) -> web.Response:
        """Run a command in an instance's container (operators of its namespace; audited):
        its exit code and output (sigmad.api.logs.Exec). With `stdin` and `tty`, a terminal
        session instead (201): its id and path, to open as a WebSocket
        (sigmad.api.terminals) within `expires_in` seconds, with the same token."""
        v = self._instance(request)
        run = logs.Exec.of(await self.body(request), v.value)
        engine, cid = logs.target(self.cache, self.writes.engines, v.value, run.container)
        if not run.terminal:
            code, output = await self.main(engine.run(cid, run.command, run.timeout))
            return _json({"exit_code": code, "output": output.decode(errors="replace")})
        marker = terminals.new_marker()
        exec_id = await self.main(engine.exec_create(
            cid, run.command, [f"{terminals.MARKER}={marker}"]))
        sid = self.terminals.add(caller(request).id, f"{v.value.key} {run.container}", engine,
                                 cid, exec_id, marker)
        return _json({"session": sid, "path": f"/v1/exec/{sid}",
                      "expires_in": self.terminals.open_within}, status=201)

    async def terminal(self, request: web.Request) -> web.StreamResponse:
        """A terminal session made by POST .../exec (with the token that made it), as a
        WebSocket relaying its terminal (sigmad.api.terminals)."""
        ws = web.WebSocketResponse(max_msg_size=terminals.MAX_MESSAGE)
        if not ws.can_prepare(request).ok:
            raise SpecError("Upgrade", "GET /v1/exec/{id} is a WebSocket: connect with "
                            "'Upgrade: websocket' (sigmactl exec -it does)")
        session = self.terminals.take(request.match_info["id"], caller(request).id)
        await ws.prepare(request)
        self.metrics.api_streams_open += 1
        try:
            await terminals.relay(ws, session, self.main, self.terminals.idle)
        finally:
            self.metrics.api_streams_open -= 1
            self.metrics.api_streams_closed += 1
        return ws

    async def readyz(self, request: web.Request) -> web.Response:
        """200 when etcd answers this master (a read of the leader key, on the main loop,
        within READY_TIMEOUT), with whether this master leads; 503 otherwise. No token: a
        probe's."""
        try:
            leader = await asyncio.wait_for(
                self.main(self.store.get(self.keys.leader(), LeaderRecord)), READY_TIMEOUT)
        except (SigmaError, TimeoutError) as exc:
            why = exc.message if isinstance(exc, SigmaError) else \
                f"no answer in {READY_TIMEOUT:g}s"
            return web.json_response({"ready": False, "etcd": why, "leader": False},
                                     status=503)
        holder = leader.value.id if leader is not None else ""
        return web.json_response({"ready": True, "etcd": "ok", "id": self.master_id,
                                  "leader": bool(holder) and holder == self.master_id,
                                  "leader_id": holder})

    async def logs(self, request: web.Request) -> web.StreamResponse:
        """A container's output, through its node's engine (sigmad.api.logs): the last
        `tail` lines, then with `follow` what it writes next (chunked); with `previous`
        the last lines kept with its last termination (the container may be gone)."""
        v = self._instance(request)
        query = logs.Query.of(request, v.value)
        if query.previous:
            return web.Response(text=logs.previous(v.value, query.container),
                                content_type="text/plain")
        engine, cid = logs.target(self.cache, self.writes.engines, v.value, query.container)
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        if not query.follow:
            data = await self.main(logs.read(engine, cid, query.tail))
            await response.prepare(request)
            await response.write(data)
            await response.write_eof()
            return response
        self.metrics.api_streams_open += 1
        try:
            await logs.relay(request, response, self.main, engine, cid, query.tail)
        finally:
            self.metrics.api_streams_open -= 1
            self.metrics.api_streams_closed += 1
        return response

    async def list_ssds(self, request: web.Request) -> web.Response:
        """Every node's SSDs with their state and claim (sigmad.api.views.ssds)."""
        return _json({"items": views.ssds(self.cache)}, revision=self.cache.revision)

    async def release_ssd(self, request: web.Request) -> web.Response:
        """Give up a retained disk's claim: its agent wipes it, then it is free."""
        node, disk = request.match_info["node"], request.match_info["id"]
        owner = await self.main(self.writes.release_ssd(node, disk))
        return _json({"node": node, "id": disk, "released": owner})

    async def cordon_ssd(self, request: web.Request) -> web.Response:
        """Keep a disk out of scheduling (claimed for no instance)."""
        node, disk = request.match_info["node"], request.match_info["id"]
        await self.main(self.writes.cordon_ssd(node, disk))
        return _json({"node": node, "id": disk, "cordoned": True})

    async def uncordon_ssd(self, request: web.Request) -> web.Response:
        """Give a cordoned or broken disk back: its agent formats it afresh."""
        node, disk = request.match_info["node"], request.match_info["id"]
        done = await self.main(self.writes.uncordon_ssd(node, disk))
        return _json({"node": node, "id": disk, "uncordoned": done})

    async def pool(self, request: web.Request) -> web.Response:
        """The pool as one server (sigmad.api.views.pool)."""
        return _json(views.pool(self.cache), revision=self.cache.revision)

    async def usage(self, request: web.Request) -> web.Response:
        """Every node's latest usage sample (sigmad.api.views.usage)."""
        return _json({"items": views.usage(self.cache)}, revision=self.cache.revision)

    async def masters(self, request: web.Request) -> web.Response:
        """The leader record and every running master with its role (sigmad.leader)."""
        return _json(views.masters(self.cache), revision=self.cache.revision)


def _every_event(event: Event) -> bool:
    return True


def console_event(data: bytes) -> bytes:
    """An event's JSON as a console message."""
    return b'{"type":"event","event":' + data + b"}"


def _event_filter(request: web.Request) -> Callable[[Event], bool]:
    namespace, app, kind = (request.query.get(k, "") for k in ("namespace", "app", "kind"))

    def match(e: Event) -> bool:
        return ((not namespace or e.namespace == namespace) and (not app or e.app == app)
                and (not kind or e.kind == kind))

    return match


def _whole(request: web.Request, name: str, default: int, most: int) -> int:
    """The query parameter `name`: a whole number from 0 to `most` (`default` if absent)."""
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19 or int(raw) > most:
        raise SpecError(name, f"must be a whole number from 0 to {most}")
    return int(raw)


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("1", "true", "yes")


def _decoded_then(parse: Callable[[str], T], raw: bytes) -> T:
    """`parse` of `raw` decoded as UTF-8 (SpecError naming the first bad byte)."""
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise SpecError("body", f"is not UTF-8 text (byte {raw[exc.start]:#04x} at "
                        f"offset {exc.start})") from None
    return parse(text)


def _only(body: dict[str, Any], *known: str) -> None:
    """SpecError naming the first field of `body` not in `known`."""
    for key in body:
        if key not in known:
            raise SpecError(str(key), f"unknown field (known: {', '.join(known)})")


def _json_object(text: str) -> dict[str, Any]:
    """A JSON object from `text` (SpecError if it is not one, however it fails)."""
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        raise SpecError("body", "must be a JSON object") from None
    if not isinstance(body, dict):
        raise SpecError("body", "must be a JSON object")
    return body


def _change(body: dict[str, Any]) -> ResourceChange:
    """A resize Change from `{"container", "limit": {"cpu", "memory"}, "request": {...}}`."""
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
    return ResourceChange(container, **values)

