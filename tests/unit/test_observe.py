"""Observability on fakes: usage sampling (cgroup v1 files in a directory), the pool's used
figures, /metrics parsed as Prometheus does, /readyz, logs (a container's output, the last
lines kept with its end) and exec through the API."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from sigmad import metrics
from sigmad.engine import LABEL_INSTANCE, Frames
from sigmad.models import MAX_LOG_BYTES, MAX_LOG_LINES, HostUsed, UsageRecord, last_lines
from sigmad.node import usage
from tests.fakes.engine import FakeEngine
from tests.fakes.store import MemoryStore
from tests.unit.harness import ADMIN, Leader, call, spec

# -- pure parts ------------------------------------------------------------------------------


def test_cgroup_files_parse() -> None:
    paths = usage.cgroup_paths("12:memory:/sigma-lab-h1/abc\n4:cpu,cpuacct:/sigma-lab-h1/abc\n"
                               "0::/\n")
    assert paths == {"memory": "/sigma-lab-h1/abc", "cpu": "/sigma-lab-h1/abc",
                     "cpuacct": "/sigma-lab-h1/abc"}
    assert usage.memory_used(100 << 20, "cache 5\ntotal_inactive_file 30000000\n") == \
        (100 << 20) - 30000000
    assert usage.memory_used(10, "total_inactive_file 99\n") == 0
    assert usage.machine_busy("cpu  100 0 50 1000 20 0 0 0 0 0\ncpu0 1 1 1 1\n") == 1.5
    assert usage.machine_memory("MemTotal: 1000 kB\nMemFree: 10 kB\nMemAvailable: 400 kB\n") \
        == 600 * 1024


def test_a_rate_is_cores_between_two_readings() -> None:
    rate = usage.Rate()
    assert rate.cores(10.0, 100.0) == 0.0  # the first reading: nothing to compare
    assert rate.cores(12.0, 104.0) == 0.5
    assert rate.cores(1.0, 105.0) == 0.0  # a counter that went back (a new cgroup)


def test_kept_lines_are_bounded_in_count_and_bytes() -> None:
    assert last_lines([str(i) for i in range(200)]) == [str(i) for i in range(150, 200)]
    kept = last_lines(["x" * 1000] * 10)
    assert len(kept) == MAX_LOG_BYTES // 1000 and kept[-1] == "x" * 1000
    assert last_lines(["y" * (MAX_LOG_BYTES + 10)]) == ["y" * MAX_LOG_BYTES]  # its end
    assert len(last_lines(["z"] * MAX_LOG_LINES * 3)) == MAX_LOG_LINES


def test_log_frames_are_demultiplexed_across_chunks() -> None:
    framed = b"\x01\0\0\0\0\0\0\x06hello\n" + b"\x02\0\0\0\0\0\0\x04err\n"
    frames = Frames()
    out = b"".join(frames.feed(framed[i:i + 3]) for i in range(0, len(framed), 3))
    assert out == b"hello\nerr\n"
    raw = Frames()  # a terminal's stream has no frames
    assert raw.feed(b"plain text\n") == b"plain text\n"


def test_engine_call_kinds_have_no_ids() -> None:
    assert metrics.engine_call("POST", "/containers/3f2a/start") == "POST containers/start"
    assert metrics.engine_call("DELETE", "/containers/3f2a") == "DELETE containers/item"
    assert metrics.engine_call("POST", "/containers/create") == "POST containers/create"
    assert metrics.engine_call("GET", "/_ping") == "GET _ping"
    assert metrics.engine_call("GET", "/images/lab:5000/sigma/busybox:1/json") == \
        "GET images/json"


# -- the sampler on a directory of cgroup files ----------------------------------------------


def _write(root: Path, path: str, text: str) -> None:
    f = root / path
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(text)


async def test_a_busy_container_shows_cpu_and_the_host_its_cgroup(tmp_path: Path) -> None:
    store, engine = MemoryStore("/t"), FakeEngine("fake://h1", "/t")
    cid = await engine.create("c1", {"Image": "img", "Labels": {LABEL_INSTANCE: "default/web-0"}})
    await engine.start(cid)
    state = await engine.inspect(cid)
    assert state is not None
    _write(tmp_path, f"proc/{state.pid}/cgroup",
           f"4:cpu,cpuacct:/lab/{cid}\n9:memory:/lab/{cid}\n")

    # The agent's (and the engine's) memory cgroup is not the root: the engine's parent is
    # under it there (dockerd puts a relative --cgroup-parent under its own cgroup).
    _write(tmp_path, "proc/self/cgroup", "4:cpu,cpuacct:/\n9:memory:/jail\n")

    def cgroups(cpu_ns: int, memory: int) -> None:
        for cpu, mem in ((f"lab/{cid}", f"lab/{cid}"), ("lab", "jail/lab")):
            _write(tmp_path, f"sys/fs/cgroup/cpuacct/{cpu}/cpuacct.usage", str(cpu_ns))
            _write(tmp_path, f"sys/fs/cgroup/memory/{mem}/memory.usage_in_bytes", str(memory))
            _write(tmp_path, f"sys/fs/cgroup/memory/{mem}/memory.stat",
                   "total_inactive_file 1000\n")

    clock = iter([100.0, 102.0, 104.0])
    sampler = usage.Sampler("h1", engine, store, cgroup="lab",
                            files=usage.Files(str(tmp_path)),
                            clock=lambda: next(clock))
    cgroups(5 * 10**9, 51000)
    first = await sampler.sample()
    assert first.instances["default/web-0"].cpu == 0.0  # one reading: no rate yet
    assert first.instances["default/web-0"].memory == 50000
    cgroups(8 * 10**9, 61000)  # 3 s of cpu in 2 s of wall time
    second = await sampler.sample()
    assert second.instances["default/web-0"].cpu == 1.5
    assert second.host == HostUsed(cpu=1.5, memory=60000) and second.scope == "cgroup:lab"
    await engine.stop(cid)  # gone from the next sample
    assert (await sampler.sample()).instances == {}


# -- the API ----------------------------------------------------------------------------------


@pytest.fixture
async def api() -> AsyncIterator[tuple[TestClient, Leader]]:
    async with Leader() as lead, lead.client(master_id="m1") as client:
        yield client, lead


async def test_the_pool_shows_used_beside_requested(api: tuple[TestClient, Leader]) -> None:
    client, lead = api
    await lead.add_node("a", labels={"zone": "z1"})
    await lead.add_node("b", labels={"zone": "z2"})
    sample = UsageRecord(node="a", at=time.time(), host=HostUsed(cpu=1.25, memory=3 << 30))
    await lead.store.put(lead.store.keys.usage("a"), sample)
    await lead.until(lambda: lead.cache.table("usage"))
    status, pool = await call(client, "GET", "/v1/pool")
    assert status == 200 and pool["used"] == {"cpu_m": 1250, "memory": 3 << 30}
    assert pool["used_nodes"] == 1
    assert pool["by_label"]["zone"]["z1"]["used"]["cpu_m"] == 1250
    assert pool["by_label"]["zone"]["z2"]["used"] == {"cpu_m": 0, "memory": 0}
    status, node = await call(client, "GET", "/v1/nodes/a")
    assert node["used"] == {"cpu_m": 1250, "memory": 3 << 30} and node["used_scope"] == "machine"
    status, found = await call(client, "GET", "/v1/usage")
    assert [u["node"] for u in found["items"]] == ["a"]


async def test_metrics_parse_and_need_a_token(api: tuple[TestClient, Leader]) -> None:
    client, lead = api
    await lead.add_node("a")
    await lead.apply(spec(replicas=2))
    await lead.running("web", 2)
    async with client.get("/metrics") as r:
        assert r.status == 401
    async with client.get("/metrics", headers=ADMIN) as r:
        assert r.status == 200
        text = await r.text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("sigma_instances", (("app", "default/web"), ("state", "Running")))] == 2
    assert samples[("sigma_node_cpu_cores", (("kind", "requested"), ("node", "a")))] == 0.2
    assert samples[("sigma_nodes", (("status", "Ready"),))] == 1
    assert samples[("sigma_placements_total", ())] >= 2
    assert samples[("sigma_api_connections_open", ())] >= 0
    assert any(name == "sigma_etcd_txn_seconds_count" and value > 0
               for (name, _), value in samples.items())
    assert not any("web-0" in str(labels) for (_, labels) in samples)  # no instance labels


async def test_readyz_says_whether_this_master_leads(api: tuple[TestClient, Leader]) -> None:
    client, _ = api
    async with client.get("/readyz") as r:  # (the harness's controller holds no leader key)
        body = await r.json()
        assert r.status == 200 and body["ready"] and body["leader"] is False


async def test_logs_and_the_last_lines_kept_with_an_end(api: tuple[TestClient, Leader]) -> None:
    client, lead = api
    await lead.add_node("a")
    await lead.apply(spec(replicas=1))
    await lead.running("web", 1)
    engine = lead.engine("a")
    [c] = engine.running()
    c.output = [f"line {i}" for i in range(80)]
    async with client.get("/v1/instances/default/web-0/logs?tail=3", headers=ADMIN) as r:
        assert r.status == 200 and await r.text() == "line 77\nline 78\nline 79\n"
    for query, field in (("tail=x", "tail"), ("container=nope", "container"),
                         ("follow=1&previous=1", "follow")):
        status, body = await call(client, "GET", f"/v1/instances/default/web-0/logs?{query}")
        assert status == 400 and body["error"]["field"] == field, query
    status, body = await call(client, "GET", "/v1/instances/default/web-0/logs?previous=1")
    assert status == 404  # nothing ended yet
    engine.exit(c.id, 1)
    await lead.until(lambda: lead.instances("web")[0].terminations)
    [end] = lead.instances("web")[0].terminations
    assert end.reason == "Exited(1)" and end.logs == c.output[-MAX_LOG_LINES:]
    async with client.get("/v1/instances/default/web-0/logs?previous=1", headers=ADMIN) as r:
        text = await r.text()
    assert r.status == 200 and "ended: Exited(1)" in text and text.endswith("line 79\n")


async def test_exec_runs_in_the_container(api: tuple[TestClient, Leader]) -> None:
    client, lead = api
    await lead.add_node("a")
    await lead.apply(spec(replicas=1))
    await lead.running("web", 1)
    status, body = await call(client, "POST", "/v1/instances/default/web-0/exec",
                              {"command": ["echo", "hi"]})
    assert status == 200 and body == {"exit_code": 0, "output": "echo hi\n"}
    for bad, field in (({"command": []}, "command"), ({"command": ["x"], "timeout": 0},
                                                      "timeout"),
                       ({"command": ["x"], "tty": True}, "stdin")):
        status, body = await call(client, "POST", "/v1/instances/default/web-0/exec", bad)
        assert status == 400 and body["error"]["field"] == field, bad
