"""API handlers on fakes (aiohttp's test client, the in-memory store and its cache): reads
answered from the cache, writes checked before anything is written, errors with the field."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from sigmad.models import AppRecord
from tests.unit.harness import ADMIN, Leader, call, spec


@pytest.fixture
async def api() -> AsyncIterator[tuple[TestClient, Leader]]:
    async with Leader() as lead, lead.client() as client:
        yield client, lead




async def test_apply_then_read_it_back_from_the_cache(api: tuple[TestClient, Leader]) -> None:
    client, lead = api
    await lead.add_node("a", labels={"zone": "z1"})
    status, body = await call(client, "PUT", "/v1/apps", spec(replicas=2))
    assert status == 200 and body["items"] == [
        {"app": "default/web", "action": "created", "generation": 1}]
    status, app = await call(client, "GET", "/v1/apps/default/web")  # read-your-writes
    assert status == 200 and app["replicas"] == 2
    await lead.running("web", 2)
    status, listed = await call(client, "GET", "/v1/instances?app=web")
    assert [(i["name"], i["state"]) for i in listed["items"]] == [("web-0", "Running"),
                                                                  ("web-1", "Running")]
    status, one = await call(client, "GET", "/v1/instances/default/web-1")
    assert one["name"] == "web-1" and one["ip"] == listed["items"][1]["ip"]
    status, node = await call(client, "GET", "/v1/nodes/a")
    assert node["status"] == "Ready" and node["instances"] == 2 and node["heartbeat"] == "ok"
    assert node["requested"] == {"cpu_m": 200, "memory": 128 << 20}
    assert node["free"]["cpu_m"] == 4000 - 200
    status, pool = await call(client, "GET", "/v1/pool")
    assert pool["requested"] == node["requested"] and pool["instances"] == 2
    assert pool["by_label"]["zone"]["z1"]["limits"] == {"cpu_m": 1000, "memory": 256 << 20}


async def test_a_node_says_why_it_is_not_ready(api: tuple[TestClient, Leader]) -> None:
    client, lead = api
    await lead.add_node("a")
    await lead.beat("a", engine=False)  # its agent is alive, its engine does not answer
    await lead.until(lambda: "a" not in lead.cache.ready)
    status, node = await call(client, "GET", "/v1/nodes/a")
    assert status == 200
    assert (node["status"], node["heartbeat"]) == ("NotReady", "engine not answering")
    await lead.lose_node("a")
    await lead.until(lambda: "a" not in lead.cache.alive)
    status, node = await call(client, "GET", "/v1/nodes/a")
    assert status == 200 and (node["status"], node["heartbeat"]) == ("NotReady", "lapsed")


async def test_every_bad_input_is_a_400_naming_the_field(api: tuple[TestClient, Leader]) -> None:
    client, lead = api
    status, body = await call(client, "PUT", "/v1/apps", spec().replace("128Mi", "8GG"))
    assert status == 400 and body["error"]["field"] == "containers[0].resources.limit.memory"
    status, body = await call(client, "GET", "/v1/instances/default/web")
    assert status == 400 and body["error"]["field"] == "name"
    status, body = await call(client, "POST", "/v1/apps/default/web/resources", {"limit": {}})
    assert status == 404  # no such app yet
    await call(client, "PUT", "/v1/apps", spec())
    status, body = await call(client, "POST", "/v1/apps/default/web/resources",
                              {"limit": {"cpu": "lots"}})
    assert status == 400 and body["error"]["field"] == "limit.cpu"
    status, body = await call(client, "POST", "/v1/apps/default/web/resources", "not json")
    assert status == 400
    status, body = await call(client, "GET", "/v1/apps", headers={})
    assert status == 401
    assert len(lead.cache.apps()) == 1  # nothing else was written


async def test_a_resize_that_does_not_fit_writes_nothing(api: tuple[TestClient, Leader]) -> None:
    client, lead = api
    await lead.add_node("a", cpu_m=1000)
    await call(client, "PUT", "/v1/apps", spec(replicas=2))
    await lead.running("web", 2)
    before = lead.cache.app("default/web")
    status, body = await call(client, "POST", "/v1/apps/default/web/resources",
                              {"request": {"cpu": "600m"}, "limit": {"cpu": "1"}})
    assert status == 409 and "does not fit on node a" in body["error"]["message"]
    assert lead.cache.app("default/web") is before
    status, body = await call(client, "POST", "/v1/apps/default/web/resources",
                              {"limit": {"cpu": "2", "memory": "1Gi"}})
    assert status == 200 and body == {"app": "default/web", "action": "resized in place",
                                      "generation": 2, "containers": 2}
    rec = lead.cache.app("default/web")
    assert isinstance(rec.value, AppRecord) and rec.value.template_generation == 1  # type: ignore[union-attr]


async def test_migrate_needs_a_lost_node_and_a_known_target(api: tuple[TestClient, Leader]
                                                             ) -> None:
    client, lead = api
    await lead.add_node("a")
    await call(client, "PUT", "/v1/apps", spec(replicas=1, migration="manual"))
    await lead.running("web", 1)
    status, body = await call(client, "POST", "/v1/instances/default/web-0/migrate", {})
    assert status == 409 and "not NeedMigration" in body["error"]["message"]
    await lead.lose_node("a")
    await lead.until(lambda: lead.instances()[0].state == "NeedMigration")
    status, body = await call(client, "POST", "/v1/instances/default/web-0/migrate",
                              {"to": "nowhere"})
    assert status == 404
    await lead.add_node("b")
    await lead.until(lambda: lead.instances()[0].fence)  # a's engine stopped the old copy
    status, body = await call(client, "POST", "/v1/instances/default/web-0/migrate",
                              {"to": "b"})
    assert status == 200 and body["state"] == "Pending" and body["target"] == "b"
    (inst,) = await lead.running("web", 1)
    assert inst.node == "b"


async def test_reads_are_refused_while_the_cache_has_lost_etcd(api: tuple[TestClient, Leader]
                                                               ) -> None:
    client, lead = api
    await lead.store.break_watches()
    await lead.until(lambda: lead.cache.stale_for() > 0)
    lead.cache.broken_since -= 5  # as if it had been gone for a while
    status, body = await call(client, "GET", "/v1/apps")
    assert status == 503 and body["error"]["code"] == "store_unavailable"
    await lead.store.put("/t/nodes/x", {"name": "x", "engine": "fake://x"})
    await lead.until(lambda: lead.cache.stale_for() == 0)
    assert (await call(client, "GET", "/v1/apps"))[0] == 200
    await asyncio.sleep(0)


async def test_a_list_shows_each_record_as_it_is_now(api: tuple[TestClient, Leader]) -> None:
    """Lists reuse each instance's JSON while its record is unchanged, never after."""
    client, lead = api
    await lead.add_node("a")
    await call(client, "PUT", "/v1/apps", spec(replicas=2, migration="manual"))
    await lead.running("web", 2)
    status, before = await call(client, "GET", "/v1/instances")
    assert status == 200 and {i["state"] for i in before["items"]} == {"Running"}
    await lead.lose_node("a")
    await lead.until(lambda: {i.state for i in lead.instances()} == {"NeedMigration"})
    status, after = await call(client, "GET", "/v1/instances")
    assert {i["state"] for i in after["items"]} == {"NeedMigration"}
    await call(client, "DELETE", "/v1/apps/default/web")
    await lead.until(lambda: not lead.instances())
    status, gone = await call(client, "GET", "/v1/instances")
    assert status == 200 and gone["items"] == []


