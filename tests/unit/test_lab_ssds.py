"""`sigmad lab up --ssds N`: the options, and the node config listing each host's loop devices."""

from __future__ import annotations

from pathlib import Path

import pytest

from sigmad.config import load_node
from sigmad.lab import LabConfig, services
from sigmad.lab.config import LabError, parse_ssd_size
from sigmad.lab.state import HostState, LabState, LoopDisk


def test_the_node_config_lists_the_hosts_loop_devices(tmp_path: Path) -> None:
    cfg = LabConfig(name="t", dir=tmp_path / "lab", hosts=1, tls=False, ssds=2)
    host = HostState(name="h1", netns="t-h1", veth="t-h1", address=cfg.host_address(1),
                     root=str(cfg.root / "h1"), engine=f"unix://{cfg.root}/h1/docker.sock",
                     exec_root="/run/x", cgroup_parent="x",
                     ssds=[LoopDisk("/x/ssd1.img", "/dev/loop4"),
                           LoopDisk("/x/ssd2.img", "/dev/loop5")])
    Path(host.root).mkdir(parents=True)
    services.write_node_config(cfg, host, 1)
    node = load_node(host.node_config)
    assert node.ssds == ["/dev/loop4", "/dev/loop5"]
    assert node.data_dir == f"{host.root}/sigma"  # under the host: `down` unmounts it


def test_the_loop_devices_are_kept_in_lab_json(tmp_path: Path) -> None:
    state = LabState("t", str(tmp_path), "10.81.6.0/24", "10.81.6.1", hosts=[HostState(
        name="h1", netns="n", veth="v", address="a", root="r", engine="e", exec_root="x",
        cgroup_parent="c", ssds=[LoopDisk("/x/ssd1.img", "/dev/loop4")])])
    state.save()
    loaded = LabState.load(tmp_path)
    assert loaded is not None and loaded.hosts[0].ssds == [LoopDisk("/x/ssd1.img", "/dev/loop4")]


@pytest.mark.parametrize(("ssds", "size", "text"), [
    (9, 1 << 30, "--ssds 9"), (-1, 1 << 30, "--ssds -1"), (1, 1 << 20, "--ssd-size"),
])
def test_bad_ssd_options(ssds: int, size: int, text: str) -> None:
    with pytest.raises(LabError, match=text):
        LabConfig(ssds=ssds, ssd_size=size).validate()
    with pytest.raises(LabError, match="--ssd-size"):
        parse_ssd_size("ten")
    assert parse_ssd_size("10Gi") == 10 << 30
