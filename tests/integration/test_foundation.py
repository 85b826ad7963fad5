"""End to end on a real etcd and a real dockerd: apply, caps, scale, delete, restarts, auth."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from tests.integration.conftest import (
    IMAGE,
    Cluster,
    EngineHost,
    start_etcd,
    wait_for,
    web_spec,
)

MiB = 1 << 20


def cgroup_file(pid: int, controller: str, name: str) -> str:
    """A cgroup v1 file of the process `pid`, read where the kernel keeps it."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return Path(f"/sys/fs/cgroup/{controller}{path}/{name}").read_text().strip()
    raise AssertionError(f"no {controller} cgroup for pid {pid}")


def test_apply_runs_containers_with_caps(cluster: Cluster, engine: EngineHost) -> None:
    cluster.apply(web_spec(2))
    items = cluster.wait_running("web", 2)
    assert sorted(i["name"] for i in items) == ["web-0", "web-1"]
    for item in items:
        assert item["node"] == cluster.node_name
        (container,) = item["containers"]
        info = engine.inspect(container["id"])
        host = info["HostConfig"]
        assert host["NanoCpus"] == 500_000_000
        assert host["Memory"] == host["MemorySwap"] == 128 * MiB
        labels = info["Config"]["Labels"]
        assert labels["sigma.instance"] == f"default/{item['name']}"
        assert labels["sigma.app"] == "web" and labels["sigma.namespace"] == "default"
        assert labels["sigma.container"] == "main" and labels["sigma.generation"] == "1"
        assert labels["sigma.cluster"] == cluster.prefix
        pid = info["State"]["Pid"]
        assert int(cgroup_file(pid, "memory", "memory.limit_in_bytes")) == 128 * MiB
        assert int(cgroup_file(pid, "memory", "memory.memsw.limit_in_bytes")) == 128 * MiB
        quota = int(cgroup_file(pid, "cpu", "cpu.cfs_quota_us"))
        period = int(cgroup_file(pid, "cpu", "cpu.cfs_period_us"))
        assert quota / period == 0.5
        url = f"http://{item['ip']}:8080/"
        answer = wait_for(lambda u=url: engine.fetch(u), 10, f"an answer from {url}")
        assert answer.strip() == f"hello from {item['name']}"
    out = cluster.ctl("get", "instances", "-o", "json")
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert {i["name"]: i["state"] for i in listed} == {"web-0": "Running", "web-1": "Running"}
    assert all(len(i["containers"][0]["id"]) == 64 for i in listed)


def test_scale_up_and_down(cluster: Cluster, engine: EngineHost) -> None:
    cluster.apply(web_spec(2))
    first = {i["name"]: i["containers"][0]["id"] for i in cluster.wait_running("web", 2)}
    cluster.apply(web_spec(3))
    items = cluster.wait_running("web", 3)
    assert sorted(i["name"] for i in items) == ["web-0", "web-1", "web-2"]
    kept = {i["name"]: i["containers"][0]["id"] for i in items if i["name"] in first}
    assert kept == first, "scaling up must not touch running instances"
    cluster.apply(web_spec(1))
    items = cluster.wait_running("web", 1)
    assert [i["name"] for i in items] == ["web-0"]
    wait_for(lambda: len(engine.sigma_containers("web")) == 1, 30, "surplus containers removed")
    assert engine.sigma_containers("web") == [first["web-0"]]


def test_delete_removes_containers_and_records(cluster: Cluster, engine: EngineHost) -> None:
    cluster.apply(web_spec(2))
    cluster.wait_running("web", 2)
    result = cluster.ctl("delete", "app", "web")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: not cluster.instances("web"), 30, "instance records gone")
    wait_for(lambda: not engine.sigma_containers("web"), 30, "containers gone")
    status, body = cluster.api("GET", "/v1/apps/default/web")
    assert status == 404 and body["error"]["code"] == "not_found"


def test_master_restart_adopts_running_containers(cluster: Cluster, engine: EngineHost) -> None:
    cluster.apply(web_spec(2))
    before = {i["name"]: i["containers"][0]["id"] for i in cluster.wait_running("web", 2)}
    cluster.stop("master", signal.SIGKILL)
    cluster.start_master()
    time.sleep(3)  # several reconcile passes (interval 1 s) after the restart
    after = {i["name"]: i["containers"][0]["id"] for i in cluster.wait_running("web", 2)}
    assert after == before
    assert sorted(engine.sigma_containers("web")) == sorted(before.values())


def test_etcd_restart_master_reconnects(tmp_path: Path, engine: EngineHost) -> None:
    etcd = start_etcd(tmp_path / "etcd")
    cluster = Cluster(tmp_path, etcd, engine)
    try:
        cluster.start_master()
        cluster.start_node()
        cluster.apply(web_spec(1))
        cluster.wait_running("web", 1)
        etcd.stop()
        time.sleep(3)
        status, body = cluster.api("GET", "/v1/apps")
        assert status == 503 and body["error"]["code"] == "store_unavailable"
        etcd.start()
        wait_for(lambda: cluster.api("GET", "/v1/apps")[0] == 200, 20, "the API back")
        cluster.apply(web_spec(2))
        cluster.wait_running("web", 2)
        status, body = cluster.api("GET", "/v1/nodes")
        wait_for(lambda: cluster.api("GET", "/v1/nodes")[1]["items"][0]["status"] == "Ready",
                 20, "node Ready again after the etcd restart")
    finally:
        cluster.close()
        etcd.stop()


