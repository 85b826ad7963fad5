"""`sigmad lab up --cpu/--memory`: each host's share, its capped cgroup parent, and the node
config that reports it."""

from __future__ import annotations

from pathlib import Path

import pytest

from sigmad.config import load_node
from sigmad.lab import LabConfig, services
from sigmad.lab.config import LabError, parse_cpu_option, parse_memory_option
from sigmad.lab.state import HostState, LabState
from sigmad.lab.system import cap_cgroup, own_cgroups, remove_cgroups
from sigmad.spec import Resources


def host(cfg: LabConfig, cpu_m: int = 0, memory: int = 0) -> HostState:
    return HostState(name="h1", netns="t-h1", veth="t-h1", address=cfg.host_address(1),
                     root=str(cfg.root / "h1"), engine=f"unix://{cfg.root}/h1/docker.sock",
                     exec_root="/run/x", cgroup_parent="sigma-lab-t-h1", cpu_m=cpu_m,
                     memory=memory)


def test_the_default_divides_the_machine_between_the_hosts() -> None:
    machine = (8000, 24 << 30)
    assert LabConfig(hosts=3).host_capacity(machine) == (2666, 8 << 30)
    assert LabConfig(hosts=3, cpu=2000, memory=4 << 30).host_capacity(machine) == (2000, 4 << 30)
    assert LabConfig(hosts=40).host_capacity((2000, 1 << 30)) == (100, 64 << 20)  # floors


def test_options_parse_and_bad_ones_name_the_option() -> None:
    assert parse_cpu_option("2") == 2000 and parse_cpu_option("500m") == 500
    assert parse_cpu_option("") == 0 and parse_memory_option("") == 0
    assert parse_memory_option("4Gi") == 4 << 30
    with pytest.raises(LabError, match="--cpu 'two'"):
        parse_cpu_option("two")
    with pytest.raises(LabError, match="--memory"):
        parse_memory_option("lots")
    with pytest.raises(LabError, match="--cpu 50m"):
        LabConfig(cpu=50).validate()
    with pytest.raises(LabError, match="--memory"):
        LabConfig(memory=1 << 20).validate()


def test_the_node_config_reports_the_hosts_capacity(tmp_path: Path) -> None:
    cfg = LabConfig(name="t", dir=tmp_path / "lab", hosts=1, tls=False)
    capped = host(cfg, 2000, 4 << 30)
    Path(capped.root).mkdir(parents=True)
    services.write_node_config(cfg, capped, 1)
    assert load_node(capped.node_config).capacity == Resources(2000, 4 << 30)
    services.write_node_config(cfg, host(cfg), 1)  # a lab from before caps: the engine's
    assert load_node(capped.node_config).capacity == Resources(0, 0)


def test_the_capacity_is_kept_in_lab_json(tmp_path: Path) -> None:
    cfg = LabConfig(name="t", dir=tmp_path, hosts=1)
    capped = host(cfg, 1500, 1 << 30)
    capped.cgroups = ["/sys/fs/cgroup/cpu/sigma-lab-t-h1"]
    state = LabState("t", str(tmp_path), "10.81.6.0/24", "10.81.6.1", hosts=[capped])
    state.save()
    loaded = LabState.load(tmp_path)
    assert loaded is not None and (loaded.hosts[0].cpu_m, loaded.hosts[0].memory) == \
        (1500, 1 << 30)
    assert loaded.hosts[0].cgroups == ["/sys/fs/cgroup/cpu/sigma-lab-t-h1"]


OWN_V1 = "4:memory:/process_api/abc\n2:cpu,cpuacct:/\n0::/\n"


def test_cap_cgroup_v1_writes_the_cfs_quota_and_the_memory_limit(tmp_path: Path) -> None:
    """Under this process's own cgroup in each hierarchy: where runc puts a relative
    --cgroup-parent."""
    (tmp_path / "cpu,cpuacct").mkdir()
    (tmp_path / "memory/process_api/abc").mkdir(parents=True)
    made = cap_cgroup("sigma-lab-t-h1", 1500, 2 << 30, root=tmp_path, own=own_cgroups(OWN_V1))
    assert made == [tmp_path / "cpu,cpuacct/sigma-lab-t-h1",
                    tmp_path / "memory/process_api/abc/sigma-lab-t-h1"]
    assert (made[0] / "cpu.cfs_period_us").read_text() == "100000"
    assert (made[0] / "cpu.cfs_quota_us").read_text() == "150000"
    assert (made[1] / "memory.limit_in_bytes").read_text() == str(2 << 30)


def test_cap_cgroup_v2_writes_cpu_max_and_memory_max(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory")
    (tmp_path / "lab.scope").mkdir()
    [made] = cap_cgroup("sigma-lab-t-h1", 2000, 4 << 30, root=tmp_path,
                        own=own_cgroups("0::/lab.scope\n"))
    assert made == tmp_path / "lab.scope/sigma-lab-t-h1"
    assert (made / "cpu.max").read_text() == "200000 100000"
    assert (made / "memory.max").read_text() == str(4 << 30)
    assert (tmp_path / "lab.scope/cgroup.subtree_control").read_text() == "+cpu +memory"


def test_down_removes_the_capped_directories_up_recorded(tmp_path: Path) -> None:
    """Wherever `up` made them (under the cgroup of the process that ran it, maybe not
    the one that runs `down`)."""
    made = tmp_path / "memory/process_api/other/sigma-lab-t-h1"
    (made / "container").mkdir(parents=True)
    assert remove_cgroups("sigma-lab-no-such-lab-h1", [str(made)]) == []
    assert not made.exists()