async def raw(client: TestClient, method: str, path: str, data: bytes) -> tuple[int, Any]:
    async with client.request(method, path, data=data, headers=ADMIN) as r:
        return r.status, await r.json()


async def test_hostile_bodies_and_paths_are_400s_naming_the_field(
        api: tuple[TestClient, Leader]) -> None:
    """Each of issue 16's bad inputs that answered 500 (or was accepted) is a 4xx now, and
    nothing is written."""
    client, lead = api
    await call(client, "PUT", "/v1/apps", spec())
    before = lead.cache.app("default/web")
    cases: list[tuple[str, str, bytes, int, str | None, str]] = [
        ("PUT", "/v1/apps", spec().encode() + b"x: \xff\xfe\n", 400, "body", "not UTF-8 text"),
        ("PUT", "/v1/apps", spec().encode() + b"x: &a [1]\nnamespace: *a\n", 400, "namespace",
         "is a YAML alias"),
        ("PUT", "/v1/apps", spec().encode() + b"replicas: " + b"9" * 4301 + b"\n", 400,
         "replicas", "too large"),
        ("PUT", "/v1/apps", spec().encode() + b"env: " + b"[" * 500 + b"]" * 500 + b"\n",
         400, "spec", "nested deeper"),
        ("PUT", "/v1/apps", spec().replace("app: web", 'app: "web\\n"').encode(), 400, "app",
         "is not a valid name"),
        ("PUT", "/v1/apps", spec().replace("image: img", "image: Img").encode(), 400,
         "containers[0].image", "is not an image reference"),
        ("PUT", "/v1/apps", b"---\n".join(spec(app=f"a{i}").encode() for i in range(129)),
         400, "spec", "more than 100 documents"),
        ("PUT", "/v1/apps", b"app: " + b"x" * (1 << 20) + b"\n", 413, "body", ""),
        ("POST", "/v1/apps/default/web/resources", b"[" * 100_000 + b"]" * 100_000, 400, "body",
         "must be a JSON object"),
        ("POST", "/v1/apps/default/web/resources", b'{"limit": {"memory": 1' + b"0" * 5000
         + b"}}", 400, "body", "must be a JSON object"),
        ("POST", "/v1/apps/default/web/resources", b'{"limit": {"memory": "\xff"}}', 400,
         "body", "not UTF-8 text"),
        ("POST", "/v1/apps/default/web/resources", b'{"limit": {"memory": 1e999}}', 400,
         "limit.memory", "is not a size"),
        ("POST", "/v1/apps/default/web/resources", b'{"limit": {"cpu": ' + b"9" * 40 + b"}}",
         400, "limit.cpu", "too large"),
        ("GET", "/v1/instances/default/web-\u00b2", b"", 400, "name",
         "is not an instance name"),
        ("GET", "/v1/instances/default/web-99999999999999999999", b"", 400, "name",
         "is not an instance name"),
    ]
    for method, path, data, status, field, message in cases:
        got, body = await raw(client, method, path, data)
        assert got == status, (path, data[:60], body)
        assert body["error"]["field"] == field, (path, data[:60], body)
        assert message in body["error"]["message"], (path, data[:60], body)
    assert lead.cache.app("default/web") is before  # nothing was written
    assert list(lead.cache.apps()) == ["/t/apps/default/web"]