def test_bad_spec_is_rejected_and_nothing_written(cluster: Cluster) -> None:
    bad = web_spec(2).replace("128Mi", "8GG")
    assert "8GG" in bad
    result = cluster.ctl("apply", "-f", "-", stdin=bad)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        'error: containers[0].resources.limit.memory: "8GG" is not a size '
        "(use e.g. 512Mi, 2Gi, 1.5G)"
    )
    status, body = cluster.api("PUT", "/v1/apps", web_spec(2) + "---\n" + bad)
    assert status == 400
    assert body["error"]["field"] == "containers[0].resources.limit.memory"
    assert body["error"]["code"] == "invalid"
    assert cluster.api("GET", "/v1/apps")[1]["items"] == []
    assert cluster.instances() == []


def test_every_v1_call_needs_the_token(cluster: Cluster) -> None:
    for token in (None, "wrong-token"):
        for method, path in (("GET", "/v1/apps"), ("GET", "/v1/nodes"),
                             ("PUT", "/v1/apps"), ("DELETE", "/v1/apps/default/web")):
            status, body = cluster.api(method, path, web_spec() if method == "PUT" else None,
                                       token=token)
            assert status == 401, (method, path)
            assert body["error"]["code"] == "unauthorized"
    assert cluster.api("GET", "/v1/apps")[1]["items"] == []
    result = cluster.ctl("--token", "wrong-token", "get", "apps")
    assert result.returncode == 1 and "unauthorized" in result.stderr


def test_node_registers_capacity_and_goes_not_ready(cluster: Cluster, engine: EngineHost) -> None:
    info = json.loads(engine.docker("info", "--format", "{{json .}}").stdout)

    def node() -> dict[str, object] | None:
        status, body = cluster.api("GET", f"/v1/nodes/{cluster.node_name}")
        return body if status == 200 and body["status"] == "Ready" else None

    view = wait_for(node, 20, "node Ready")
    assert view["capacity"] == {"cpu_m": info["NCPU"] * 1000, "memory": info["MemTotal"]}
    assert view["labels"] == {"zone": "room-a"}
    cluster.stop("node", signal.SIGKILL)
    started = time.monotonic()
    wait_for(lambda: cluster.api("GET", f"/v1/nodes/{cluster.node_name}")[1]["status"]
             == "NotReady", 10, "node NotReady after its agent stopped")
    assert time.monotonic() - started < 2 + 3, "NotReady within the heartbeat TTL (2 s)"


def test_exit_code_is_recorded_as_the_reason(cluster: Cluster) -> None:
    cluster.apply(web_spec(1, app="job", script="exit 3", restart="never"))

    def failed() -> dict[str, object] | None:
        items = cluster.instances("job")
        return items[0] if items and items[0]["state"] == "Failed" else None

    inst = wait_for(failed, 30, "job-0 Failed")
    assert inst["reason"] == "Exited(3)"
    assert [t["reason"] for t in inst["terminations"]] == ["Exited(3)"]  # type: ignore[index]


def test_delete_while_the_node_is_down(cluster: Cluster, engine: EngineHost) -> None:
    """Records go at once; the node's containers go as orphans when it is back."""
    cluster.apply(web_spec(2))
    cluster.wait_running("web", 2)
    cluster.stop("node", signal.SIGKILL)
    wait_for(lambda: cluster.api("GET", f"/v1/nodes/{cluster.node_name}")[1]["status"]
             == "NotReady", 10, "node NotReady")
    assert cluster.ctl("delete", "app", "web").returncode == 0
    assert cluster.instances("web") == []
    assert len(engine.sigma_containers("web")) == 2  # unreachable for all sigma knows
    cluster.start_node()
    wait_for(lambda: not engine.sigma_containers("web"), 20, "orphans removed")


def test_orphans_of_this_cluster_go_others_stay(cluster: Cluster, engine: EngineHost) -> None:
    """The sweep (on a master's first pass) removes containers labelled with this cluster that
    no instance owns, and never touches another cluster's on a shared engine."""
    def plant(name: str, prefix: str) -> str:
        return engine.docker(
            "run", "-d", "--name", name, "--label", "sigma.instance=default/ghost-0",
            "--label", f"sigma.cluster={prefix}", IMAGE, "sleep", "600",
        ).stdout.strip()

    ours = plant("sigma-test-ours", cluster.prefix)
    theirs = plant("sigma-default_web-0_main", "/another/cluster")  # the name web-0 would use
    try:
        cluster.stop("master")
        cluster.start_master()
        wait_for(lambda: ours not in engine.sigma_containers(), 20, "our orphan removed")
        assert theirs in engine.sigma_containers()
        cluster.apply(web_spec(1))
        inst = wait_for(lambda: next((i for i in cluster.instances("web")
                                      if i["state"] == "FailedToStart"), None), 20,
                        "web-0 refused the foreign name")
        assert "taken by a container that is not a copy of" in inst["reason"]
        assert theirs in engine.sigma_containers()
        engine.docker("rm", "-f", theirs)
        cluster.wait_running("web", 1)
    finally:
        engine.docker("rm", "-f", ours, theirs, check=False)
