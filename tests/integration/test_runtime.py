"""Instance runtime on a real dockerd: kill reasons, live resize, start order, depends_on,
restart backoff, events (issue: instance runtime)."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import time
from typing import Any

import yaml

from tests.integration.conftest import IMAGE, Cluster, EngineHost, wait_for, web_spec
from tests.integration.test_foundation import cgroup_file

MiB = 1 << 20


def one(cluster: Cluster, app: str, state: str, timeout: float = 30) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        items = cluster.instances(app)
        return items[0] if items and items[0]["state"] == state else None

    return wait_for(check, timeout, f"{app}-0 {state}")


def test_memory_hog_is_oomkilled(cluster: Cluster) -> None:
    spec = yaml.safe_load(web_spec(1, app="hog", script="exec tail /dev/zero", restart="never"))
    spec["containers"][0]["resources"]["limit"]["memory"] = "32Mi"
    spec["containers"][0]["resources"]["request"]["memory"] = "16Mi"
    cluster.apply(yaml.safe_dump(spec))
    inst = one(cluster, "hog", "Failed")
    assert inst["reason"] == "OOMKilled"
    assert [t["reason"] for t in inst["terminations"]] == ["OOMKilled"]
    out = cluster.ctl("describe", "instance", "hog-0")
    assert "OOMKilled" in out.stdout


def test_kill_9_is_signaled_not_oom(cluster: Cluster, engine: EngineHost) -> None:
    cluster.apply(web_spec(1, app="victim", script="exec sleep 600", restart="never"))
    inst = one(cluster, "victim", "Running")
    pid = engine.inspect(inst["containers"][0]["id"])["State"]["Pid"]
    os.kill(pid, signal.SIGKILL)
    inst = one(cluster, "victim", "Failed")
    assert inst["reason"] == "Signaled(SIGKILL)"
    assert [t["reason"] for t in inst["terminations"]] == ["Signaled(SIGKILL)"]


def test_reason_recorded_while_the_master_was_down(cluster: Cluster, engine: EngineHost) -> None:
    cluster.apply(web_spec(1, app="quiet", script="exec sleep 600", restart="never"))
    inst = one(cluster, "quiet", "Running")
    cluster.stop("master")
    engine.docker("kill", "--signal", "KILL", inst["containers"][0]["id"])
    cluster.start_master()
    inst = one(cluster, "quiet", "Failed")
    assert inst["reason"] == "Signaled(SIGKILL)"


def _caps(engine: EngineHost, cid: str) -> tuple[int, int, float]:
    pid = engine.inspect(cid)["State"]["Pid"]
    quota = int(cgroup_file(pid, "cpu", "cpu.cfs_quota_us"))
    period = int(cgroup_file(pid, "cpu", "cpu.cfs_period_us"))
    return (int(cgroup_file(pid, "memory", "memory.limit_in_bytes")),
            int(cgroup_file(pid, "memory", "memory.memsw.limit_in_bytes")), quota / period)


def test_live_update_keeps_the_container(cluster: Cluster, engine: EngineHost) -> None:
    cluster.apply(web_spec(2))
    before = {i["name"]: i["containers"][0]["id"] for i in cluster.wait_running("web", 2)}
    assert {_caps(engine, c) for c in before.values()} == {(128 * MiB, 128 * MiB, 0.5)}
    out = cluster.ctl("update", "web", "--limit-cpu", "1500m", "--limit-memory", "256Mi")
    assert out.returncode == 0, out.stderr
    assert "resized in place" in out.stdout
    for cid in before.values():
        assert _caps(engine, cid) == (256 * MiB, 256 * MiB, 1.5)
        assert engine.inspect(cid)["State"]["Running"]
    after = {i["name"]: i["containers"][0]["id"] for i in cluster.instances("web")}
    assert after == before
    # Applying a spec that changes only resources is an in-place change too.
    spec = yaml.safe_load(web_spec(2))
    spec["containers"][0]["resources"]["limit"]["memory"] = "192Mi"
    out = cluster.ctl("apply", "--wait", "-f", "-", stdin=yaml.safe_dump(spec))
    assert out.returncode == 0 and "resized in place" in out.stdout, out.stderr
    for cid in before.values():
        assert _caps(engine, cid)[:2] == (192 * MiB, 192 * MiB)
    time.sleep(2)
    assert {i["name"]: i["containers"][0]["id"] for i in cluster.instances("web")} == before
    assert cluster.api("GET", "/v1/apps/default/web")[1]["spec"]["containers"][0][
        "resources"]["limit"]["memory"] == 192 * MiB


def test_a_cap_appears_and_is_lifted_in_place(cluster: Cluster, engine: EngineHost) -> None:
    """The seed's flow: no cap at first, a cap later, back to none; same container, and swap
    stays off throughout."""
    spec = yaml.safe_load(web_spec(1, app="free"))
    spec["containers"][0]["resources"] = {"request": {"cpu": "100m", "memory": "32Mi"}}
    cluster.apply(yaml.safe_dump(spec))
    (inst,) = cluster.wait_running("free", 1)
    cid = inst["containers"][0]["id"]
    unlimited = int(cgroup_file(engine.inspect(cid)["State"]["Pid"], "memory",
                                "memory.limit_in_bytes"))
    assert _caps(engine, cid) == (unlimited, unlimited, -1 / 100000)
    assert engine.inspect(cid)["HostConfig"]["MemorySwappiness"] == 0
    out = cluster.ctl("update", "free", "--limit-cpu", "700m", "--limit-memory", "96Mi")
    assert out.returncode == 0 and "resized in place (generation 2, 1 container updated)" \
        in out.stdout, out.stderr
    assert _caps(engine, cid) == (96 * MiB, 96 * MiB, 0.7)
    out = cluster.ctl("update", "free", "--limit-cpu", "0", "--limit-memory", "0")
    assert out.returncode == 0, out.stderr
    cpus = engine.inspect(cid)["HostConfig"]["NanoCpus"] / 1e9
    assert _caps(engine, cid)[:2] == (unlimited, unlimited)  # no memory cap, no swap cap
    assert _caps(engine, cid)[2] == cpus  # the whole host: no cpu cap
    assert engine.inspect(cid)["State"]["Running"]
    assert cluster.instances("free")[0]["containers"][0]["id"] == cid
    assert cluster.instances("free")[0]["restarts"] == 0


def test_refused_update_changes_nothing(cluster: Cluster, engine: EngineHost) -> None:
    script = "tail -c 48000000 /dev/zero & exec httpd -f -p 8080"
    cluster.apply(web_spec(1, app="fat", script=script))
    (inst,) = cluster.wait_running("fat", 1)
    cid = inst["containers"][0]["id"]
    app_before = cluster.api("GET", "/v1/apps/default/fat")[1]
    out = cluster.ctl("update", "fat", "--request-memory", "100Ti", "--limit-memory", "200Ti")
    assert out.returncode == 1
    assert "does not fit on node node-1" in out.stderr and "nothing was changed" in out.stderr
    wait_for(lambda: engine.inspect(cid)["State"]["Pid"] and _rss(engine, cid) > 40 * MiB, 20,
             "the container to use 40 MiB")
    out = cluster.ctl("update", "fat", "--limit-memory", "40Mi", "--request-memory", "16Mi")
    assert out.returncode == 1
    assert "above the new memory limit" in out.stderr and "--force" in out.stderr
    assert _caps(engine, cid) == (128 * MiB, 128 * MiB, 0.5)
    assert cluster.api("GET", "/v1/apps/default/fat")[1] == app_before
    assert cluster.instances("fat")[0]["containers"][0]["id"] == cid


def _rss(engine: EngineHost, cid: str) -> int:
    pid = engine.inspect(cid)["State"]["Pid"]
    return int(cgroup_file(pid, "memory", "memory.usage_in_bytes"))


def ordered_spec(replicas: int) -> str:
    """Three containers sharing one network; each exits 1 at once if the one before it is
    not listening yet, so any start out of order shows as a termination."""
    def step(port: int, before: int | None) -> str:
        check = f"nc 127.0.0.1 {before} -e true || exit 1; " if before else ""
        return f"{check}sleep 0.5; exec httpd -f -p {port}"

    containers = [
        {"name": name, "image": IMAGE, "command": ["sh", "-c", step(port, before)],
         "ready": {"tcp": port, "timeout": 30}}
        for name, port, before in (("db", 9001, None), ("app", 9002, 9001),
                                   ("proxy", 9003, 9002))
    ]
    return yaml.safe_dump({"app": "ordered", "replicas": replicas, "containers": containers})


def test_containers_start_in_spec_order(cluster: Cluster) -> None:
    cluster.apply(ordered_spec(20))
    items = cluster.wait_running("ordered", 20, timeout=240)
    for inst in items:
        assert inst["terminations"] == [], inst["name"]
        assert inst["restarts"] == 0
        assert [c["name"] for c in inst["containers"]] == ["db", "app", "proxy"]
    out = cluster.ctl("events", "--app", "ordered", "--limit", "1000", "-o", "json")
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    step = re.compile(r"^(?:started container (\S+) \(|container (\S+) ready$)")
    for inst in items:
        mine = [m for e in events if e["name"] == inst["name"]
                and (m := step.match(e["message"]))]
        order = [(m.group(1) and "start " + m.group(1)) or "ready " + m.group(2) for m in mine]
        assert order == ["start db", "ready db", "start app", "ready app", "start proxy",
                         "ready proxy"], order


def test_depends_on_holds_the_dependent_app(cluster: Cluster, engine: EngineHost) -> None:
    cluster.apply(web_spec(1, app="front", depends_on=["back"]))
    inst = wait_for(lambda: (cluster.instances("front") or [{}])[0].get("reason", "")
                    .startswith("waiting for depends_on"), 20, "front held")
    assert inst
    time.sleep(2)
    assert engine.sigma_containers("front") == []
    front = cluster.instances("front")[0]
    assert front["state"] == "Scheduled" and "back (no such app)" in front["reason"]
    cluster.apply(web_spec(2, app="back"))
    cluster.wait_running("back", 2)
    cluster.wait_running("front", 1)


def test_restart_backoff_grows(cluster: Cluster) -> None:
    cluster.apply(web_spec(1, app="crash", script="exit 1", restart="always"))

    def four() -> list[float] | None:
        items = cluster.instances("crash")
        ends = [t["at"] for t in items[0]["terminations"]] if items else []
        return ends if len(ends) >= 4 else None

    ends = wait_for(four, 40, "four terminations")
    gaps = [b - a for a, b in itertools.pairwise(ends)]
    assert gaps[0] < gaps[1] < gaps[2], gaps
    assert gaps[2] >= 3.5  # 1 s, 2 s, 4 s backoff (plus a pass)
    inst = cluster.instances("crash")[0]
    assert inst["restarts"] >= 4
    assert all(t["reason"] == "Exited(1)" for t in inst["terminations"])


def test_host_compat_ports_env_and_reach(cluster: Cluster, engine: EngineHost) -> None:
    """A named port gets a host port from the node's range, published by Docker, injected as
    SIGMA_HOST_IP / SIGMA_HOST_PORT_<NAME>, reachable from outside the host, released on
    delete; the instance keeps its own network namespace (never the host's)."""
    import urllib.request

    host_ns = os.stat(f"/run/netns/{engine.netns}").st_ino
    # the comparison tells namespaces apart: the engine itself runs in the host's
    assert os.stat(f"/proc/{engine.proc.proc.pid}/ns/net").st_ino == host_ns  # type: ignore[union-attr]

    script = ("mkdir -p /www && echo $SIGMA_HOST_IP:$SIGMA_HOST_PORT_HTTP > /www/index.html && "
              "exec httpd -f -p $SIGMA_HOST_PORT_HTTP -h /www")
    spec = yaml.safe_load(web_spec(2, app="hc", script=script))
    spec["network"] = {"mode": "host-compat", "ports": [{"name": "http"}]}
    cluster.apply(yaml.safe_dump(spec))
    items = cluster.wait_running("hc", 2)
    ports = [i["host_ports"]["http"] for i in items]
    assert len(set(ports)) == 2 and all(31000 <= p <= 31009 for p in ports)
    for inst, port in zip(items, ports, strict=True):
        found = engine.inspect(inst["containers"][0]["id"])
        assert found["HostConfig"]["NetworkMode"] != "host"
        assert os.stat(f"/proc/{found['State']['Pid']}/ns/net").st_ino != host_ns
        env = found["Config"]["Env"]
        assert f"SIGMA_HOST_IP={engine.address}" in env
        assert f"SIGMA_HOST_PORT_HTTP={port}" in env

        def answer(p: int = port) -> str:
            try:
                with urllib.request.urlopen(f"http://{engine.address}:{p}/", timeout=2) as r:
                    return r.read().decode().strip()
            except OSError:
                return ""

        assert wait_for(answer, 10, f"an answer on {engine.address}:{port}") == \
            f"{engine.address}:{port}"
    status, body = cluster.api("GET", "/v1/instances/default/hc-0")
    assert status == 200 and body["host_ports"] == {"http": ports[0]}
    out = cluster.ctl("delete", "app", "hc")
    assert out.returncode == 0, out.stderr
    spec["app"] = "hc2"
    spec["replicas"] = 10  # the whole range of 10 ports: only free if hc's were released
    cluster.apply(yaml.safe_dump(spec))
    items = cluster.wait_running("hc2", 10, timeout=90)
    assert sorted(i["host_ports"]["http"] for i in items) == list(range(31000, 31010))
    spec["app"], spec["replicas"] = "hc3", 1
    cluster.apply(yaml.safe_dump(spec))
    pending = wait_for(lambda: (cluster.instances("hc3") or [{}])[0].get("unschedulable"), 20,
                       "hc3 Pending for want of ports")
    assert pending == {"host ports exhausted": 1}


def test_pool_why_and_event_stream(cluster: Cluster) -> None:
    """`sigmactl pool` sums the Ready nodes; `why` explains a Pending instance; `events -w`
    streams as things happen."""
    import subprocess
    import sys

    watch = subprocess.Popen(
        [sys.executable, "-m", "sigmactl", "events", "-w", "--app", "web", "-o", "json"],
        stdout=subprocess.PIPE, text=True, env=cluster.env,
    )
    try:
        cluster.apply(web_spec(2))
        cluster.wait_running("web", 2)
        lines = [json.loads(watch.stdout.readline()) for _ in range(3)]  # type: ignore[union-attr]
        assert {e["app"] for e in lines} == {"web"}
    finally:
        watch.send_signal(signal.SIGINT)
        assert watch.wait(10) == 0

    spec = yaml.safe_load(web_spec(1, app="picky"))
    spec["placement"] = {"labels": {"zone": "room-z"}}
    cluster.apply(yaml.safe_dump(spec))
    wait_for(lambda: (cluster.instances("picky") or [{}])[0].get("unschedulable"), 20,
             "picky Pending with counts")
    out = cluster.ctl("why", "picky-0")
    assert out.returncode == 0, out.stderr
    assert "picky-0 is Pending: 1 node: labels mismatch" in out.stdout

    out = cluster.ctl("pool", "-o", "json")
    assert out.returncode == 0, out.stderr
    pool = json.loads(out.stdout)
    node = cluster.api("GET", f"/v1/nodes/{cluster.node_name}")[1]
    assert pool["nodes"] == 1 and pool["instances"] == 2
    assert pool["allocatable"] == node["allocatable"]
    assert pool["requested"] == {"cpu_m": 200, "memory": 128 * MiB}
    assert pool["limits"] == {"cpu_m": 1000, "memory": 256 * MiB}
    assert pool["by_label"]["zone"]["room-a"]["requested"] == pool["requested"]
    table = cluster.ctl("pool")
    assert table.returncode == 0 and "zone=room-a" in table.stdout


def test_start_failures_are_clear_and_retried(cluster: Cluster) -> None:
    """A readiness probe past its timeout, and an image no registry has, each end the start
    with a FailedToStart reason, and are retried with back-off."""
    spec = yaml.safe_load(web_spec(1, app="deaf", script="exec sleep 600"))
    spec["containers"][0]["ready"] = {"tcp": 9999, "timeout": 2}
    cluster.apply(yaml.safe_dump(spec))
    inst = wait_for(lambda: next((i for i in cluster.instances("deaf")
                                  if i["restarts"] >= 2), None), 40, "deaf retried twice")
    assert [t["reason"] for t in inst["terminations"]][:2] == \
        ["FailedToStart(container main not ready after 2s)"] * 2

    spec = yaml.safe_load(web_spec(1, app="ghost"))
    spec["containers"][0]["image"] = "127.0.0.1:1/sigma/none:1"
    cluster.apply(yaml.safe_dump(spec))
    inst = one(cluster, "ghost", "FailedToStart")
    assert inst["reason"].startswith(
        "FailedToStart(image 127.0.0.1:1/sigma/none:1 cannot be pulled"), inst["reason"]
    assert inst["next_start"] > 0


def test_template_update_books_the_new_request_first(cluster: Cluster, engine: EngineHost) -> None:
    """Replacing containers for a new template books the new request on the node first; an
    instance whose bigger request does not fit keeps its old containers and says why."""
    cluster.apply(web_spec(2))
    before = {i["name"]: i["containers"][0]["id"] for i in cluster.wait_running("web", 2)}
    cpus = json.loads(engine.docker("info", "--format", "{{json .}}").stdout)["NCPU"]
    spec = yaml.safe_load(web_spec(2))
    spec["containers"][0]["env"] = {"RELEASE": "2"}
    # The first instance fits with the bigger request, the second one no longer does.
    request = cpus * 1000 - 300
    spec["containers"][0]["resources"] = {"request": {"cpu": f"{request}m"},
                                          "limit": {"cpu": f"{request}m"}}
    cluster.apply(yaml.safe_dump(spec))

    def split() -> list[dict[str, Any]] | None:
        items = cluster.instances("web")
        moved = [i for i in items if i["state"] == "Running"
                 and i["containers"][0]["id"] not in before.values()]
        waiting = [i for i in items if i["reason"].startswith("update waits")]
        return items if len(moved) == 1 and len(waiting) == 1 else None

    items = wait_for(split, 30, "one instance replaced, one waiting")
    waiting = next(i for i in items if i["reason"].startswith("update waits"))
    assert waiting["containers"][0]["id"] == before[waiting["name"]]
    assert "insufficient cpu" in waiting["reason"]
    node = cluster.api("GET", f"/v1/nodes/{cluster.node_name}")[1]
    assert node["requested"]["cpu_m"] <= node["allocatable"]["cpu_m"]
