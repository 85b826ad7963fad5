"""Scoped tokens on the API (aiohttp's test client, the in-memory store and its cache): roles,
hashing, revocation, the audit log and the per-token caps (sigmad.api.auth, sigmad.tokens)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from sigmad import tokens
from sigmad.api import make_app
from sigmad.api.auth import DEFAULT_CAPS, GATE, Gate, TokenCaps
from sigmad.api.serving import Limits
from sigmad.engine import EnginePool
from sigmad.errors import Forbidden, SpecError, TooManyRequests
from sigmad.tokens import READ_METHODS, SCOPED, Principal, Role
from tests.unit.harness import ADMIN, TOKEN, Leader, call, spec

Api = tuple[TestClient, Leader, Path]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def serve(lead: Leader, audit_log: str = "", caps: TokenCaps = DEFAULT_CAPS,
                on_main: Callable[[Coroutine[Any, Any, Any]], Awaitable[Any]] | None = None,
                ) -> TestClient:
    extra: dict[str, Any] = {"on_main": on_main} if on_main else {}
    app = make_app(lead.store, lead.cache, TOKEN, EnginePool("/t", factory=lead._engine),
                   caps=caps, audit_log=audit_log, **extra)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    lead = Leader()
    async with lead:
        await lead.add_node("a")
        client = await serve(lead, str(tmp_path / "audit.jsonl"))
        try:
            yield client, lead, tmp_path / "audit.jsonl"
        finally:
            await client.close()




async def make_token(client: TestClient, name: str, role: str,
                     namespaces: list[str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "role": role}
    if namespaces is not None:
        body["namespaces"] = namespaces
    status, made = await call(client, "POST", "/v1/tokens", body)
    assert status == 201, made
    return dict(made)


# -- tokens: made, stored hashed, listed without secrets, revoked ----------------------------


async def test_a_token_is_stored_hashed_and_shown_once(api: Api) -> None:
    client, lead, _ = api
    made = await make_token(client, "ci", "reader")
    secret = made["token"]
    assert tokens.TOKEN_RE.fullmatch(secret) and made["id"] in secret
    stored = lead.store.value(lead.store.keys.token(made["id"]), tokens.TokenRecord)
    assert stored.hash == hashlib.sha256(secret.encode()).hexdigest()
    everything = b"".join(e.value for e in lead.store.data.values())
    assert secret.encode() not in everything and secret.split(".")[2].encode() not in everything
    status, listed = await call(client, "GET", "/v1/tokens")
    assert status == 200
    assert listed["items"] == [{"id": made["id"], "name": "ci", "role": "reader",
                                "namespaces": [], "created": made["created"], "revoked": 0.0}]
    assert secret not in json.dumps(listed)
    assert (await call(client, "GET", "/v1/nodes", headers=bearer(secret)))[0] == 200


async def test_wrong_missing_and_forged_tokens_are_401(api: Api) -> None:
    client, _, _ = api
    made = await make_token(client, "ci", "admin")
    ident = made["id"]
    forged = f"sigma.{ident}.{'0' * 64}"  # a real id with a wrong secret
    for headers in ({}, bearer("nope"), bearer(forged), bearer(TOKEN + "x"),
                    {"Authorization": f"Basic {TOKEN}"}, bearer(f"sigma.{'1' * 16}.{'2' * 64}")):
        status, body = await call(client, "GET", "/v1/apps", headers=headers)
        assert status == 401 and body["error"]["code"] == "unauthorized", headers


async def test_a_revoked_token_is_refused_at_once(api: Api) -> None:
    client, _, _ = api
    made = await make_token(client, "laptop", "admin")
    assert (await call(client, "GET", "/v1/apps", headers=bearer(made["token"])))[0] == 200
    status, done = await call(client, "DELETE", f"/v1/tokens/{made['id']}",
                              headers=bearer(made["token"]))  # an admin may revoke itself
    assert status == 200 and done["revoked"] > 0 and "token" not in done
    status, body = await call(client, "GET", "/v1/apps", headers=bearer(made["token"]))
    assert status == 401 and body["error"]["code"] == "revoked"
    assert body["error"]["message"] == "token laptop was revoked: ask an admin for a new one"
    assert (await call(client, "DELETE", f"/v1/tokens/{made['id']}"))[0] == 200  # idempotent
    status, body = await call(client, "DELETE", "/v1/tokens/bootstrap")
    assert status == 400 and body["error"]["field"] == "id"
    assert (await call(client, "DELETE", f"/v1/tokens/{'9' * 16}"))[0] == 404
    assert (await call(client, "GET", "/v1/apps"))[0] == 200  # the bootstrap token still works


async def test_a_token_revoked_through_another_master_is_refused(api: Api) -> None:
    """The other master's revocation reaches this one through etcd (the cache's watch)."""
    client, lead, _ = api
    made = await make_token(client, "ci", "reader")
    key = lead.store.keys.token(made["id"])
    v = lead.cache.get("tokens", key)
    assert v is not None
    await lead.store.put(key, dataclasses.replace(v.value, revoked=1.0))  # by another master
    await lead.until(lambda: lead.cache.get("tokens", key).value.revoked)  # type: ignore[union-attr]
    assert (await call(client, "GET", "/v1/apps", headers=bearer(made["token"])))[0] == 401


@pytest.mark.parametrize(("body", "field"), [
    ({"role": "reader"}, "name"),
    ({"name": "a b", "role": "reader"}, "name"),
    ({"name": "x", "role": "root"}, "role"),
    ({"name": "x", "role": "operator"}, "namespaces"),
    ({"name": "x", "role": "operator", "namespaces": ["Bad_NS"]}, "namespaces[0]"),
    ({"name": "x", "role": "operator", "namespaces": ["a\n"]}, "namespaces[0]"),
    ({"name": "x", "role": "operator", "namespaces": "a"}, "namespaces"),
    ({"name": "x", "role": "reader", "namespaces": ["a"]}, "namespaces"),
    ({"name": "x", "role": "reader", "ttl": 5}, "ttl"),
])
async def test_bad_token_requests_are_400_naming_the_field(api: Api, body: dict[str, Any],
                                                           field: str) -> None:
    client, lead, _ = api
    status, answer = await call(client, "POST", "/v1/tokens", body)
    assert status == 400 and answer["error"]["field"] == field, answer
    assert not [k for k in lead.store.data if "/tokens/" in k]


async def test_hostile_token_bodies_are_400(api: Api) -> None:
    """(found by the API fuzz: a deeply nested body was a 500)"""
    client, lead, _ = api
    for body in (b"[" * 50_000 + b"]" * 50_000, b"\xff\xfe{", b"[]", b'{"name": "x"'):
        async with client.post("/v1/tokens", data=body, headers=ADMIN) as r:
            assert r.status == 400, (body[:20], await r.text())
            assert (await r.json())["error"]["code"] == "invalid"
    assert not [k for k in lead.store.data if "/tokens/" in k]


# -- roles ----------------------------------------------------------------------------------


async def test_a_reader_reads_and_changes_nothing(api: Api) -> None:
    client, lead, _ = api
    await call(client, "PUT", "/v1/apps", spec(replicas=1))
    await lead.running("web", 1)  # the controller is quiet from here on
    reader = bearer((await make_token(client, "viewer", "reader"))["token"])
    for path in ("/v1/apps", "/v1/nodes", "/v1/pool", "/v1/instances", "/v1/masters",
                 "/v1/apps/default/web"):
        assert (await call(client, "GET", path, headers=reader))[0] == 200, path
    before = dict(lead.store.data)
    for method, path, body in [
        ("PUT", "/v1/apps", spec(replicas=3)),
        ("PUT", "/v1/apps?dry_run=true", spec(replicas=3)),
        ("DELETE", "/v1/apps/default/web", None),
        ("POST", "/v1/apps/default/web/resources", {"limit": {"cpu": "1"}}),
        ("POST", "/v1/instances/default/web-0/migrate", {}),
        ("POST", "/v1/nodes/a/drain", None),
        ("POST", "/v1/tokens", {"name": "me", "role": "admin"}),
        ("DELETE", "/v1/tokens/0123456789abcdef", None),
    ]:
        status, answer = await call(client, method, path, body, headers=reader)
        assert status == 403 and answer["error"]["code"] == "forbidden", (method, path)
        assert "read-only" in answer["error"]["message"]
    for path in ("/v1/tokens", "/v1/audit", "/v1/backup"):
        assert (await call(client, "GET", path, headers=reader))[0] == 403
    changed = {k for k in lead.store.data if lead.store.data[k] != before.get(k)}
    assert all("/audit/" in k for k in changed)  # only the audit of the refusals


async def test_an_operator_changes_only_its_namespaces(api: Api) -> None:
    client, lead, _ = api
    await call(client, "PUT", "/v1/apps", spec(replicas=1, namespace="b"))
    op = bearer((await make_token(client, "team-a", "operator", ["a"]))["token"])
    status, _ = await call(client, "PUT", "/v1/apps", spec(replicas=1, namespace="a"),
                           headers=op)
    assert status == 200
    apps_before = {k: e.mod_revision for k, e in lead.store.data.items() if "/apps/" in k}
    both = spec(replicas=1, namespace="a", app="x") + "---\n" + spec(namespace="b", app="y")
    for method, path, body in [
        ("PUT", "/v1/apps", spec(replicas=2, namespace="b")),
        ("PUT", "/v1/apps", both),  # all-or-nothing: a's app is not written either
        ("DELETE", "/v1/apps/b/web", None),
        ("POST", "/v1/apps/b/web/resources", {"limit": {"cpu": "1"}}),
        ("POST", "/v1/instances/b/web-0/migrate", {}),
    ]:
        status, answer = await call(client, method, path, body, headers=op)
        assert status == 403, (method, path, answer)
        assert "may change namespaces a only, not 'b'" in answer["error"]["message"]
    for method, path in [("POST", "/v1/nodes/a/drain"), ("POST", "/v1/nodes/a/uncordon"),
                         ("POST", "/v1/tokens")]:
        status, answer = await call(client, method, path, {}, headers=op)
        assert status == 403 and "only an admin" in answer["error"]["message"], path
    assert {k: e.mod_revision for k, e in lead.store.data.items() if "/apps/" in k} == \
        apps_before
    # it reads every namespace
    status, listed = await call(client, "GET", "/v1/apps", headers=op)
    assert sorted(a["namespace"] for a in listed["items"]) == ["a", "b"]
    status, _ = await call(client, "DELETE", "/v1/apps/a/web", headers=op)
    assert status == 202


def test_every_change_but_the_scoped_ones_is_admin_only() -> None:
    """Deny by default: walk every route of the app; a reader may change none, an operator
    only the namespace-scoped ones, and only in its namespace."""
    lead = Leader()
    app = make_app(lead.store, lead.cache, TOKEN)
    reader = Principal("r", "r", Role.READER)
    op = Principal("o", "o", Role.OPERATOR, frozenset({"a"}))
    admin = Principal("x", "x", Role.ADMIN)
    changes = 0
    for route in app.router.routes():
        method, path = route.method, route.resource.canonical  # type: ignore[union-attr]
        if method in READ_METHODS or method == "*" or not path.startswith("/v1/"):
            continue  # (/ui/session: the console's sign-in, checked by its own tests)
        changes += 1
        assert tokens.allowed(reader, method, path, "a"), (method, path)
        assert tokens.allowed(admin, method, path, "b") is None
        scoped = SCOPED.get((method, path))
        if scoped is None:
            assert tokens.allowed(op, method, path, "a"), (method, path)
        elif scoped == "path":
            assert tokens.allowed(op, method, path, "a") is None
            assert tokens.allowed(op, method, path, "b")
    assert changes == 18  # drain, uncordon, apply, delete, resize, migrate, exec, token +/-,
    # ssd release, cordon, uncordon, config version, rollback, delete, app release, undo,
    # rollout pause|resume|promote
    assert tokens.allowed(op, "PATCH", "/v1/anything/new", "a")  # a route added later


def test_check_namespaces_names_the_first_foreign_one() -> None:
    op = Principal("o", "ops", Role.OPERATOR, frozenset({"a", "c"}))
    tokens.check_namespaces(op, {"a", "c"})
    with pytest.raises(Forbidden, match="may change namespaces a, c only, not 'b'"):
        tokens.check_namespaces(op, {"a", "b", "d"})


# -- the audit log ---------------------------------------------------------------------------


async def test_every_change_is_audited_in_etcd_and_the_file(api: Api) -> None:
    client, lead, path = api
    op_made = await make_token(client, "team-a", "operator", ["a"])
    op = bearer(op_made["token"])
    await call(client, "PUT", "/v1/apps", spec(replicas=1, namespace="a"), headers=op)
    await call(client, "DELETE", "/v1/apps/b/web", headers=op)  # refused: audited too
    await call(client, "PUT", "/v1/apps", "app: [", headers=op)  # bad input: audited
    await call(client, "GET", "/v1/apps", headers=op)  # a read: not audited
    await call(client, "PUT", "/v1/apps", spec(), headers=bearer("wrong"))  # no one: not
    status, read = await call(client, "GET", "/v1/audit?limit=10")
    assert status == 200
    got = [(e["name"], e["role"], e["method"], e["path"], e["status"], e["apps"])
           for e in read["items"]]
    assert got == [  # newest first
        ("team-a", "operator", "PUT", "/v1/apps", 400, []),
        ("team-a", "operator", "DELETE", "/v1/apps/b/web", 403, ["b/web"]),
        ("team-a", "operator", "PUT", "/v1/apps", 200, ["a/web"]),
        ("bootstrap", "admin", "POST", "/v1/tokens", 201, []),
    ]
    assert read["items"][1]["token"] == op_made["id"]
    assert all(e["time"] > 0 and e["remote"] for e in read["items"])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(e["name"], e["method"], e["path"], e["status"], e["apps"])
            for e in reversed(lines)] == [g[:1] + g[2:] for g in got]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert op_made["token"] not in path.read_text()
    leases = {e.lease for k, e in lead.store.data.items() if "/audit/" in k}
    assert len(leases) == 1 and 0 not in leases  # they expire
    status, body = await call(client, "GET", "/v1/audit?limit=0")
    assert status == 400 and body["error"]["field"] == "limit"


# -- caps per token --------------------------------------------------------------------------


async def test_requests_in_flight_are_capped_per_token(tmp_path: Path) -> None:
    lead = Leader()
    release = asyncio.Event()

    async def held(coro: Coroutine[Any, Any, Any]) -> Any:
        await release.wait()  # every call that needs etcd waits here
        return await coro

    async with lead:
        client = await serve(lead, caps=TokenCaps(requests=2, streams=1), on_main=held)
        try:
            pending = [asyncio.ensure_future(call(client, "GET", "/v1/events"))
                       for _ in range(2)]
            gate = client.server.app[GATE]
            await lead.until(lambda: gate.requests["bootstrap"] == 2)
            status, body = await call(client, "GET", "/v1/nodes")
            assert status == 429 and body["error"]["code"] == "too_many_requests"
            assert "2 requests in flight" in body["error"]["message"]
            release.set()
            assert [s for s, _ in await asyncio.gather(*pending)] == [200, 200]
            assert (await call(client, "GET", "/v1/nodes"))[0] == 200  # slots given back
        finally:
            release.set()
            await client.close()


async def test_event_streams_are_capped_per_token(api: Api) -> None:
    client, _, _ = api
    other = bearer((await make_token(client, "other", "reader"))["token"])
    streams = []
    for _ in range(8):
        r = await client.get("/v1/events?watch=true", headers=ADMIN)
        assert r.status == 200
        streams.append(r)
    ninth = await client.get("/v1/events?watch=true", headers=ADMIN)
    streams.append(ninth)
    assert ninth.status == 429  # (checked before reading: a stream would never end)
    assert "8 event streams open" in (await ninth.json())["error"]["message"]
    assert (await call(client, "GET", "/v1/apps"))[0] == 200  # plain calls are not streams
    r = await client.get("/v1/events?watch=true", headers=other)  # another token's own cap
    assert r.status == 200
    for s in [*streams, r]:
        s.close()


async def test_a_gone_stream_client_gives_its_slot_back() -> None:
    """A watcher that vanishes is noticed by the stream's heartbeats; its slot is free again."""
    lead = Leader()
    async with lead:
        app = make_app(lead.store, lead.cache, TOKEN, EnginePool("/t", factory=lead._engine),
                       limits=Limits(stream_heartbeat=0.05), caps=TokenCaps(streams=1))
        client = TestClient(TestServer(app))
        await client.start_server()
        try:
            first = await client.get("/v1/events?watch=true", headers=ADMIN)
            assert first.status == 200
            second = await client.get("/v1/events?watch=true", headers=ADMIN)
            assert second.status == 429
            first.close()  # the client goes without a word
            await lead.until(lambda: not app[GATE].streams, what="the slot given back")
            third = await client.get("/v1/events?watch=true", headers=ADMIN)
            assert third.status == 200
            third.close()
        finally:
            await client.close()


