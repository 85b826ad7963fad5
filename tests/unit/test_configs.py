"""The config center on fakes: the spec's `configs:`/`env_from:`, the checks of a version,
the API (versions, history, rollback, delete refused while in use, 400s naming the field),
the leader's side (no start before the files are in place, on_change, env_from) and the
agent's atomic delivery on a real directory."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from sigmad import configs
from sigmad.configs import ConfigsHeld, ConfigVersion, checksum
from sigmad.errors import SpecError
from sigmad.node.configs import ConfigKeeper, install, on_disk
from sigmad.spec import validate
from tests.fakes.store import MemoryStore
from tests.unit.harness import Leader, call, spec

BASE = {"app": "web", "containers": [{"name": "main", "image": "busybox"}]}


def spec_error(**overrides: object) -> SpecError:
    with pytest.raises(SpecError) as info:
        validate({**BASE, **overrides})
    return info.value


def test_configs_and_env_from_parse() -> None:
    s = validate({**BASE, "configs": [
        {"name": "web-conf", "mount": "/etc/web/", "version": 3, "on_change": "signal:SIGHUP"},
        {"name": "other", "mount": "/etc/other"}],
        "env_from": [{"config": "web-env", "file": "env"}]})
    assert [(c.name, c.mount, c.version, c.on_change) for c in s.configs] == [
        ("web-conf", "/etc/web", 3, "signal:SIGHUP"), ("other", "/etc/other", 0, "none")]
    assert [(e.config, e.file) for e in s.env_from] == [("web-env", "env")]
    assert configs.used_names(s) == {"web-conf": 3, "other": 0, "web-env": 0}


@pytest.mark.parametrize(("overrides", "field"), [
    ({"configs": {"name": "c"}}, "configs"),
    ({"configs": [{"mount": "/etc/c"}]}, "configs[0].name"),
    ({"configs": [{"name": "C!", "mount": "/etc/c"}]}, "configs[0].name"),
    ({"configs": [{"name": "c"}]}, "configs[0].mount"),
    ({"configs": [{"name": "c", "mount": "etc/c"}]}, "configs[0].mount"),
    ({"configs": [{"name": "c", "mount": "/proc/x"}]}, "configs[0].mount"),
    ({"configs": [{"name": "c", "mount": "/etc/c", "version": 0}]}, "configs[0].version"),
    ({"configs": [{"name": "c", "mount": "/etc/c", "version": "newest"}]},
     "configs[0].version"),
    ({"configs": [{"name": "c", "mount": "/etc/c", "version": True}]}, "configs[0].version"),
    ({"configs": [{"name": "c", "mount": "/etc/c", "on_change": "signal:SIGFOO"}]},
     "configs[0].on_change"),
    ({"configs": [{"name": "c", "mount": "/etc/c", "mode": 1}]}, "configs[0].mode"),
    ({"configs": [{"name": "c", "mount": "/etc/c"}, {"name": "c", "mount": "/etc/d"}]},
     "configs[1].name"),
    ({"configs": [{"name": "c", "mount": "/etc/c"}, {"name": "d", "mount": "/etc/c/d"}]},
     "configs[1].mount"),
    ({"env_from": [{"config": "c"}]}, "env_from[0].file"),
    ({"env_from": [{"config": "c", "file": "../env"}]}, "env_from[0].file"),
    ({"env_from": [{"file": "env"}]}, "env_from[0].config"),
    ({"env_from": "c"}, "env_from"),
])
def test_bad_configs_are_refused_naming_the_field(overrides: dict[str, Any],
                                                   field: str) -> None:
    assert spec_error(**overrides).field == field


@pytest.mark.parametrize(("files", "fmt", "field"), [
    ({"a.json": "{"}, "json", "files.a.json"),
    ({"a.yaml": "a: [1,"}, "yaml", "files.a.yaml"),
    ({"a.yaml": "a: &x 1\nb: *x\n"}, "yaml", "files.a.yaml"),
    ({"a.ini": "no section\n"}, "ini", "files.a.ini"),
    ({"env": "GOOD=1\nnot a line\n"}, "env", "files.env"),
    ({"..data": "x"}, "", "files.'..data'"),
    ({"a/b": "x"}, "", "files.'a/b'"),
    ({"a": 1}, "", "files.a"),
    ({}, "", "files"),
    ({"a": "x" * (configs.MAX_VERSION_BYTES + 1)}, "", "files"),
    ({"a": "x"}, "toml", "format"),
])
def test_bad_files_are_refused_naming_the_file(files: dict[str, Any], fmt: str,
                                               field: str) -> None:
    with pytest.raises(SpecError) as info:
        configs.check_files(files, fmt)
    assert info.value.field == field


def test_env_files_and_the_versions_kept() -> None:
    assert configs.env_vars("f", "# c\nA=1\nexport B='two words'\n\nC=\"x=y\"\n") == {
        "A": "1", "B": "two words", "C": "x=y"}
    keep, dropped = configs.kept(list(range(1, 21)), 21, set())
    assert keep == list(range(2, 22)) and dropped == [1]
    keep, dropped = configs.kept(list(range(1, 21)), 21, {1})  # pinned: kept beyond 20
    assert keep == list(range(1, 22)) and dropped == []


def test_reloads_take_only_what_is_delivered() -> None:
    s = validate({**BASE, "configs": [{"name": "a", "mount": "/a", "on_change": "signal:SIGHUP"},
                                      {"name": "b", "mount": "/b", "on_change": "restart"}]})
    have, changes = configs.reloads(s, {"a": 2, "b": 1}, {"a": 1, "b": 1}, {"a": 1, "b": 1})
    assert have == {"a": 1, "b": 1} and changes == []  # v2 not delivered yet
    have, changes = configs.reloads(s, {"a": 2, "b": 5}, {"a": 2, "b": 5}, {"a": 1, "b": 1})
    assert have == {"a": 2, "b": 5}
    assert changes == [configs.Change("a", 2, "signal:SIGHUP"), configs.Change("b", 5, "restart")]


# -- the API ---------------------------------------------------------------------------------


@pytest.fixture
async def api() -> AsyncIterator[tuple[TestClient, Leader]]:
    async with Leader() as lead, lead.client() as client:
        yield client, lead


def configured(name: str = "web", mount: str = "/etc/web", on_change: str = "signal:SIGHUP",
               replicas: int = 2, version: str = "latest", env: bool = False,
               **extra: str) -> str:
    text = spec(name, replicas, **extra) + (
        f"configs:\n  - {{name: web-conf, mount: {mount}, version: {version}, "
        f"on_change: '{on_change}'}}\n")
    if env:
        text += "env_from:\n  - {config: web-env, file: env}\n"
    return text


async def test_versions_history_rollback_and_delete(api: tuple[TestClient, Leader]) -> None:
    client, lead = api
    path = "/v1/configs/default/web-conf"
    status, made = await call(client, "POST", path, {"files": {"a.yaml": "v: 1\n"},
                                                     "format": "yaml", "comment": "first"})
    assert status == 201 and made["action"] == "created" and made["version"] == 1
    status, same = await call(client, "POST", path, {"files": {"a.yaml": "v: 1\n"},
                                                     "format": "yaml"})
    assert same["action"] == "unchanged" and same["version"] == 1
    status, second = await call(client, "POST", path, {"files": {"a.yaml": "v: 2\n"},
                                                       "format": "yaml"})
    assert second["version"] == 2
    status, history = await call(client, "GET", f"{path}/versions")
    assert [v["version"] for v in history["items"]] == [2, 1]
    assert history["items"][1]["comment"] == "first"
    assert history["items"][1]["author"] == "bootstrap" or history["items"][1]["author"]
    status, back = await call(client, "POST", f"{path}/rollback", {})
    assert back["version"] == 3
    status, v3 = await call(client, "GET", f"{path}/versions/3")
    assert v3["files"] == {"a.yaml": "v: 1\n"} and v3["sha256"] == checksum(v3["files"])
    assert (await call(client, "PUT", "/v1/apps", configured()))[0] == 200
    status, refused = await call(client, "DELETE", path)
    assert status == 409 and "default/web" in refused["error"]["message"]
    assert (await call(client, "DELETE", "/v1/apps/default/web"))[0] == 202
    await lead.until(lambda: lead.cache.app("default/web") is None)
    status, gone = await call(client, "DELETE", path)
    assert status == 200 and gone["action"] == "deleted"
    assert not [k for k in lead.store.data if "/configs/" in k or "/config-heads/" in k]


async def test_bad_inputs_are_400s_naming_the_field_and_write_nothing(
        api: tuple[TestClient, Leader]) -> None:
    client, lead = api
    path = "/v1/configs/default/web-conf"
    for body, field in [
        ({"files": {"a.json": "{"}, "format": "json"}, "files.a.json"),
        ({"files": {"a": "x"}, "format": "xml"}, "format"),
        ({"files": {"a": "x"}, "colour": 1}, "colour"),
        ({"files": {"a": "x"}, "comment": 5}, "comment"),
        ({"files": []}, "files"),
    ]:
        status, answer = await call(client, "POST", path, body)
        assert status == 400 and answer["error"]["field"] == field, (body, answer)
    status, answer = await call(client, "POST", "/v1/configs/default/Bad_Name",
                                {"files": {"a": "x"}})
    assert status == 400 and answer["error"]["field"] == "name"
    status, answer = await call(client, "PUT", "/v1/apps", configured())
    assert status == 400 and answer["error"]["field"] == "configs[0].name"
    await call(client, "POST", path, {"files": {"a": "x"}})
    status, answer = await call(client, "PUT", "/v1/apps", configured(version="7"))
    assert status == 400 and answer["error"]["field"] == "configs[0].version"
    status, answer = await call(client, "PUT", "/v1/apps", configured(env=True))
    assert status == 400 and answer["error"]["field"] == "env_from[0].config"
    assert not [k for k in lead.store.data if "/apps/" in k]


async def test_an_operator_changes_configs_of_its_namespaces_only(
        api: tuple[TestClient, Leader]) -> None:
    client, _ = api
    status, made = await call(client, "POST", "/v1/tokens",
                              {"name": "ops", "role": "operator", "namespaces": ["a"]})
    op = {"Authorization": f"Bearer {made['token']}"}
    assert (await call(client, "POST", "/v1/configs/a/c", {"files": {"x": "1"}}, op))[0] == 201
    status, _refused = await call(client, "POST", "/v1/configs/b/c", {"files": {"x": "1"}}, op)
    assert status == 403
    assert (await call(client, "DELETE", "/v1/configs/a/c", None, op))[0] == 200


# -- the leader's side -----------------------------------------------------------------------


async def held(lead: Leader, node: str, key: str, versions: dict[str, int]) -> None:
    """What the agent of `node` writes once it has `versions` in place for `key`."""
    await lead.store.put(lead.store.keys.config_held(node, key),
                         ConfigsHeld(key, node, versions))


async def new_version(client: TestClient, text: str, dry_run: bool = False) -> dict[str, Any]:
    status, answer = await call(client, "POST", "/v1/configs/default/web-conf" +
                                ("?dry_run=true" if dry_run else ""), {"files": {"a": text}})
    assert status in (200, 201), answer
    return answer  # type: ignore[no-any-return]


async def test_no_start_before_the_files_are_in_place_then_signal_on_a_new_version(
        api: tuple[TestClient, Leader]) -> None:
    client, lead = api
    await lead.add_node("a")
    await new_version(client, "one")
    await call(client, "PUT", "/v1/apps", configured(replicas=2, update="{min_ready: 1}"))
    await lead.until(lambda: all(i.reason.startswith("waiting for configs web-conf v1")
                                 for i in lead.instances("web")) and lead.instances("web"))
    assert not lead.engine("a").by_id  # nothing created before the files are there
    for i in lead.instances("web"):
        await held(lead, "a", i.key, {"web-conf": 1})
    found = await lead.running("web", 2)
    assert all(i.configs == {"web-conf": 1} == i.configs_have for i in found)
    mounts = [m for c in lead.engine("a").by_id.values() for m in
              c.config["HostConfig"]["Mounts"]]
    assert {(m["Target"], m["ReadOnly"]) for m in mounts} == {("/etc/web", True)}
    ids = {c.id for c in lead.engine("a").running()}
    dry = await new_version(client, "two", dry_run=True)
    assert dry["instances"] == ["default/web-0", "default/web-1"] and dry["version"] == 2
    assert lead.instances("web")[0].configs == {"web-conf": 1}  # a dry run writes nothing
    await new_version(client, "two")
    # One at a time (update.max_parallel: 1): web-1 waits until web-0 runs on v2.
    await lead.until(lambda: lead.instances("web")[0].configs == {"web-conf": 2})
    await asyncio.sleep(0.3)
    assert lead.instances("web")[1].configs == {"web-conf": 1}
    assert not [c for c in lead.engine("a").calls if c[0] == "kill"]  # not delivered yet
    web0 = lead.instances("web")[0]
    await held(lead, "a", web0.key, {"web-conf": 2})
    await lead.until(lambda: lead.instances("web")[0].configs_have == {"web-conf": 2})
    kills = [c for c in lead.engine("a").calls if c[0] == "kill"]
    assert kills == [("kill", f"{web0.containers[0].id} SIGHUP")]
    # No readiness probe: web-0's reload counts once it ran min_ready (1s) after the signal.
    assert lead.instances("web")[0].reloaded_at > 0
    await asyncio.sleep(0.5)
    assert lead.instances("web")[1].configs == {"web-conf": 1}
    await lead.until(lambda: lead.instances("web")[1].configs == {"web-conf": 2})
    assert lead.instances("web")[0].reloaded_at == 0  # checked
    assert lead.instances("web")[1].configs_have == {"web-conf": 1}  # its batch is next
    assert {c.id for c in lead.engine("a").running()} == ids  # the same containers


async def test_restart_makes_the_containers_anew(api: tuple[TestClient, Leader]) -> None:
    client, lead = api
    await lead.add_node("a")
    await new_version(client, "one")
    await call(client, "PUT", "/v1/apps", configured(replicas=1, on_change="restart"))
    await lead.until(lambda: lead.instances("web"))
    key = lead.instances("web")[0].key
    await held(lead, "a", key, {"web-conf": 1})
    (first,) = await lead.running("web", 1)
    await new_version(client, "two")
    await held(lead, "a", key, {"web-conf": 2})
    await lead.until(lambda: lead.instances("web")[0].configs_have == {"web-conf": 2} and
                     lead.instances("web")[0].state == "Running" and
                     lead.instances("web")[0].containers[0].id != first.containers[0].id)


async def test_env_from_reaches_the_environment_and_a_new_version_makes_containers_anew(
        api: tuple[TestClient, Leader]) -> None:
    client, lead = api
    await lead.add_node("a")
    await new_version(client, "one")
    _status, _ = await call(client, "POST", "/v1/configs/default/web-env",
                           {"files": {"env": "COLOUR=blue\nSIZE=3\n"}, "format": "env"})
    await call(client, "PUT", "/v1/apps", configured(replicas=1, env=True))
    await lead.until(lambda: lead.instances("web"))
    key = lead.instances("web")[0].key
    await held(lead, "a", key, {"web-conf": 1, "web-env": 1})
    (_first,) = await lead.running("web", 1)
    (made,) = lead.engine("a").by_id.values()
    assert {"COLOUR=blue", "SIZE=3"} <= set(made.config["Env"])
    template = lead.cache.app("default/web").value.template_generation  # type: ignore[union-attr]
    await call(client, "POST", "/v1/configs/default/web-env", {"files": {"env": "COLOUR=red\n"},
                                                               "format": "env"})
    app = lead.cache.app("default/web").value  # type: ignore[union-attr]
    assert app.template_generation > template and app.configs["web-env"] == 2
    await held(lead, "a", key, {"web-conf": 1, "web-env": 2})
    await lead.until(lambda: lead.instances("web")[0].state == "Running" and
                     lead.instances("web")[0].generation == app.template_generation)
    env = [c.config["Env"] for c in lead.engine("a").running()]
    assert len(env) == 1 and "COLOUR=red" in env[0]


# -- the agent's delivery --------------------------------------------------------------------


def version(number: int, files: dict[str, str]) -> ConfigVersion:
    return ConfigVersion("default", "web-conf", number, files, checksum(files))


def test_install_swaps_every_file_at_once_and_keeps_what_is_right(tmp_path: Path) -> None:
    d = tmp_path / "c"
    assert install(d, version(1, {"a": "old a", "b": "old b"}))
    assert (d / "a").read_text() == "old a" and os.readlink(d / "a") == "..data/a"
    first = os.readlink(d / "..data")
    assert not install(d, version(1, {"a": "old a", "b": "old b"}))  # in place: kept
    assert os.readlink(d / "..data") == first
    assert install(d, version(2, {"a": "new a", "c": "new c"}))
    assert {p.name for p in d.iterdir() if not p.name.startswith("..")} == {"a", "c"}
    assert (d / "a").read_text() == "new a" and on_disk(d)[0] == 2
    assert [p.name for p in d.iterdir() if p.name.startswith("..v")] == \
        [os.readlink(d / "..data")]  # the old version's directory is gone
    # A file changed behind the agent's back (or a partial write) fails the checksum: rebuilt.
    (d / os.readlink(d / "..data") / "a").write_text("tampered")
    assert install(d, version(2, {"a": "new a", "c": "new c"}))
    assert (d / "a").read_text() == "new a"


async def test_a_restarted_agent_rebuilds_from_etcd_and_says_what_it_holds(
        tmp_path: Path) -> None:
    from sigmad.models import Instance
    store = MemoryStore("/t")
    keys = store.keys
    await store.put(keys.config_version("default", "web-conf", 1), version(1, {"a": "one"}))
    inst = Instance("default", "web", 0, 1, node="n1", configs={"web-conf": 1})
    await store.put(keys.instance("default", "web", 0), inst)
    other = Instance("default", "web", 1, 1, node="n2", configs={"web-conf": 1})
    await store.put(keys.instance("default", "web", 1), other)
    (tmp_path / "default" / "gone-0" / "x").mkdir(parents=True)  # an instance that left
    keeper = ConfigKeeper("n1", str(tmp_path), store)
    task = asyncio.create_task(keeper.run())
    try:
        for _ in range(200):
            v = await store.get(keys.config_held("n1", "default/web-0"), ConfigsHeld)
            if v is not None:
                break
            await asyncio.sleep(0.01)
        assert v is not None and v.value.versions == {"web-conf": 1}
        assert (tmp_path / "default" / "web-0" / "web-conf" / "a").read_text() == "one"
        assert not (tmp_path / "default" / "web-1").exists()  # not this node's
        for _ in range(200):  # (removed in the same sync, after the held record is written)
            if not (tmp_path / "default" / "gone-0").exists():
                break
            await asyncio.sleep(0.01)
        assert not (tmp_path / "default" / "gone-0").exists()
        await store.put(keys.config_version("default", "web-conf", 2), version(2, {"a": "two"}))
        inst.configs = {"web-conf": 2}
        await store.put(keys.instance("default", "web", 0), inst)
        for _ in range(200):
            v = await store.get(keys.config_held("n1", "default/web-0"), ConfigsHeld)
            if v is not None and v.value.versions == {"web-conf": 2}:
                break
            await asyncio.sleep(0.01)
        assert (tmp_path / "default" / "web-0" / "web-conf" / "a").read_text() == "two"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
