"""The web console's sign-in and live state (sigmad.api.console, sigmad.api.sessions) on the
in-memory store: the token never reaches a URL or a cookie, the cookie reads only, a revoked
token ends its sessions, the state and history a console shows."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from sigmad.api.console import Feed, sample, state
from sigmad.api.sessions import COOKIE, Sessions
from sigmad.tokens import Principal, Role
from tests.unit.harness import ADMIN, TOKEN, Leader, call, spec

JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def ui() -> AsyncIterator[tuple[TestClient, Leader]]:
    async with Leader() as lead:
        await lead.add_node("a", labels={"room": "r1"})
        await lead.add_node("b", labels={"room": "r2"})
        async with lead.client() as client:
            yield client, lead


async def sign_in(client: TestClient, token: str = TOKEN) -> dict[str, Any]:
    async with client.post("/ui/session", data=json.dumps({"token": token}),
                           headers=JSON) as r:
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return body


async def test_the_page_ships_its_files_with_a_strict_policy(ui: Any) -> None:
    client, _ = ui
    for path, kind in (("/ui/", "text/html"), ("/ui/console.js", "javascript"),
                       ("/ui/console.css", "text/css")):
        async with client.get(path) as r:
            assert r.status == 200 and kind in r.headers["Content-Type"]
            assert "script-src 'self'" in r.headers["Content-Security-Policy"]
            text = await r.text()
            assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
            assert "https://" not in text
    async with client.get("/ui/../routes.py") as r:
        assert r.status == 404


async def test_no_token_no_data(ui: Any) -> None:
    client, _ = ui
    for path in ("/v1/console", "/v1/console?watch=true", "/v1/console/history", "/v1/pool",
                 "/ui/session"):
        async with client.get(path) as r:
            assert r.status == 401, path
    async with client.get("/v1/pool", cookies={COOKIE: "guessed"}) as r:
        assert r.status == 401
    async with client.post("/ui/session", data=json.dumps({"token": "wrong-" * 5}),
                           headers=JSON) as r:
        assert r.status == 401
        assert COOKIE not in r.cookies


async def test_sign_in_sets_an_httponly_strict_cookie_that_is_not_the_token(ui: Any) -> None:
    client, _ = ui
    async with client.post("/ui/session", data=json.dumps({"token": TOKEN}),
                           headers=JSON) as r:
        assert r.status == 200
        cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        assert TOKEN not in cookie and TOKEN not in await r.text()
        assert (await r.json())["role"] == "admin"
    async with client.get("/v1/pool") as r:  # the cookie jar holds the session now
        assert r.status == 200
        assert (await r.json())["nodes"] == 2
    async with client.get("/ui/session") as r:
        assert (await r.json())["name"] == "bootstrap"


async def test_the_cookie_never_changes_anything(ui: Any) -> None:
    client, lead = ui
    await sign_in(client)
    async with client.put("/v1/apps", data=spec("web")) as r:
        assert r.status == 401
    async with client.post("/v1/nodes/a/drain") as r:
        assert r.status == 401
    assert not lead.cache.apps()
    assert lead.cache.node("a") is not None and not lead.cache.node("a").draining


async def test_sign_in_is_refused_from_another_site_or_as_a_form(ui: Any) -> None:
    client, _ = ui
    async with client.post("/ui/session", data=json.dumps({"token": TOKEN}),
                           headers={**JSON, "Origin": "https://evil.example"}) as r:
        assert r.status == 403 and COOKIE not in r.cookies
    async with client.post("/ui/session", data={"token": TOKEN}) as r:
        assert r.status == 400
        assert (await r.json())["error"]["field"] == "body"
    async with client.post("/ui/session", data=json.dumps({"token": 7}), headers=JSON) as r:
        assert (await r.json())["error"]["field"] == "token"
    async with client.post("/ui/session", data=json.dumps({"token": TOKEN, "x": 1}),
                           headers=JSON) as r:
        assert (await r.json())["error"]["field"] == "x"


async def test_sign_out_needs_the_csrf_value_and_ends_the_session(ui: Any) -> None:
    client, _ = ui
    me = await sign_in(client)
    async with client.delete("/ui/session") as r:
        assert r.status == 403
    async with client.get("/v1/pool") as r:
        assert r.status == 200
    async with client.delete("/ui/session", headers={"X-Sigma-CSRF": me["csrf"]}) as r:
        assert r.status == 200
    client.session.cookie_jar.clear()
    async with client.get("/v1/pool") as r:
        assert r.status == 401


async def test_a_revoked_token_ends_its_console_sessions(ui: Any) -> None:
    client, _ = ui
    status, made = await call(client, "POST", "/v1/tokens", {"name": "eve", "role": "reader"})
    assert status == 201
    me = await sign_in(client, made["token"])
    assert me["role"] == "reader"
    async with client.get("/v1/tokens") as r:
        assert r.status == 403  # the session has the reader's role
    async with client.get("/v1/pool") as r:
        assert r.status == 200
    status, _ = await call(client, "DELETE", f"/v1/tokens/{made['id']}")
    assert status == 200
    async with client.get("/v1/pool") as r:
        assert r.status == 401
    async with client.get("/ui/session") as r:
        assert r.status == 401


def test_sessions_are_bounded_and_expire() -> None:
    who = Principal("x", "x", Role.READER)
    sessions = Sessions(ttl=10, most=3)
    cookies = [sessions.open(who, 100.0)[0] for _ in range(4)]
    assert sessions.get(cookies[0], 101.0) is None  # pushed out by the fourth
    assert sessions.get(cookies[3], 109.0) is not None
    assert sessions.get(cookies[3], 110.0) is None  # expired
    assert sessions.get("", 100.0) is None


async def test_the_state_shows_nodes_with_their_instances_and_the_pool(ui: Any) -> None:
    client, lead = ui
    await lead.apply(spec("web", replicas=3))
    await lead.running("web", 3)
    status, body = await call(client, "GET", "/v1/console")
    assert status == 200
    assert body["type"] == "state"
    status, pool = await call(client, "GET", "/v1/pool")
    assert body["pool"] == pool
    placed = {i["name"] for n in body["nodes"] for i in n["placed"]}
    assert placed == {"web-0", "web-1", "web-2"}
    assert sum(n["placed_total"] for n in body["nodes"]) == 3
    assert body["apps"] == [{"namespace": "default", "app": "web", "generation": 1,
                             "template_generation": 1, "replicas": 3,
                             "states": {"Running": 3}}]


async def test_the_stream_starts_with_the_state_then_brings_changes(ui: Any) -> None:
    client, lead = ui
    feed = Feed(lead.cache, tick=0.01)
    await feed.start(None)  # type: ignore[arg-type]
    try:
        seen = feed.current()
        await lead.apply(spec("web", replicas=1))
        await lead.running("web", 1)
        assert feed.current() != seen  # the cache changed: built again
        again = feed.current()
        assert feed.current() is again  # no change: the same bytes
    finally:
        await feed.stop(None)  # type: ignore[arg-type]
    await sign_in(client)
    async with client.get("/v1/console?watch=true") as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
        line = await r.content.readline()
        first = json.loads(line.removeprefix(b"data: "))
        assert first["type"] == "state" and len(first["nodes"]) == 2


def test_a_history_sample_keeps_the_figures_overall_and_per_label() -> None:
    pool = {"allocatable": {"cpu_m": 8000, "memory": 1}, "requested": {"cpu_m": 100, "memory": 2},
            "limits": {"cpu_m": 500, "memory": 3}, "free": {"cpu_m": 1, "memory": 1},
            "by_label": {"room": {"r1": {"allocatable": {"cpu_m": 4000, "memory": 1},
                                         "used": {"cpu_m": 7, "memory": 9}}}}}
    point = sample(pool, 5.0)
    assert point == {"at": 5.0, "allocatable": pool["allocatable"],
                     "requested": pool["requested"], "limits": pool["limits"],
                     "by_label": {"room": {"r1": {"allocatable": {"cpu_m": 4000, "memory": 1},
                                                  "used": {"cpu_m": 7, "memory": 9}}}}}


async def test_history_is_a_bounded_ring(ui: Any) -> None:
    _, lead = ui
    feed = Feed(lead.cache, history=3)
    for _ in range(5):
        feed.take_sample()
    assert len(feed.history) == 3
    assert state(lead.cache)["pool"]["nodes"] == 2


async def test_bearer_tokens_still_work_beside_a_cookie(ui: Any) -> None:
    client, _ = ui
    async with client.get("/v1/console/history", headers=ADMIN) as r:
        assert r.status == 200
        assert (await r.json())["every"] == 15.0