async def test_bodies_are_parsed_off_the_serving_loop(api: tuple[TestClient, Leader],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The spec parser and the JSON decoder run on a parser thread: a big body never holds
    up the loop that serves every other request."""
    import threading

    from sigmad import spec as spec_module
    from sigmad.api import routes

    client, lead = api
    threads: list[int] = []

    def spy(parse: Any) -> Any:
        def parsed(text: str) -> Any:
            threads.append(threading.get_ident())
            return parse(text)
        return parsed

    monkeypatch.setattr(spec_module, "parse", spy(spec_module.parse))
    monkeypatch.setattr(routes, "_json_object", spy(routes._json_object))
    await lead.add_node("a")
    assert (await call(client, "PUT", "/v1/apps", spec()))[0] == 200
    assert (await call(client, "POST", "/v1/apps/default/web/resources",
                       {"limit": {"cpu": "1"}}))[0] == 200
    assert len(threads) == 2 and threading.get_ident() not in threads


async def test_an_update_that_adds_or_drops_a_container_is_not_a_500(
        api: tuple[TestClient, Leader]) -> None:
    """Found by the API fuzz: counting the caps that change zipped the old and new
    containers, and a spec with another number of them crashed the apply."""
    client, _ = api
    assert (await call(client, "PUT", "/v1/apps", spec()))[0] == 200
    two = spec() + "  - name: side\n    image: img\n"
    status, body = await call(client, "PUT", "/v1/apps", two)
    assert status == 200 and body["items"][0]["action"] == "updated", body
    status, body = await call(client, "PUT", "/v1/apps", spec())
    assert status == 200 and body["items"][0]["action"] == "updated", body
