"""The hollow engine against a real dockerd 20.10: the same calls to both, compared by status
code, error message and JSON shape (key sets), so the fake stays what sigma would meet.

The real dockerd runs in its own network namespace `hollowcmp` (nsenter, as every test
dockerd); the fake gets the real one's CPU count and memory, so messages that quote them match.
Not compared: pulls (no registry is reachable from the namespace) and values that differ by
nature (ids, times, pids, paths).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sigmad.lab.hollow import Capacity
from sigmad.lab.hollow_engine import EngineServer
from sigmad.procs import DockerdProcess
from tests.integration.conftest import IMAGE, REPO

pytestmark = pytest.mark.integration
NETNS = "hollowcmp"
ID = re.compile(r"[0-9a-f]{64}")
LABELS = {"cmp": "1", "sigma.instance": "default/web-0"}
FILTER = json.dumps({"label": ["cmp=1"]})


class Side:
    """One engine (real or hollow) reached over its Unix socket."""

    def __init__(self, name: str, socket: Path) -> None:
        self.name = name
        self.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(socket)))

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        async with self.session.request(
            method, f"http://docker{path}", data=data,
            headers={"Content-Type": "application/json"},
        ) as response:
            raw = await response.read()
        try:
            return response.status, json.loads(raw) if raw else None
        except ValueError:
            return response.status, raw.decode()

    async def events(self, into: list[dict[str, Any]]) -> None:
        query = json.dumps({"type": ["container"], "label": ["cmp=1"]})
        async with self.session.get("http://docker/v1.41/events",
                                    params={"filters": query}) as response:
            async for line in response.content:
                if line.strip():
                    into.append(json.loads(line))


def shape(value: Any) -> Any:
    """The key structure of a JSON value (lists: the shape of their first item)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list) and value:
        return [shape(value[0])]
    return type(value).__name__ if value is not None else None


def keys(value: Any, path: str = "") -> dict[str, set[str]]:
    """Every dict's key set, by its path (`State`, `NetworkSettings.Networks.sigma`, …)."""
    out: dict[str, set[str]] = {}
    if isinstance(value, dict):
        out[path] = set(value)
        for k, v in value.items():
            out.update(keys(v, f"{path}.{k}" if path else k))
    return out


def same_keys(real: Any, fake: Any, paths: list[str]) -> list[str]:
    """The differences of the key sets at `paths` (an empty list when they agree)."""
    r, f = keys(real), keys(fake)
    problems = []
    for p in paths:
        if r.get(p) != f.get(p):
            rk, fk = r.get(p, set()), f.get(p, set())
            problems.append(f"{p or '(top)'}: only real {sorted(rk - fk)}, "
                            f"only hollow {sorted(fk - rk)}")
    return problems


def message(body: Any) -> str:
    return ID.sub("<id>", body.get("message", "")) if isinstance(body, dict) else str(body)


