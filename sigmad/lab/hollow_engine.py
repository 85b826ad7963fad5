"""A hollow engine served over HTTP on a Unix socket: the Docker Engine API v1.41 paths that
sigma uses (and `docker` needs for ps/inspect/events), unversioned or under `/vX.Y/`.

One `EngineServer` per fake host; many share one process and event loop. It is built on
aiohttp's low-level server (no router, no middleware, no access log): a request costs the
HTTP parsing plus a dict lookup or two. Fault switches act like a real host:
- `freeze()`: requests are accepted but not answered (a SIGSTOPped dockerd); events queue up;
- `kill()`: power loss: every container is dead, the socket goes away, open connections
  (event streams too) are cut;
- `heal()`: answers again (after a kill: a fresh dockerd on the same state, containers exited).
`latency` (seconds) is added to the calls that change a container (create, start, stop, kill,
restart, remove), as the real ones take a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from sigmad.lab.hollow import API_VERSION, SERVER_VERSION, ApiError, Capacity, HollowEngine

log = logging.getLogger(__name__)
VERSIONED = re.compile(r"^/v\d+\.\d+(/.*)$")
HEADERS = {"Api-Version": API_VERSION, "Docker-Experimental": "false", "Ostype": "linux",
           "Server": f"Docker/{SERVER_VERSION} (linux)"}
JSON = "application/json"
SLOW = frozenset({"create", "start", "stop", "kill", "restart", "remove"})


def reply(data: Any, status: int = 200) -> web.Response:
    body = data if isinstance(data, bytes) else json.dumps(data).encode()
    return web.Response(body=body, status=status, content_type=JSON, headers=HEADERS)


def error(status: int, message: str) -> web.Response:
    return reply({"message": message}, status)


def empty(status: int) -> web.Response:
    return web.Response(status=status, headers=HEADERS)


def parse_filters(raw: str) -> dict[str, list[str]]:
    """Docker's `filters` query: {"label": ["a=b"]} or the old {"label": {"a=b": true}}."""
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise ApiError(400, f"invalid filter: {raw}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"invalid filter: {raw}")
    return {k: list(v) if isinstance(v, list | dict) else [str(v)] for k, v in data.items()}


def event_filter(filters: dict[str, list[str]]) -> Callable[[dict[str, Any]], bool] | None:
    """A predicate for `docker events --filter` (type, label, container, event); None: all."""
    types = filters.get("type")
    labels = [(f.partition("=")[0], f.partition("=")[2], "=" in f)
              for f in filters.get("label", [])]
    containers = filters.get("container", [])
    actions = filters.get("event", [])
    if not (types or labels or containers or actions):
        return None

    def match(event: dict[str, Any]) -> bool:
        if types and event["Type"] not in types:
            return False
        attributes = event["Actor"]["Attributes"]
        if labels and not all(k in attributes and (not has or attributes[k] == v)
                              for k, v, has in labels):
            return False
        if containers and event["id"] not in containers and \
                attributes.get("name") not in containers:
            return False
        return not actions or event["Action"].split(":")[0] in actions

    return match


class EngineServer:
    """One hollow engine and the Unix socket it answers on."""

    def __init__(self, path: Path, capacity: Capacity | None = None, latency: float = 0.0,
                 images: tuple[str, ...] = (), registry: set[str] | None = None) -> None:
        self.path = path
        self.latency = latency
        self.model = HollowEngine(capacity, emit=self._emit, defer=self._defer)
        self.model.registry = registry
        for ref in images:
            self.model.add_image(ref)
        self.subscribers: list[tuple[Callable[[dict[str, Any]], bool] | None,
                                     asyncio.Queue[bytes]]] = []
        self.thawed = asyncio.Event()
        self.thawed.set()
        self.dead = False
        self.requests = 0
        self._web: web.Server | None = None
        self._server: asyncio.AbstractServer | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    @property
    def frozen(self) -> bool:
        return not self.thawed.is_set()

    @property
    def answers(self) -> bool:
        """Whether a request would be answered now (not frozen, not dead)."""
        return self.thawed.is_set() and not self.dead

    def _defer(self, fn: Callable[[], None]) -> None:
        asyncio.get_running_loop().call_soon(fn)

    async def start(self) -> None:
        """Listen on the socket (a stale socket file is replaced)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._web = web.Server(self.handle, handler_cancellation=True, access_log=None)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self._web, str(self.path), backlog=512)
        self.dead = False

    async def close(self) -> None:
        """Stop listening and cut every connection (event streams end first: aiohttp's
        shutdown would cancel them mid-wait)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for _, queue in self.subscribers:
            queue.put_nowait(b"")
        await asyncio.sleep(0)
        if self._web is not None:
            await self._web.shutdown(0.1)
            self._web = None
        self.subscribers.clear()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def freeze(self) -> None:
        self.thawed.clear()

    async def kill(self) -> None:
        """Power loss: containers dead, socket gone, connections cut (requests held by a
        freeze are dropped)."""
        self.dead = True
        self.model.power_loss()
        self.thawed.set()
        await self.close()

    async def heal(self) -> None:
        """Answer again; after a kill, listen again (a restarted dockerd, same containers)."""
        self.thawed.set()
        if self.dead:
            await self.start()

    # -- events ----------------------------------------------------------------------------

    def _emit(self, event: dict[str, Any]) -> None:
        line = b""
        for match, queue in self.subscribers:
            if match is None or match(event):
                line = line or json.dumps(event).encode() + b"\n"
                queue.put_nowait(line)

    async def _events(self, request: web.BaseRequest) -> web.StreamResponse:
        match = event_filter(parse_filters(request.query.get("filters", "")))
        response = web.StreamResponse(status=200, headers={**HEADERS, "Content-Type": JSON})
        await response.prepare(request)
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        entry = (match, queue)
        self.subscribers.append(entry)
        try:
            while True:
                lines = [await queue.get()]
                while not queue.empty():
                    lines.append(queue.get_nowait())
                if not self.thawed.is_set():
                    await self.thawed.wait()
                if not all(lines) or self.dead:  # the engine is going away
                    return response
                await response.write(b"".join(lines))
        finally:
            with contextlib.suppress(ValueError):
                self.subscribers.remove(entry)

    # -- requests --------------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.requests += 1
        if not self.thawed.is_set():
            await self.thawed.wait()
        if self.dead:
            if request.transport is not None:
                request.transport.close()
            return empty(500)
        path = request.path
        if path.startswith("/v"):
            versioned = VERSIONED.match(path)
            if versioned:
                path = versioned.group(1)
        parts = path.strip("/").split("/")
        try:
            return await self.route(request, request.method, parts)
        except ApiError as exc:
            return error(exc.status, exc.message)

    async def _body(self, request: web.BaseRequest) -> dict[str, Any]:
        raw = await request.read()
        if not raw:
            return {}
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, f"invalid character in JSON body: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "json: cannot unmarshal into Go value of type object")
        return data

    async def _slow(self, action: str) -> None:
        if self.latency and action in SLOW:
            await asyncio.sleep(self.latency)

    async def route(self, request: web.BaseRequest, method: str,
                    parts: list[str]) -> web.StreamResponse:
        m = self.model
        head = parts[0]
        if head == "containers":
            return await self._containers(request, method, parts)
        if head == "_ping" and method in ("GET", "HEAD"):
            return web.Response(text="OK", headers=HEADERS)
        if head == "exec" and len(parts) == 3:
            if parts[2] == "json" and method == "GET":
                return reply(m.exec_view(parts[1]))
            if parts[2] == "start" and method == "POST":
                await self._body(request)
                m.exec_start(parts[1])
                return empty(200)
        if head == "events" and method == "GET":
            return await self._events(request)
        if head == "images" and len(parts) >= 2:
            if parts[1] == "create" and method == "POST":
                return await self._pull(request)
            if parts[-1] == "json" and method == "GET":
                return reply(m.image_view("/".join(parts[1:-1])))
        if head == "networks" and len(parts) == 2:
            if parts[1] == "create" and method == "POST":
                return reply(m.create_network(await self._body(request)), 201)
            if method == "GET":
                return reply(m.network_view(parts[1]))
        if head == "version" and method == "GET":
            return reply(m.version())
        if head == "info" and method == "GET":
            return reply(m.info())
        return error(404, "page not found")

    async def _containers(self, request: web.BaseRequest, method: str,
                          parts: list[str]) -> web.StreamResponse:
        m = self.model
        query = request.query
        if len(parts) == 2:
            if parts[1] == "json" and method == "GET":
                all_ = query.get("all", "") not in ("", "0", "false")
                return reply(m.list_containers(all_, parse_filters(query.get("filters", ""))))
            if parts[1] == "create" and method == "POST":
                body = await self._body(request)
                await self._slow("create")
                return reply(m.create(query.get("name", ""), body), 201)
            if method == "DELETE":
                await self._slow("remove")
                m.remove(parts[1], query.get("force", "") in ("1", "true", "True"))
                return empty(204)
        elif len(parts) == 3:
            ref, action = parts[1], parts[2]
            if method == "GET":
                if action == "json":
                    return reply(m.inspect(ref))
                if action == "stats":
                    return reply(m.stats(ref))
            elif method == "POST":
                await self._slow(action)
                if action == "start":
                    return empty(204 if m.start(ref) else 304)
                if action == "stop":
                    return empty(204 if m.stop(ref) else 304)
                if action == "kill":
                    m.kill(ref, query.get("signal", "KILL"))
                    return empty(204)
                if action == "restart":
                    m.restart(ref)
                    return empty(204)
                if action == "update":
                    return reply(m.update(ref, await self._body(request)))
                if action == "exec":
                    return reply(m.exec_create(ref, await self._body(request)), 201)
        return error(404, "page not found")

    async def _pull(self, request: web.BaseRequest) -> web.StreamResponse:
        query = request.query
        lines = self.model.pull(query.get("fromImage", ""), query.get("tag", ""))
        response = web.StreamResponse(status=200, headers={**HEADERS, "Content-Type": JSON})
        await response.prepare(request)
        for line in lines:
            await response.write(json.dumps(line).encode() + b"\r\n")
        await response.write_eof()
        return response
