"""Observability on a real master, agent, etcd and dockerd: /metrics of both parsed by
prometheus_client, a busy container's cpu in the agent's usage samples, `sigmactl logs -f`
following a container that writes a line a second, and `--previous` (and describe) showing
the last lines of an Exited(1) after its container is gone."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sigmad.procs import EtcdProcess
from tests.integration.conftest import Cluster, EngineHost, free_port, wait_for, web_spec

pytestmark = pytest.mark.integration


@pytest.fixture
def observed(tmp_path: Path, etcd: EtcdProcess, engine: EngineHost) -> Iterator[Cluster]:
    """The cluster fixture's master and agent, the agent sampling every second and serving
    /metrics on the test host's address."""
    c = Cluster(tmp_path, etcd, engine)
    node = yaml.safe_load((tmp_path / "node.yaml").read_text())
    node.update(usage_interval=1, metrics_listen=f"{engine.address}:{free_port()}")
    (tmp_path / "node.yaml").write_text(yaml.safe_dump(node))
    c.agent_metrics = f"http://{node['metrics_listen']}/metrics"  # type: ignore[attr-defined]
    c.start_master()
    c.start_node()
    yield c
    c.close()


def _families(url: str, token: str | None = None) -> dict[str, float]:
    """Every sample of a /metrics answer, parsed as Prometheus does: name{labels} → value."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
        text = r.read().decode()
    return {s.name + str(sorted(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_metrics_of_master_and_agent_parse(observed: Cluster) -> None:
    observed.apply(web_spec(1))
    observed.wait_running("web", 1)
    master = wait_for(lambda: (m := _families(f"{observed.server}/metrics", observed.token))
                      .get("sigma_instances[('app', 'default/web'), ('state', 'Running')]")
                      and m, 30, "the master's metrics to count web-0 Running")
    assert master["sigma_nodes[('status', 'Ready')]"] == 1
    assert master["sigma_placements_total[]"] >= 1
    assert any(k.startswith("sigma_engine_call_seconds_count") for k in master)
    assert master["sigma_etcd_txn_seconds_count[]"] > 0
    url = observed.agent_metrics  # type: ignore[attr-defined]
    agent = wait_for(lambda: (a := _families(url)).get("sigma_agent_instances[]") and a, 30,
                     "the agent's metrics to count its instance")
    assert agent["sigma_agent_heartbeat_ok[]"] == 1
    assert agent["sigma_agent_cpu_cores[('kind', 'capacity')]"] >= 1
    assert agent["sigma_usage_samples_total[]"] >= 1


def test_a_busy_container_uses_cpu(observed: Cluster) -> None:
    observed.apply(web_spec(1, app="busy", script="while :; do :; done"))
    observed.wait_running("busy", 1)

    def busy() -> float | None:
        status, body = observed.api("GET", "/v1/usage")
        assert status == 200, body
        used = [s["instances"].get("default/busy-0") for s in body["items"]]
        cpu = used[0]["cpu"] if used and used[0] else 0.0
        return cpu if cpu > 0.1 else None

    cpu = wait_for(busy, 30, "a usage sample with busy-0's cpu")
    assert cpu <= 0.6  # its cap is 500m
    out = observed.ctl("top", "instances")
    assert out.returncode == 0 and "default/busy-0" in out.stdout, out.stderr
    nodes = observed.ctl("top", "nodes")
    assert nodes.returncode == 0 and "machine" in nodes.stdout, nodes.stderr
    pool = observed.ctl("pool")
    assert "CPU(USED)" in pool.stdout


def test_logs_follow_a_line_a_second(observed: Cluster) -> None:
    observed.apply(web_spec(1, app="ticker", script="i=0; while :; do echo tick $i; "
                            "i=$((i+1)); sleep 1; done"))
    observed.wait_running("ticker", 1)
    follower = subprocess.Popen([sys.executable, "-m", "sigmactl", "logs", "-f", "--tail", "1",
                                 "ticker-0"], stdout=subprocess.PIPE, env=observed.env)
    assert follower.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + 30
    try:
        while len(seen) < 4 and time.monotonic() < deadline:
            ready, _, _ = select.select([follower.stdout], [], [], 1)
            if ready:
                data = os.read(follower.stdout.fileno(), 4096).decode()
                assert data, "the follow ended"
                seen += [line for line in data.splitlines() if line.startswith("tick")]
    finally:
        follower.terminate()
        follower.wait(10)
    numbers = [int(line.split()[1]) for line in seen]
    assert len(numbers) >= 4, seen
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # in order, none lost


def test_previous_shows_the_last_lines_of_an_exit_1(observed: Cluster) -> None:
    observed.apply(web_spec(1, app="crash", restart="never",
                            script="echo starting; echo config missing: /etc/x; exit 1"))
    wait_for(lambda: [i for i in observed.instances("crash") if i["state"] == "Failed"], 60,
             "crash-0 Failed")
    out = observed.ctl("logs", "--previous", "crash-0")
    assert out.returncode == 0, out.stderr
    assert "ended: Exited(1)" in out.stdout
    assert out.stdout.endswith("starting\nconfig missing: /etc/x\n")
    described = observed.ctl("describe", "instance", "crash-0").stdout
    assert "  config missing: /etc/x" in described