def test_a_slot_is_given_back_however_the_call_ends() -> None:
    gate = Gate(Leader().cache, TOKEN, None, TokenCaps(requests=1, streams=1))  # type: ignore[arg-type]
    who = Principal("t", "t", Role.READER)
    with pytest.raises(SpecError), gate.slot(who, False):
        raise SpecError("x", "boom")
    assert not gate.requests
    with gate.slot(who, True), pytest.raises(TooManyRequests), gate.slot(who, True):
        pass
    with gate.slot(who, False):
        assert gate.requests["t"] == 1
    assert not gate.requests and not gate.streams


# -- weak tokens -----------------------------------------------------------------------------


@pytest.mark.parametrize("token", [
    "change-me-0123456789abcdef", "CHANGEME-but-longer-than-16", "my-example-token-123",
    "aaaaaaaaaaaaaaaaaaaaaaaa", "abababababababababab", "0123456789abcdef",
    "x9abcdefghijklmnopz", "zyxwvutsrqponmlk4242",
])
def test_weak_tokens(token: str) -> None:
    assert tokens.weakness(token)


def test_random_tokens_are_not_weak() -> None:
    for _ in range(2000):
        assert tokens.weakness(os.urandom(24).hex()) is None
        assert tokens.weakness(tokens.new_token()[1]) is None
