"""Honest lab capacity: each host's engine runs its containers under a cgroup parent capped at
the host's cpu and memory, its node reports that capacity, and the pool sums it."""

from __future__ import annotations

import json

import pytest

from sigmad.lab.system import cgroup_dirs
from tests.integration.labkit import HOST_CPU, HOST_MEMORY, LabCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_each_host_is_capped_and_reports_its_capacity(lab: LabCluster) -> None:
    nodes = json.loads(lab.ctl("get", "nodes", "-o", "json").stdout)
    assert {n["name"]: n["capacity"] for n in nodes} == {
        h.name: {"cpu_m": HOST_CPU, "memory": HOST_MEMORY} for h in lab.lab.hosts}
    result = lab.ctl("pool", "-o", "json")
    assert result.returncode == 0, result.stderr
    pool = json.loads(result.stdout)
    hosts = len(lab.lab.hosts)
    assert pool["nodes"] == hosts
    assert pool["allocatable"] == {"cpu_m": hosts * HOST_CPU, "memory": hosts * HOST_MEMORY}
    for h in lab.lab.hosts:
        dirs = cgroup_dirs(h.cgroup_parent)
        cpu, mem = dirs["cpu"], dirs["memory"]
        quota = int((cpu / "cpu.cfs_quota_us").read_text())
        period = int((cpu / "cpu.cfs_period_us").read_text())
        assert quota * 1000 // period == HOST_CPU
        assert int((mem / "memory.limit_in_bytes").read_text()) == HOST_MEMORY


def test_a_container_without_a_limit_is_held_by_its_hosts_cap(lab: LabCluster) -> None:
    """A container of h1's engine sits under h1's capped cgroup: the memory limit it is held
    to (its own and its parents') is the host's, and its cpu cgroup is under the cap."""
    script = ("grep hierarchical_memory_limit /sys/fs/cgroup/memory/memory.stat; "
              "grep -E ':(cpu|cpu,cpuacct|memory):' /proc/self/cgroup")
    out = lab.docker("h1", "run", "--rm", lab.lab.image, "sh", "-c", script).stdout
    assert f"hierarchical_memory_limit {HOST_MEMORY}" in out, out
    parent = lab.lab.host("h1").cgroup_parent
    paths = [line.split(":", 2)[2] for line in out.splitlines() if line.count(":") >= 2]
    assert len(paths) == 2 and all(f"/{parent}/" in p for p in paths), out
