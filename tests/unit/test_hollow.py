"""The hollow engine's model (sigmad.lab.hollow) and its HTTP server, through sigma's own
engine client: what dockerd 20.10 answers, event order, validation, scripted containers and
the fault switches. tests/integration/test_hollow_compare.py checks the shapes against a real
dockerd."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from sigmad.engine import DockerEngine, EnginePool
from sigmad.errors import EngineError
from sigmad.lab.hollow import UNSET_TIME, ApiError, Capacity, HollowEngine, rfc3339
from sigmad.lab.hollow_engine import EngineServer, event_filter, parse_filters

IMAGE = "sigma/busybox:latest"


def engine() -> tuple[HollowEngine, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    e = HollowEngine(Capacity(2, 4 << 30), emit=events.append)
    e.add_image(IMAGE)
    return e, events


def body(**extra: Any) -> dict[str, Any]:
    return {"Image": IMAGE, "Cmd": ["sleep", "100"], "Labels": {"app": "web"}, **extra}


def actions(events: list[dict[str, Any]]) -> list[str]:
    return [e["Action"] for e in events]


def test_create_conflict_and_missing_image_answer_like_dockerd() -> None:
    e, events = engine()
    cid = e.create("web", body())["Id"]
    assert len(cid) == 64
    with pytest.raises(ApiError) as conflict:
        e.create("web", body())
    assert conflict.value.status == 409
    assert conflict.value.message == (
        f'Conflict. The container name "/web" is already in use by container "{cid}". You '
        "have to remove (or rename) that container to be able to reuse that name.")
    with pytest.raises(ApiError) as missing:
        e.create("other", body(Image="nope"))
    assert (missing.value.status, missing.value.message) == (404, "No such image: nope:latest")
    with pytest.raises(ApiError) as bad:
        e.create("x y", body())
    assert bad.value.status == 400
    with pytest.raises(ApiError) as no_cmd:
        e.create("nocmd", {"Image": IMAGE, "Cmd": []})
    assert no_cmd.value.status == 400 and no_cmd.value.message == "No command specified"
    assert actions(events) == ["create"]
    assert events[0]["Actor"]["Attributes"] == {"app": "web", "image": IMAGE, "name": "web"}


def test_lookup_by_id_name_and_prefix() -> None:
    e, _ = engine()
    cid = e.create("web", body())["Id"]
    assert e.get(cid) is e.get("web") is e.get("/web") is e.get(cid[:10])
    with pytest.raises(ApiError) as gone:
        e.get("nosuch")
    assert (gone.value.status, gone.value.message) == (404, "No such container: nosuch")


def test_life_cycle_states_events_and_inspect_shape() -> None:
    e, events = engine()
    cid = e.create("web", body(HostConfig={"NetworkMode": "default"}))["Id"]
    state = json.loads(e.inspect(cid))["State"]
    assert state["Status"] == "created" and state["StartedAt"] == UNSET_TIME
    assert e.start(cid) is True
    assert e.start(cid) is False  # 304
    data = json.loads(e.inspect(cid))
    assert data["State"]["Running"] and data["State"]["Pid"] > 0
    assert data["State"]["FinishedAt"] == UNSET_TIME
    assert data["Name"] == "/web" and data["Config"]["Cmd"] == ["sleep", "100"]
    assert data["NetworkSettings"]["Networks"]["bridge"]["IPAddress"].startswith("172.17.")
    assert e.stop(cid) is True
    assert e.stop(cid) is False  # 304
    data = json.loads(e.inspect(cid))
    assert data["State"]["Status"] == "exited" and data["State"]["ExitCode"] == 143
    assert data["State"]["FinishedAt"] != UNSET_TIME
    with pytest.raises(ApiError) as not_running:
        e.kill(cid)
    assert not_running.value.status == 409
    e.remove(cid)
    assert actions(events) == ["create", "start", "kill", "die", "stop", "destroy"]
    assert events[3]["Actor"]["Attributes"]["exitCode"] == "143"
    assert events[2]["Actor"]["Attributes"]["signal"] == "15"


def test_remove_running_needs_force() -> None:
    e, events = engine()
    cid = e.create("web", body())["Id"]
    e.start(cid)
    with pytest.raises(ApiError) as running:
        e.remove(cid)
    assert running.value.status == 409 and "Stop the container" in running.value.message
    e.remove(cid, force=True)
    assert actions(events)[-3:] == ["kill", "die", "destroy"]
    assert "web" not in [c.name for c in e.containers.values()]
    e.create("web", body())  # the name is free again


def test_update_validates_like_dockerd() -> None:
    e, events = engine()
    cid = e.create("web", body(HostConfig={"Memory": 64 << 20, "MemorySwap": 64 << 20}))["Id"]
    refused = [
        ({"Memory": 1 << 20}, "Minimum memory limit allowed is 6MB"),
        ({"Memory": 128 << 20, "MemorySwap": 100 << 20},
         "Minimum memoryswap limit should be larger than memory limit, see usage"),
        ({"NanoCpus": 3_000_000_000},
         "Range of CPUs is from 0.01 to 2.00, as there are only 2 CPUs available"),
    ]
    for change, message in refused:
        with pytest.raises(ApiError) as exc:
            e.update(cid, change)
        assert (exc.value.status, exc.value.message) == (400, message)
    with pytest.raises(ApiError) as above_swap:
        e.update(cid, {"Memory": 128 << 20})
    assert (above_swap.value.status, above_swap.value.message) == (
        409, f"Cannot update container {cid}: Memory limit should be smaller than already set "
        "memoryswap limit, update the memoryswap at the same time")
    assert e.update(cid, {"Memory": 128 << 20, "MemorySwap": 128 << 20, "NanoCpus": 10**9,
                          "CpuQuota": -1}) == {"Warnings": None}
    host = json.loads(e.inspect(cid))["HostConfig"]
    assert (host["Memory"], host["NanoCpus"], host["CpuQuota"]) == (128 << 20, 10**9, -1)
    assert actions(events) == ["create", "update"]


def test_scripted_exit_oom_and_exec() -> None:
    e, events = engine()
    code = e.create("exits", body(Entrypoint=["exit"], Cmd=["3"]))["Id"]
    shell = e.create("shell", body(Cmd=["sh", "-c", "exit 0"]))["Id"]
    oom = e.create("oom", body(Env=["HOLLOW_OOM=1"]))["Id"]
    probe = e.create("probe", body(Env=["HOLLOW_EXEC_EXIT=1", "HOLLOW_MEMORY=5000000"]))["Id"]
    for cid in (code, shell, oom, probe):
        e.start(cid)
    assert json.loads(e.inspect(code))["State"]["ExitCode"] == 3
    assert json.loads(e.inspect(shell))["State"]["Status"] == "exited"
    state = json.loads(e.inspect(oom))["State"]
    assert state["OOMKilled"] and state["ExitCode"] == 137
    assert "oom" in actions(events)
    exec_id = e.exec_create(probe, {"Cmd": ["true"]})["Id"]
    e.exec_start(exec_id)
    view = e.exec_view(exec_id)
    assert view["Running"] is False and view["ExitCode"] == 1
    assert e.stats(probe)["memory_stats"]["usage"] == 5_000_000
    with pytest.raises(ApiError) as stopped:
        e.exec_create(code, {"Cmd": ["true"]})
    assert stopped.value.status == 409


def test_list_filters_and_container_network() -> None:
    e, _ = engine()
    e.create_network({"Name": "sigma", "IPAM": {"Config": [{"Subnet": "10.244.0.0/16",
                                                            "Gateway": "10.244.0.1"}]}})
    owner = e.create("aa", body(
        Labels={"sigma.instance": "ns/a-0", "tier": "x"}, HostConfig={"NetworkMode": "sigma"},
        MacAddress="02:42:0a:f4:00:07",
        NetworkingConfig={"EndpointsConfig": {"sigma": {"IPAMConfig": {
            "IPv4Address": "10.244.0.7"}}}}))["Id"]
    side = e.create("bb", body(Labels={"sigma.instance": "ns/a-0"},
                              HostConfig={"NetworkMode": f"container:{owner}"}))["Id"]
    with pytest.raises(ApiError) as first:
        e.start(side)
    assert first.value.status == 409  # its network owner does not run
    e.start(owner)
    e.start(side)
    e.create("cc", body(Labels={"other": "1"}))
    assert [s["Names"] for s in e.list_containers(True, {"label": ["sigma.instance"]})] == \
        [["/bb"], ["/aa"]]
    assert len(e.list_containers(True, {"label": ["tier=x"]})) == 1
    assert e.list_containers(True, {"label": ["tier=y"]}) == []
    assert len(e.list_containers(False, {})) == 2  # running only
    summary = e.list_containers(True, {"label": ["tier=x"]})[0]
    assert summary["NetworkSettings"]["Networks"]["sigma"]["IPAddress"] == "10.244.0.7"
    assert summary["NetworkSettings"]["Networks"]["sigma"]["MacAddress"] == "02:42:0a:f4:00:07"
    assert summary["State"] == "running" and summary["Status"].startswith("Up ")
    assert list(e.network_view("sigma")["Containers"]) == [owner]
    with pytest.raises(ApiError) as taken:
        e.create_network({"Name": "sigma"})
    assert (taken.value.status, taken.value.message) == (
        409, "network with name sigma already exists")


def test_pull_and_power_loss() -> None:
    e, events = engine()
    e.registry = {"reg/app:1"}
    lines = e.pull("reg/app", "1")
    assert lines[-1] == {"status": "Status: Downloaded newer image for reg/app:1"}
    assert e.image_view("reg/app:1")["RepoTags"] == ["reg/app:1"]
    with pytest.raises(ApiError) as unknown:
        e.pull("reg/nope", "latest")
    assert unknown.value.status == 404 and "manifest unknown" in unknown.value.message
    cid = e.create("web", body())["Id"]
    e.start(cid)
    before = len(events)
    e.power_loss()
    state = json.loads(e.inspect(cid))["State"]
    assert (state["Status"], state["ExitCode"]) == ("exited", 255)
    assert len(events) == before  # nobody was there to send them


def test_rfc3339_nano_like_go() -> None:
    assert rfc3339(0) == UNSET_TIME
    assert rfc3339(1_795_945_963_511_263_107) == "2026-11-29T09:52:43.511263107Z"
    assert rfc3339(1_795_945_963_500_000_000) == "2026-11-29T09:52:43.5Z"
    assert rfc3339(1_795_945_963_000_000_000) == "2026-11-29T09:52:43Z"


def test_event_filters() -> None:
    event = {"Type": "container", "id": "abc", "Action": "exec_start: true ",
             "Actor": {"Attributes": {"name": "web", "k": "v"}}}
    match = event_filter(parse_filters('{"type":["container"],"label":["k=v","k"]}'))
    assert match is not None and match(event)
    no = event_filter(parse_filters('{"label":{"k=w":true}}'))
    assert no is not None and not no(event)
    by_action = event_filter({"event": ["exec_start"], "container": ["web"]})
    assert by_action is not None and by_action(event)
    assert event_filter({}) is None


async def test_served_through_sigmas_engine_client(tmp_path: Path) -> None:
    server = EngineServer(tmp_path / "h1.sock", Capacity(4, 8 << 30), images=(IMAGE,),
                          registry={"reg/app:latest"})
    await server.start()
    client = DockerEngine(server.url, cluster="/c")
    try:
        info = await client.info()
        assert (info["NCPU"], info["MemTotal"], info["SwapLimit"]) == (4, 8 << 30, True)
        assert await client.ensure_network("10.244.0.0/16", "10.244.0.1") is True
        seen: list[str] = []

        async def listen() -> None:
            async for event in client.events({"app": ""}):
                seen.append(event["status"])

        listener = asyncio.create_task(listen())
        await asyncio.sleep(0.05)
        progress: list[str] = []
        await client.ensure_image("reg/app:latest", progress.append)
        assert progress[-1].endswith("Status: Downloaded newer image for reg/app:latest")
        with pytest.raises(EngineError) as unknown:
            await client.ensure_image("reg/nope:1")
        assert unknown.value.message.startswith("image reg/nope:1 not found")
        config = {"Image": IMAGE, "Entrypoint": ["exit"], "Cmd": ["3"],
                  "Labels": {"app": "web"}, "HostConfig": {"NetworkMode": "sigma"}}
        cid = await client.create("web", config)
        with pytest.raises(EngineError) as conflict:
            await client.create("web", config)
        assert conflict.value.engine_status == 409
        await client.start(cid)
        await asyncio.sleep(0.05)
        state = await client.inspect("web")
        assert state is not None and state.end_reason() == "Exited(3)"
        assert [c.id for c in await client.find({"app": "web"})] == [cid]
        await client.remove(cid)
        assert await client.inspect(cid) is None
        await asyncio.sleep(0.05)
        assert seen == ["create", "start", "die", "destroy"]
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)

        server.freeze()
        with pytest.raises((EngineError, TimeoutError)):
            await asyncio.wait_for(client.ping(), 0.3)
        await server.heal()
        await client.ping()
        await server.kill()
        assert not (tmp_path / "h1.sock").exists()
        with pytest.raises(EngineError):
            await client.ping()
        await server.heal()
        await client.ping()
    finally:
        await client.close()
        await server.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_client_without_keep_alive_leaves_no_connection_open(tmp_path: Path) -> None:
    """Hollow agents talk to their own engine in this process (two descriptors a
    connection): without keep-alive nothing stays open between calls, where a default
    client keeps its connections."""
    server = EngineServer(tmp_path / "h1.sock", Capacity(4, 8 << 30), images=(IMAGE,))
    await server.start()
    try:
        for keep_alive, left in ((False, 0), (True, 2)):  # 2: both ends of one connection
            before = open_fds()
            client = DockerEngine(server.url, cluster="/c", keep_alive=keep_alive)
            for _ in range(5):
                await client.ping()
                await client.find({"app": ""})
            for _ in range(100):  # both ends close a moment after the answer
                if open_fds() - before == left:
                    break
                await asyncio.sleep(0.01)
            assert open_fds() - before == left, f"keep_alive={keep_alive}"
            await client.close()
    finally:
        await server.kill()


async def test_the_clients_of_a_pool_keep_at_most_its_idle_budget(tmp_path: Path) -> None:
    """A master's clients of many engines keep at most the pool's budget of idle
    connections between them (else three sockets an engine: past the open-file limit at
    thousands of engines); calls beyond it still work, on connections of their own."""
    server = EngineServer(tmp_path / "h.sock", Capacity(4, 8 << 30), images=(IMAGE,))
    await server.start()
    pool = EnginePool("/c", idle=5)
    try:
        before = open_fds()
        clients = [pool.get(f"n{i}", server.url)[0] for i in range(20)]
        for _ in range(2):
            await asyncio.gather(*(c.ping() for c in clients))
        for _ in range(100):  # both ends close a moment after the answer
            if open_fds() - before <= 2 * 5:
                break
            await asyncio.sleep(0.01)
        assert open_fds() - before == 2 * 5  # five idle connections, both ends here
        assert pool.budget.kept == 5
        await pool.close()
        assert pool.budget.kept == 0
    finally:
        await server.kill()
