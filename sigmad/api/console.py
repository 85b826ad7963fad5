"""The web console at /ui/: static files shipped in the package (sigmad/api/ui: no build step,
nothing fetched from outside), its sign-in, and the live state it shows.

Sign-in: `POST /ui/session` with `{"token": ...}` checks the token as the API does and sets an
HttpOnly, SameSite=Strict cookie holding a random session id (Secure over HTTPS), valid for
SESSION_TTL seconds at most. The token travels once, in that body: never in a URL, a cookie
or a log. `GET /ui/session` says who is signed in and gives the CSRF value that `DELETE
/ui/session` (sign-out) must echo in `X-Sigma-CSRF`.

Invariants:
- the cookie authenticates reads only (GET/HEAD under /v1, checked by `Gate.identify`): a
  change needs a bearer token, so the cookie is no CSRF lever; the session's token is checked
  again on every use (a revoked token ends its sessions at once), and its role applies;
- a session lives in this master's memory only: at most MAX_SESSIONS (the oldest go first),
  none beyond SESSION_TTL; a master that restarts forgets them (sign in again);
- `GET /v1/console?watch=true` is one server-sent stream per console: a `state` message
  (pool, nodes with what runs on each, apps) at once and after every change of the cache, at
  most one per TICK seconds, built once for every console; and the events as they are written;
- the pool's last hour is a ring of HISTORY samples, one every SAMPLE_EVERY seconds, kept
  in memory by each master (`GET /v1/console/history`), never written to etcd.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from sigmad import records
from sigmad.api import sse, views
from sigmad.api.audit import AuditEntry
from sigmad.api.auth import Gate
from sigmad.api.sessions import COOKIE, CSRF_HEADER, Session, Sessions
from sigmad.errors import Forbidden, SpecError, Unauthorized
from sigmad.metrics import Metrics
from sigmad.models import Instance
from sigmad.state.cache import Cache
from sigmad.tokens import Principal

UI = Path(__file__).with_name("ui")  # index.html, console.js, console.css
TICK = 1.0  # seconds: at most one state message a TICK
SAMPLE_EVERY = 15.0  # seconds between two samples of the pool's history
HISTORY = 240  # samples kept: the last hour
MAX_PLACED = 200  # instances listed per node in a state message (the count is whole)
BACKLOG = 1000  # messages queued for one console
RECENT_EVENTS = 200  # events a console's stream starts with
FIGURES = ("allocatable", "requested", "limits", "used")
# The page runs only its own files: no inline script, no other origin, no framing.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


def sample(pool: dict[str, Any], at: float) -> dict[str, Any]:
    """One point of the pool's history: each figure of FIGURES present in the pool view,
    overall and per label value."""
    def figures(summary: dict[str, Any]) -> dict[str, Any]:
        return {f: summary[f] for f in FIGURES if f in summary}

    return {"at": at, **figures(pool),
            "by_label": {key: {value: figures(s) for value, s in values.items()}
                         for key, values in pool.get("by_label", {}).items()}}


def placed(inst: Instance, node: str) -> dict[str, Any]:
    """An instance as a node's topology shows it."""
    return {"namespace": inst.namespace, "name": inst.name, "app": inst.app,
            "state": inst.state, "reason": inst.reason, "ip": inst.ip,
            "arriving": inst.next_node == node and inst.node != node}


def state(cache: Cache) -> dict[str, Any]:
    """What a console shows live: the pool, every node with its instances (at most
    MAX_PLACED each) and every app with its instances counted by state."""
    nodes = views.nodes(cache)
    for node in nodes:
        mine = sorted(cache.instances_on(node["name"]), key=lambda v: v.key)
        node["placed"] = [placed(v.value, node["name"]) for v in mine[:MAX_PLACED]]
        node["placed_total"] = len(mine)
    apps = []
    for v in sorted(list(cache.apps().values()), key=lambda v: v.value.spec.key):
        rec = v.value
        counts: dict[str, int] = {}
        for i in list(cache.instances_of(rec.spec.key).values()):
            name = str(i.value.state)
            counts[name] = counts.get(name, 0) + 1
        apps.append({"namespace": rec.spec.namespace, "app": rec.spec.app,
                     "generation": rec.generation,
                     "template_generation": rec.template_generation,
                     "replicas": rec.spec.replicas, "states": counts})
    return {"type": "state", "revision": cache.revision, "at": time.time(),
            "pool": views.pool(cache), "nodes": nodes, "apps": apps}


class Feed:
    """The live side of every console of one API app: the state message, built at most once
    a TICK for all open consoles when the cache changed, and the pool's history ring."""

    def __init__(self, cache: Cache, tick: float = TICK, every: float = SAMPLE_EVERY,
                 history: int = HISTORY) -> None:
        self.cache = cache
        self.tick = tick
        self.every = every
        self.history: deque[dict[str, Any]] = deque(maxlen=history)
        self.streams: set[sse.Stream] = set()
        self.changes = 0  # written by the cache's loop only (its subscriber)
        self.sent = -1  # `changes` as of the last state message
        self.latest = b""
        self.tasks: list[asyncio.Task[None]] = []

    def _changed(self, kind: str, key: str, old: Any, new: Any) -> None:
        self.changes += 1

    async def start(self, _: web.Application) -> None:
        self.cache.subscribe(self._changed)
        self.tasks = [asyncio.create_task(self._tick()), asyncio.create_task(self._sample())]

    async def stop(self, _: web.Application) -> None:
        self.cache.unsubscribe(self._changed)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def current(self) -> bytes:
        """The state message as of now (built again only if the cache changed)."""
        seen = self.changes
        if seen != self.sent or not self.latest:
            self.latest = orjson.dumps(records.to_dict(state(self.cache)))
            self.sent = seen
        return self.latest

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            if self.streams and self.changes != self.sent:
                data = self.current()
                for stream in list(self.streams):
                    stream.offer(data)

    async def _sample(self) -> None:
        while True:
            self.take_sample()
            await asyncio.sleep(self.every)

    def take_sample(self) -> None:
        self.history.append(sample(records.to_dict(views.pool(self.cache)), time.time()))


