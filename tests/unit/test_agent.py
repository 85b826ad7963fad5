"""The node agent's pure parts: engine checks and the node record from `docker info`."""

from __future__ import annotations

import pytest

from sigmad.config import NodeConfig
from sigmad.models import Overcommit
from sigmad.node.agent import NodeRefused, check_engine, node_record
from sigmad.node.dockerd import option, userland_proxy, userland_proxy_of
from sigmad.spec import Resources

INFO = {"NCPU": 8, "MemTotal": 16 << 30, "ServerVersion": "20.10.24", "SwapLimit": True,
        "MemoryLimit": True, "LiveRestoreEnabled": True, "CgroupDriver": "systemd"}


def test_engine_without_swap_accounting_is_refused() -> None:
    with pytest.raises(NodeRefused) as refused:
        check_engine("unix:///x.sock", {**INFO, "SwapLimit": False})
    assert "memory-swap accounting" in refused.value.message
    assert "swapaccount=1" in refused.value.message
    assert check_engine("unix:///x.sock", INFO) == []


def test_engine_without_live_restore_is_warned_with_the_fix() -> None:
    [warning] = check_engine("unix:///x.sock", {**INFO, "LiveRestoreEnabled": False})
    assert "live-restore" in warning and "daemon.json" in warning


def test_engine_with_cgroupfs_driver_is_warned_with_the_fix() -> None:
    [warning] = check_engine("unix:///x.sock", {**INFO, "CgroupDriver": "cgroupfs"})
    assert "cgroupfs" in warning and "native.cgroupdriver=systemd" in warning


def test_engine_with_the_userland_proxy_is_warned_with_the_fix() -> None:
    [warning] = check_engine("unix:///x.sock", INFO, userland_proxy=True)
    assert "userland proxy" in warning and '"userland-proxy": false' in warning
    assert check_engine("unix:///x.sock", INFO, userland_proxy=False) == []
    assert check_engine("unix:///x.sock", INFO, userland_proxy=None) == []  # cannot tell


@pytest.mark.parametrize(("cmdline", "config", "on"), [
    (["dockerd"], {}, True),  # dockerd's default
    (["dockerd", "--userland-proxy=false"], {}, False),
    (["dockerd", "--userland-proxy=0"], {"userland-proxy": True}, False),  # the flag wins
    (["dockerd", "--userland-proxy", "-H", "fd://"], {}, True),  # a bare boolean flag
    (["dockerd", "--userland-proxy=false", "--userland-proxy=true"], {}, True),  # the last
    (["dockerd", "-H", "fd://"], {"userland-proxy": False}, False),  # daemon.json
])
def test_userland_proxy_from_the_command_line_and_daemon_json(
        cmdline: list[str], config: dict[str, object], on: bool) -> None:
    assert userland_proxy_of(cmdline, config) is on


def test_options_with_a_separate_value_and_engines_that_cannot_be_read() -> None:
    assert option(["dockerd", "--config-file", "/etc/d.json"], "config-file") == "/etc/d.json"
    assert option(["dockerd", "--config-file=/x.json"], "config-file") == "/x.json"
    assert option(["dockerd"], "config-file") is None
    assert userland_proxy("tcp://10.0.0.1:2376") is None  # runs elsewhere: not read
    assert userland_proxy("unix:///nonexistent/docker.sock") is None


def test_node_record_subtracts_reserved_and_keeps_draining() -> None:
    config = NodeConfig(name="h1", labels={"zone": "a"}, reserved=Resources(500, 1 << 30),
                        overcommit=Overcommit(2.0, 1.5), port_range=[32000, 32100])
    node = node_record(config, INFO, draining=True)
    assert node.capacity == Resources(8000, 16 << 30)
    assert node.allocatable == Resources(7500, 15 << 30)
    assert node.overcommit == Overcommit(2.0, 1.5)
    assert node.port_range == [32000, 32100]
    assert node.draining and node.labels == {"zone": "a"}
    assert node.engine_version == "20.10.24"


def test_node_record_reports_the_configured_capacity_over_the_engines() -> None:
    """A host capped below the machine (a lab host) reports its cap, not docker info's."""
    config = NodeConfig(name="h1", capacity=Resources(2000, 4 << 30),
                        reserved=Resources(500, 1 << 30))
    node = node_record(config, INFO, draining=False)
    assert node.capacity == Resources(2000, 4 << 30)
    assert node.allocatable == Resources(1500, 3 << 30)
    only_cpu = node_record(NodeConfig(name="h1", capacity=Resources(3000, 0)), INFO, False)
    assert only_cpu.capacity == Resources(3000, 16 << 30)
