"""Who may call the API, how much at once, and the record of what they changed.

`Gate.guard` wraps every /v1 call: it authenticates the bearer token (the config's bootstrap
admin token, or a scoped token of the cache's `tokens/` table: sigmad.tokens), takes one of
the token's slots, checks the role (sigmad.tokens.allowed), runs the handler, and audits
every call that may change something (sigmad.api.audit). `TokenApi` serves /v1/tokens and
/v1/audit (admin only).

Invariants:
- a token holds at most `TokenCaps.requests` calls in flight and `TokenCaps.streams` event
  streams (`?watch=true`, log follows, exec terminals) at once; one more is answered 429
  at once, before its handler runs;
- a slot is taken before the handler runs and given back however it ends;
- the API runs on one event loop (one thread): the counters need no lock;
- a console session's cookie (sigmad.api.console) stands for its token on reads only
  (GET/HEAD without an Authorization header): every change needs the bearer token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from sigmad import records
from sigmad.api.audit import MAX_READ, AuditEntry, AuditLog, OnMain
from sigmad.api.sessions import COOKIE, Sessions
from sigmad.errors import (
    Conflict,
    Forbidden,
    NotFound,
    SigmaError,
    SpecError,
    TooManyRequests,
    Unauthorized,
)
from sigmad.spec import Fields
from sigmad.state.cache import TOKENS, Cache
from sigmad.state.writes import Writes, commit
from sigmad.store import Store
from sigmad.tokens import (
    BOOTSTRAP,
    READ_METHODS,
    Principal,
    Role,
    TokenRecord,
    allowed,
    matches,
    new_record,
    principal,
    same_secret,
    token_id,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PRINCIPAL = web.RequestKey("principal", Principal)  # who makes the call
AUDIT_APPS = web.RequestKey("audit_apps", list[str])  # NAMESPACE/APP a handler touched
WRONG_TOKEN = "missing or wrong bearer token"


class Revoked(Unauthorized):
    """The token was right, and is revoked."""

    code = "revoked"


@dataclass(frozen=True)
class TokenCaps:
    """Per-token caps (MasterConfig: max_requests_per_token, max_streams_per_token)."""

    requests: int = 64  # calls in flight at once (event streams not counted)
    streams: int = 8  # event streams open at once


DEFAULT_CAPS = TokenCaps()


def is_stream(request: web.Request) -> bool:
    """An event watch (`?watch=true`), a log follow (`?follow=1`) or a WebSocket (an exec's
    terminal)."""
    return request.headers.get("Upgrade", "").lower() == "websocket" or any(
        request.query.get(k, "").lower() in ("1", "true", "yes") for k in ("watch", "follow"))


def caller(request: web.Request) -> Principal:
    """The Principal `Gate.guard` authenticated for this request."""
    return request[PRINCIPAL]


class Gate:
    """Authentication, role checks, per-token caps and the audit (module docstring)."""

    def __init__(self, cache: Cache, bootstrap: str, audit: AuditLog, caps: TokenCaps) -> None:
        self.cache = cache
        self.keys = cache.keys
        self.bootstrap = bootstrap
        self.audit = audit
        self.caps = caps
        self.requests: Counter[str] = Counter()
        self.streams: Counter[str] = Counter()
        self.sessions = Sessions()  # the console's sign-ins on this master

    def identify(self, request: web.Request) -> Principal:
        """Who calls: the bearer token's Principal, or for a read without one the console
        session's (its token checked again); Unauthorized otherwise."""
        header = request.headers.get("Authorization")
        cookie = request.cookies.get(COOKIE)
        if header is None and cookie and request.method in READ_METHODS:
            session = self.sessions.get(cookie, time.time())
            if session is None:
                raise Unauthorized("the console session ended: sign in again at /ui/")
            self.still_valid(session.who)
            return session.who
        return self.authenticate(header or "")

    def still_valid(self, who: Principal) -> None:
        """Unauthorized unless the token `who` signed in with still authenticates."""
        if who.id == BOOTSTRAP:
            return
        v = self.cache.get(TOKENS, self.keys.token(who.id))
        if v is None or v.value.revoked:
            raise Revoked(f"token {who.name} was revoked: the console session ended")

    def authenticate(self, header: str) -> Principal:
        """The Principal of `Authorization: Bearer TOKEN`; Unauthorized otherwise."""
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized(WRONG_TOKEN)
        if same_secret(token, self.bootstrap):
            return Principal(BOOTSTRAP, BOOTSTRAP, Role.ADMIN)
        ident = token_id(token)
        v = self.cache.get(TOKENS, self.keys.token(ident)) if ident else None
        if v is None or not matches(v.value, token):
            raise Unauthorized(WRONG_TOKEN)
        if v.value.revoked:
            raise Revoked(f"token {v.value.name} was revoked: ask an admin for a new one")
        return principal(v.value)

    @contextlib.contextmanager
    def slot(self, who: Principal, stream: bool) -> Iterator[None]:
        """One of `who`'s slots for the length of a call; TooManyRequests when none is free."""
        counts, cap = (self.streams, self.caps.streams) if stream else \
            (self.requests, self.caps.requests)
        if counts[who.id] >= cap:
            what = "event streams open" if stream else "requests in flight"
            raise TooManyRequests(f"token {who.name} has {cap} {what}, the most allowed: "
                                  "wait for one to end (or close a watch), then retry")
        counts[who.id] += 1
        try:
            yield
        finally:
            counts[who.id] -= 1
            if not counts[who.id]:
                del counts[who.id]

    async def guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Run `handler` for an authenticated, allowed call within the token's caps; audit
        it if it may change something."""
        who = self.identify(request)
        request[PRINCIPAL] = who
        if request.method in READ_METHODS:
            with self.slot(who, is_stream(request)):
                self._check(request, who)
                return await handler(request)
        status = 500
        try:
            with self.slot(who, False):
                self._check(request, who)
                response = await handler(request)
            status = response.status
            return response
        except SigmaError as exc:
            status = exc.status
            raise
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            await self.audit.record(self._entry(request, who, status))

    def _check(self, request: web.Request, who: Principal) -> None:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else request.path
        why = allowed(who, request.method, route, request.match_info.get("ns"))
        if why:
            raise Forbidden(why)

    def _entry(self, request: web.Request, who: Principal, status: int) -> AuditEntry:
        apps: list[str] = request.get(AUDIT_APPS) or []
        ns = request.match_info.get("ns")
        if not apps and ns:
            name = request.match_info.get("app") or request.match_info.get("name", "")
            apps = [f"{ns}/{name}"]
        return AuditEntry(time.time(), who.id, who.name, who.role.value, request.method,
                          request.path_qs, status, apps, request.remote or "")


GATE = web.AppKey("gate", Gate)  # the Gate of an app made by make_app


class TokenApi:
    """/v1/tokens (create, list, revoke) and /v1/audit; the Gate lets only admins in."""

    def __init__(self, store: Store, cache: Cache, audit: AuditLog, on_main: OnMain,
                 read_body: Callable[[web.Request], Awaitable[dict[str, Any]]]) -> None:
        self.store = store
        self.read_body = read_body  # the API's bounded JSON object reader
        self.cache = cache
        self.writes = Writes(store.keys)
        self.audit = audit
        self.main = on_main

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/v1/tokens", self.list)
        router.add_post("/v1/tokens", self.create)
        router.add_delete("/v1/tokens/{id}", self.revoke)
        router.add_get("/v1/audit", self.read_audit)

    async def list(self, request: web.Request) -> web.Response:
        found = sorted((v.value for v in list(self.cache.table(TOKENS).values())),
                       key=lambda r: (r.created, r.id))
        return web.json_response({"items": [view(r) for r in found]})

    async def create(self, request: web.Request) -> web.Response:
        """A new token: the answer carries it (`token`), and nothing else ever will."""
        fields = Fields("", await self.read_body(request), "")
        name, role, spaces = fields.take("name"), fields.take("role"), fields.take("namespaces")
        fields.done()
        record, token = new_record(name, role, spaces, time.time())

        async def write() -> int:
            return await commit(self.store, self.cache, self.writes.create_token(record))

        if not await self.main(write()):
            raise Conflict(f"token id {record.id} is taken (a one in 2^64 chance): "
                           "create it again")
        return web.json_response({**view(record), "token": token}, status=201)

    async def revoke(self, request: web.Request) -> web.Response:
        """Revoke a token for good (its record stays, with the time, for the audit)."""
        ident = request.match_info["id"]
        if ident == BOOTSTRAP:
            raise SpecError("id", "the bootstrap token is the master's config `token`: "
                            "change it there and restart the masters")
        key = self.store.keys.token(ident)

        async def write() -> TokenRecord:
            v = self.cache.get(TOKENS, key)
            if v is None:
                raise NotFound(f"token {ident} not found: see 'sigmactl token list'")
            if v.value.revoked:
                return v.value
            done = dataclasses.replace(v.value, revoked=time.time())
            if not await commit(self.store, self.cache, self.writes.update_token(v, done)):
                raise Conflict(f"token {ident} changed meanwhile: revoke it again")
            return done

        return web.json_response(view(await self.main(write())))

    async def read_audit(self, request: web.Request) -> web.Response:
        """The newest audit entries (`?limit=`, default 100, at most MAX_READ), newest first."""
        raw = request.query.get("limit", "100")
        if not raw.isdigit() or not 0 < int(raw) <= MAX_READ:
            raise SpecError("limit", f"must be a whole number from 1 to {MAX_READ}")
        entries = await self.audit.newest(int(raw))
        return web.json_response({"items": [records.to_dict(e) for e in entries]})


def view(record: TokenRecord) -> dict[str, Any]:
    """A token record as the API shows it: never its hash."""
    shown = records.to_dict(record)
    shown.pop("hash")
    return dict(shown)