class ConsoleApi:
    """The /ui routes and the console's /v1 reads (module docstring)."""

    def __init__(self, cache: Cache, gate: Gate, feed: Feed,
                 read_body: Callable[[web.Request], Awaitable[dict[str, Any]]],
                 events: Callable[[sse.Stream, int],
                                  Awaitable[tuple[list[bytes], asyncio.Future[None]]]],
                 heartbeat: float, metrics: Metrics) -> None:
        self.cache = cache
        self.gate = gate
        self.sessions: Sessions = gate.sessions
        self.feed = feed
        self.read_body = read_body
        self.events = events  # (first messages, follower) of a console's events
        self.heartbeat = heartbeat
        self.metrics = metrics

    def add_routes(self, app: web.Application) -> None:
        router = app.router
        router.add_get("/ui", self.to_index)
        router.add_get("/ui/", self.index)
        router.add_get("/ui/session", self.who)
        router.add_post("/ui/session", self.sign_in)
        router.add_delete("/ui/session", self.sign_out)
        router.add_get("/ui/{file:[a-z]+\\.(?:js|css|svg)}", self.asset)
        router.add_get("/v1/console", self.console)
        router.add_get("/v1/console/history", self.read_history)
        app.on_startup.append(self.feed.start)
        app.on_cleanup.append(self.feed.stop)

    async def to_index(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/ui/")

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(UI / "index.html", headers=HEADERS)

    async def asset(self, request: web.Request) -> web.FileResponse:
        path = UI / request.match_info["file"]
        if not path.is_file():
            raise web.HTTPNotFound(reason=f"{request.path} is not a file of the console")
        return web.FileResponse(path, headers=HEADERS)

    def _session(self, request: web.Request) -> tuple[str, Session]:
        cookie = request.cookies.get(COOKIE, "")
        session = self.sessions.get(cookie, time.time())
        if session is None:
            raise Unauthorized("not signed in (or the session ended): sign in with a token")
        self.gate.still_valid(session.who)
        return cookie, session

    async def who(self, request: web.Request) -> web.Response:
        _, session = self._session(request)
        return _private({"name": session.who.name, "role": session.who.role.value,
                         "csrf": session.csrf, "expires": session.expires})

    async def sign_in(self, request: web.Request) -> web.Response:
        """Check the token of the body like the API does; set the session cookie."""
        _same_origin(request)
        if request.content_type != "application/json":
            raise SpecError("body", "must be JSON (Content-Type: application/json) with the "
                            "token: {\"token\": \"...\"}")
        body = await self.read_body(request)
        token = body.get("token")
        if not isinstance(token, str) or not token or len(token) > 512:
            raise SpecError("token", "must be the API token (a string)")
        if set(body) - {"token"}:
            raise SpecError(sorted(set(body) - {"token"})[0], "is not a field of a sign-in")
        who = self.gate.authenticate(f"Bearer {token}")
        cookie, session = self.sessions.open(who, time.time())
        response = _private({"name": who.name, "role": who.role.value,
                             "csrf": session.csrf, "expires": session.expires})
        response.set_cookie(COOKIE, cookie, max_age=int(self.sessions.ttl), path="/",
                            httponly=True, samesite="Strict", secure=request.secure)
        await self._audit(request, who, 200)
        return response

    async def sign_out(self, request: web.Request) -> web.Response:
        cookie, session = self._session(request)
        given = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(given.encode(), session.csrf.encode()):
            raise Forbidden(f"sign-out needs the session's {CSRF_HEADER} header "
                            "(GET /ui/session gives it)")
        self.sessions.close(cookie)
        response = _private({"signed_out": True})
        response.del_cookie(COOKIE, path="/")
        await self._audit(request, session.who, 200)
        return response

    async def _audit(self, request: web.Request, who: Principal, status: int) -> None:
        await self.gate.audit.record(AuditEntry(
            time.time(), who.id, who.name, who.role.value, request.method, request.path,
            status, [], request.remote or ""))

    async def console(self, request: web.Request) -> web.StreamResponse:
        """The state message (JSON); with `?watch=true` a stream of them and of the events
        (`{"type": "event", "event": {...}}`), with heartbeats while idle."""
        if request.query.get("watch", "").lower() not in ("1", "true", "yes"):
            return web.Response(body=self.feed.current(), content_type="application/json")
        stream = sse.Stream(BACKLOG)
        first, following = await self.events(stream, RECENT_EVENTS)
        self.feed.streams.add(stream)
        try:
            return await stream.serve(request, [sse.message(self.feed.current()), *first],
                                      self.heartbeat, self.metrics)
        finally:
            self.feed.streams.discard(stream)
            following.cancel()

    async def read_history(self, request: web.Request) -> web.Response:
        """The pool's samples of the last hour, oldest first."""
        return web.json_response({"every": self.feed.every,
                                  "items": list(self.feed.history)})


def _private(body: dict[str, Any]) -> web.Response:
    return web.json_response(body, headers={"Cache-Control": "no-store"})


def _same_origin(request: web.Request) -> None:
    """Forbidden when the browser says the request comes from another site's page."""
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        raise Forbidden(f"a sign-in from {origin[:100]!r} (another site's page) is refused")