@pytest.fixture(scope="module")
async def sides(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Side, Side]]:
    if os.geteuid() != 0:
        pytest.skip("the real dockerd needs root")
    root = tmp_path_factory.mktemp("hollowcmp")
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    exec_root = Path(f"/run/{NETNS}")
    real = DockerdProcess(root / "docker", exec_root, netns=NETNS)
    fake: EngineServer | None = None
    clients: list[Side] = []
    try:
        subprocess.run(["nsenter", f"--net=/var/run/netns/{NETNS}", "ip", "link", "set", "lo",
                        "up"], check=True)
        real.start()
        await real.wait_ready()
        subprocess.run([str(REPO / "scripts" / "build-image.sh"), real.url, IMAGE], check=True,
                       capture_output=True, timeout=120)
        clients.append(Side("real", real.socket))
        _, info = await clients[0].call("GET", "/v1.41/info")
        fake = EngineServer(root / "hollow.sock", Capacity(info["NCPU"], info["MemTotal"]),
                            images=(IMAGE,))
        await fake.start()
        clients.append(Side("hollow", fake.path))
        yield clients[0], clients[1]
    finally:
        for side in clients:
            await side.session.close()
        if fake is not None:
            await fake.close()
        real.stop()
        subprocess.run(["umount", "-R", str(exec_root)], check=False, capture_output=True)
        shutil.rmtree(exec_root, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", NETNS], check=False)


async def both(sides: tuple[Side, Side], method: str, path: str,
               body: Any = None) -> tuple[tuple[int, Any], tuple[int, Any]]:
    real, fake = sides
    return await real.call(method, path, body), await fake.call(method, path, body)


async def same_error(sides: tuple[Side, Side], method: str, path: str, body: Any = None,
                     status: int = 0) -> None:
    (rs, rb), (fs, fb) = await both(sides, method, path, body)
    assert (rs, message(rb)) == (fs, message(fb)), (method, path)
    assert not status or rs == status, (rs, rb)


def create_body(ip: str, **extra: Any) -> dict[str, Any]:
    return {
        "Image": IMAGE, "Env": ["A=1"], "Labels": LABELS, "Hostname": "web-0",
        "MacAddress": "02:42:0a:f5:00:05", "Entrypoint": ["sleep"], "Cmd": ["1000"],
        "HostConfig": {"NanoCpus": 500_000_000, "Memory": 128 << 20,
                       "MemorySwap": 128 << 20, "MemorySwappiness": 0, "PidsLimit": 4096,
                       "NetworkMode": "sigma",
                       "PortBindings": {"8080/tcp": [{"HostPort": "31000"}]}},
        "ExposedPorts": {"8080/tcp": {}},
        "NetworkingConfig": {"EndpointsConfig": {"sigma": {"IPAMConfig": {
            "IPv4Address": ip}}}},
        **extra,
    }


async def test_host_endpoints(sides: tuple[Side, Side]) -> None:
    (rs, rb), (fs, fb) = await both(sides, "GET", "/_ping")
    assert (rs, rb) == (fs, fb) == (200, "OK")
    for path in ("/version", "/v1.41/version"):
        (rs, rb), (fs, fb) = await both(sides, "GET", path)
        assert rs == fs == 200
        assert fb["ApiVersion"] == rb["ApiVersion"] == "1.41"
        assert same_keys(rb, fb, [""]) == []
    (rs, rb), (fs, fb) = await both(sides, "GET", "/v1.41/info")
    assert rs == fs == 200
    for key in ("NCPU", "MemTotal", "SwapLimit", "MemoryLimit", "CgroupDriver",
                "ServerVersion", "OSType"):
        assert fb[key] == rb[key], key
    assert same_keys(rb, fb, [""]) == []
    await same_error(sides, "GET", "/v1.41/nosuch/path", status=404)


async def test_networks_and_images(sides: tuple[Side, Side]) -> None:
    body = {"Name": "sigma", "Driver": "bridge", "CheckDuplicate": True,
            "IPAM": {"Driver": "default",
                     "Config": [{"Subnet": "10.245.0.0/16", "Gateway": "10.245.0.1"}]},
            "Options": {"com.docker.network.bridge.name": "sigma0"}, "Labels": {}}
    (rs, rb), (fs, fb) = await both(sides, "POST", "/v1.41/networks/create", body)
    assert (rs, fs) == (201, 201) and same_keys(rb, fb, [""]) == []
    await same_error(sides, "POST", "/v1.41/networks/create", body, status=409)
    (rs, rb), (fs, fb) = await both(sides, "GET", "/v1.41/networks/sigma")
    assert rs == fs == 200
    assert fb["IPAM"]["Config"] == rb["IPAM"]["Config"]
    assert same_keys(rb, fb, ["", "IPAM"]) == []
    await same_error(sides, "GET", "/v1.41/networks/nosuch", status=404)
    (rs, rb), (fs, fb) = await both(sides, "GET", f"/v1.41/images/{IMAGE}/json")
    assert rs == fs == 200 and fb["RepoTags"] == rb["RepoTags"]
    assert same_keys(rb, fb, ["", "Config", "RootFS"]) == []
    await same_error(sides, "GET", "/v1.41/images/nope/json", status=404)


async def test_containers(sides: tuple[Side, Side]) -> None:
    streams: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], [])
    listeners = [asyncio.create_task(s.events(into)) for s, into in zip(sides, streams,
                                                                        strict=True)]
    await asyncio.sleep(0.3)
    ids = []
    for side in sides:
        status, body = await side.call("POST", "/v1.41/containers/create?name=cmp-web",
                                       create_body("10.245.0.5"))
        assert status == 201 and set(body) == {"Id", "Warnings"}, (side.name, body)
        ids.append(body["Id"])
    await same_error(sides, "POST", "/v1.41/containers/create?name=cmp-web",
                     create_body("10.245.0.6"), status=409)
    await same_error(sides, "POST", "/v1.41/containers/create?name=cmp-x",
                     {"Image": "nope:1", "Cmd": ["true"]}, status=404)
    await same_error(sides, "POST", "/v1.41/containers/create?name=cmp-y",
                     {"Image": IMAGE, "Cmd": ["true"], "HostConfig": {"Memory": 1 << 20}},
                     status=400)
    await same_error(sides, "POST", "/v1.41/containers/create?name=cmp-z",
                     {"Image": IMAGE}, status=400)  # no command: FROM scratch has none
    for path, status in (("/v1.41/containers/cmp-web/start", 204),
                         ("/v1.41/containers/cmp-web/start", 304),
                         ("/containers/cmp-web/start", 304)):
        (rs, _), (fs, _) = await both(sides, "POST", path)
        assert rs == fs == status, path

    # inspect: by name, by id prefix
    (rs, rb), (fs, fb) = await both(sides, "GET", "/v1.41/containers/cmp-web/json")
    assert rs == fs == 200
    assert same_keys(rb, fb, ["", "State", "Config", "HostConfig", "NetworkSettings",
                              "NetworkSettings.Networks",
                              "NetworkSettings.Networks.sigma"]) == []
    for part in ("Status", "Running", "ExitCode", "OOMKilled", "FinishedAt"):
        assert fb["State"][part] == rb["State"][part], part
    for part in ("Labels", "Entrypoint", "Cmd", "Hostname", "Image", "Env", "MacAddress"):
        assert fb["Config"][part] == rb["Config"][part], part
    for part in ("NanoCpus", "Memory", "MemorySwap", "MemorySwappiness", "PidsLimit",
                 "NetworkMode", "PortBindings"):
        assert fb["HostConfig"][part] == rb["HostConfig"][part], part
    net_r, net_f = (b["NetworkSettings"]["Networks"]["sigma"] for b in (rb, fb))
    assert (net_f["IPAddress"], net_f["MacAddress"]) == (net_r["IPAddress"],
                                                        net_r["MacAddress"])
    assert fb["Name"] == rb["Name"] == "/cmp-web"
    for side, cid in zip(sides, ids, strict=True):
        status, body = await side.call("GET", f"/v1.41/containers/{cid[:12]}/json")
        assert status == 200 and body["Id"] == cid
    await same_error(sides, "GET", "/v1.41/containers/nosuch/json", status=404)

    # list with a label filter
    (rs, rb), (fs, fb) = await both(sides, "GET", f"/v1.41/containers/json?all=1&filters="
                                    f"{FILTER}")
    assert rs == fs == 200 and len(rb) == len(fb) == 1
    assert same_keys(rb[0], fb[0], ["", "HostConfig", "NetworkSettings",
                                    "NetworkSettings.Networks.sigma"]) == []
    for part in ("Names", "Image", "Labels", "State", "Command", "Ports", "HostConfig"):
        assert fb[0][part] == rb[0][part], part
    assert fb[0]["Status"].startswith("Up ") and rb[0]["Status"].startswith("Up ")

    # update: dockerd's validation, then a change that holds
    cid_path = "/v1.41/containers/cmp-web/update"
    for change in ({"Memory": 1000}, {"Memory": 100_000_000, "MemorySwap": 50_000_000},
                   {"NanoCpus": 1000 * 10**9}):
        await same_error(sides, "POST", cid_path, change, status=400)
    await same_error(sides, "POST", cid_path, {"Memory": 256 << 20}, status=409)
    for change in ({"Memory": 200 << 20, "MemorySwap": 200 << 20, "NanoCpus": 10**9},
                   {"CpuQuota": -1}):
        (rs, rb), (fs, fb) = await both(sides, "POST", cid_path, change)
        assert (rs, rb) == (fs, fb) == (200, {"Warnings": None})

    # stats and exec
    (rs, rb), (fs, fb) = await both(sides, "GET",
                                    "/v1.41/containers/cmp-web/stats?stream=false")
    assert rs == fs == 200 and same_keys(rb, fb, [""]) == []
    assert {"usage", "stats", "limit"} <= set(fb["memory_stats"])
    assert "total_inactive_file" in fb["memory_stats"]["stats"]
    for side in sides:
        status, created = await side.call("POST", "/v1.41/containers/cmp-web/exec",
                                          {"Cmd": ["true"], "AttachStdout": False})
        assert status == 201 and set(created) == {"Id"}
        status, _ = await side.call("POST", f"/v1.41/exec/{created['Id']}/start",
                                    {"Detach": True})
        assert status == 200
        for _ in range(50):
            status, view = await side.call("GET", f"/v1.41/exec/{created['Id']}/json")
            if not view["Running"]:
                break
            await asyncio.sleep(0.1)
        assert status == 200 and view["ExitCode"] == 0, side.name
        side_keys = set(view)
        assert side_keys == {"ID", "Running", "ExitCode", "ProcessConfig", "OpenStdin",
                             "OpenStderr", "OpenStdout", "CanRemove", "ContainerID",
                             "DetachKeys", "Pid"}
    await same_error(sides, "GET", "/v1.41/exec/nosuch/json", status=404)

    # a container that exits 3
    for side in sides:
        status, body = await side.call("POST", "/v1.41/containers/create?name=cmp-exit",
                                       {"Image": IMAGE, "Cmd": ["sh", "-c", "exit 3"],
                                        "Labels": LABELS})
        assert status == 201
        assert (await side.call("POST", "/v1.41/containers/cmp-exit/start"))[0] == 204
    await asyncio.sleep(1.0)
    (rs, rb), (fs, fb) = await both(sides, "GET", "/v1.41/containers/cmp-exit/json")
    assert (rb["State"]["Status"], rb["State"]["ExitCode"]) == \
        (fb["State"]["Status"], fb["State"]["ExitCode"]) == ("exited", 3)
    (rs, _), (fs, _) = await both(sides, "POST", "/v1.41/containers/cmp-exit/stop?t=1")
    assert rs == fs == 304
    await same_error(sides, "POST", "/v1.41/containers/cmp-exit/kill", status=409)
    await same_error(sides, "POST", "/v1.41/containers/cmp-exit/exec", {"Cmd": ["true"]},
                     status=409)

    # kill, remove
    await same_error(sides, "DELETE", "/v1.41/containers/cmp-web", status=409)
    (rs, _), (fs, _) = await both(sides, "POST", "/v1.41/containers/cmp-web/kill?signal=KILL")
    assert rs == fs == 204
    (rs, rb), (fs, fb) = await both(sides, "GET", "/v1.41/containers/cmp-web/json")
    assert rb["State"]["ExitCode"] == fb["State"]["ExitCode"] == 137
    for path in ("/v1.41/containers/cmp-web?force=1", "/v1.41/containers/cmp-exit?force=1"):
        (rs, _), (fs, _) = await both(sides, "DELETE", path)
        assert rs == fs == 204
    for path in ("/v1.41/containers/cmp-web?force=1", "/v1.41/containers/cmp-web/stop"):
        await same_error(sides, "DELETE" if "?" in path else "POST", path, status=404)

    # the events, in order, with the same fields
    await asyncio.sleep(0.5)
    for task in listeners:
        task.cancel()
    await asyncio.gather(*listeners, return_exceptions=True)
    real_events, fake_events = streams

    def story(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return [(e["Actor"]["Attributes"]["name"], e["Action"].split(":")[0])
                for e in events]

    assert story(fake_events) == story(real_events)
    assert same_keys(real_events[0], fake_events[0], ["", "Actor"]) == []
    dies = [(e["Actor"]["Attributes"], f["Actor"]["Attributes"])
            for e, f in zip(real_events, fake_events, strict=True) if e["Action"] == "die"]
    assert dies and all(r == f for r, f in dies)
