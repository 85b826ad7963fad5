"""`sigmad lab`: up, status, partition/heal, kill-host/heal and down of a 2-host lab, through
the real command line; a finalizer always runs `down`, so a failing test leaves nothing."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import REPO, free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


class LabRun:
    """Runs `python -m sigmad lab ...` for one lab."""

    def __init__(self, tmp_path: Path) -> None:
        self.name = f"lt{os.getpid() % 0x100000:x}"[:8]
        self.dir = tmp_path / "lab"
        self.subnet = f"10.78.{os.getpid() % 250}.0/24"
        self.env = {**os.environ, "SIGMA_CREDENTIALS": str(tmp_path / "credentials.json"),
                    "PYTHONPATH": str(REPO)}

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sigmad", "lab", *args, "--name", self.name,
             "--dir", str(self.dir)],
            capture_output=True, text=True, env=self.env, timeout=timeout,
        )

    def status(self) -> dict[str, Any]:
        result = self.run("status", "-o", "json", timeout=30)
        assert result.returncode == 0, result.stderr
        report: dict[str, Any] = json.loads(result.stdout)
        return report

    def host(self, name: str) -> dict[str, Any]:
        return next(h for h in self.status()["hosts"] if h["name"] == name)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[LabRun]:
    if os.geteuid() != 0:
        pytest.skip("sigmad lab needs root")
    run = LabRun(tmp_path)
    try:
        yield run
    finally:
        run.run("down", timeout=120)


def _ping(netns: str, address: str) -> bool:
    result = subprocess.run(
        ["nsenter", f"--net=/var/run/netns/{netns}", "timeout", "5", "busybox", "ping", "-c1",
         "-W1", address], capture_output=True, timeout=10,
    )
    return result.returncode == 0


def _pgrep(pattern: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", "--", pattern], capture_output=True, text=True,
                         timeout=10).stdout
    return out.splitlines()


def _leftovers(run: LabRun) -> list[str]:
    """Everything of the lab still on the machine."""
    found = []
    names = subprocess.run(["ip", "netns"], capture_output=True, text=True, timeout=10).stdout
    found += [f"netns {n}" for n in names.split() if n.startswith(f"{run.name}-")]
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True,
                           timeout=10).stdout
    found += [f"link {line.split()[0]}" for line in links.splitlines()
              if line.startswith(f"{run.name}-")]
    mounts = Path("/proc/self/mountinfo").read_text()
    found += [f"mount {line.split()[4]}" for line in mounts.splitlines()
              if str(run.dir) in line or f"/sigma-lab/{run.name}-" in line]
    found += [f"process {p}" for p in _pgrep(str(run.dir)) + _pgrep(f"sigma-lab/{run.name}-")]
    rules = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True,
                           timeout=10).stdout
    found += [f"rule {r}" for r in rules.splitlines() if f"sigma-lab-{run.name}" in r]
    found += [f"cgroup {d}" for d in glob.glob(f"/sys/fs/cgroup/*/sigma-lab-{run.name}-*")]
    found += [f"dir {p}" for p in (run.dir, Path(f"/run/sigma-lab/{run.name}-h1")) if p.exists()]
    loops = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                           capture_output=True, text=True, timeout=10).stdout
    found += [f"loop {line}" for line in loops.splitlines() if str(run.dir) in line]
    return found


def _ssd_mounts(run: LabRun) -> dict[str, str]:
    """Mount point → device of the lab's SSDs, mounted by the agents."""
    found = {}
    for line in Path("/proc/self/mounts").read_text().splitlines():
        device, where, kind, options, *_ = line.split()
        if where.startswith(f"{run.dir}/") and "/sigma/ssds/" in where:
            assert kind == "ext4" and {"nodev", "nosuid"} <= set(options.split(","))
            found[where] = device
    return found


def test_lab_up_break_heal_down(lab: LabRun) -> None:
    up = lab.run("up", "--hosts", "2", "--subnet", lab.subnet,
                 "--etcd-port", str(free_port(pair=True)), "--registry-port", str(free_port()),
                 "--listen", f"127.0.0.1:{free_port()}", "--heartbeat-ttl", "2",
                 "--ssds", "2", "--ssd-size", "256Mi", timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "starting dockerd on h1..h2" in up.stdout and "token:" in up.stdout

    # each host's 2 loop devices are on its node's allow-list; its agent formats and mounts them
    state = json.loads((lab.dir / "lab.json").read_text())
    devices = {d["device"]: d["file"] for h in state["hosts"] for d in h["ssds"]}
    assert len(devices) == 4 and all(
        Path(f"/sys/class/block/{Path(dev).name}/loop/backing_file").read_text().strip() == file
        for dev, file in devices.items())
    mounted = wait_for(lambda: m if len(m := _ssd_mounts(lab)) == 4 else None, 60,
                       "4 SSDs formatted and mounted")
    assert set(mounted.values()) == set(devices)

    status = lab.status()
    assert [h["name"] for h in status["hosts"]] == ["h1", "h2"]
    assert all(h["engine"] and h["agent"] and h["state"] == "up" for h in status["hosts"])
    assert status["registry"]["answers"] and status["masters"][0]["healthy"]
    h1, h2 = status["hosts"]

    again = lab.run("up", "--hosts", "2", "--subnet", lab.subnet)
    assert again.returncode == 1
    assert f"a lab named {lab.name} exists" in again.stderr

    # partition h2: its root-side link goes down and h1 no longer reaches it
    assert _ping(h1["netns"], h2["address"])
    assert lab.run("partition", "h2").returncode == 0
    flags = int(Path(f"/sys/class/net/{lab.name}-h2/flags").read_text(), 16)
    assert not flags & 1
    assert not _ping(h1["netns"], h2["address"])
    assert lab.host("h2")["state"] == "partitioned"
    assert lab.run("heal", "h2").returncode == 0
    wait_for(lambda: _ping(h1["netns"], h2["address"]), 10, "h1 reaching h2 after heal")

    # kill-host h2: nothing of its engine survives; heal brings the engine back
    killed = lab.run("kill-host", "h2")
    assert killed.returncode == 0, killed.stderr
    assert _pgrep(f"/run/sigma-lab/{lab.name}-h2") == []
    assert _pgrep(f"{lab.dir}/h2/") == []
    h2_now = lab.host("h2")
    assert h2_now["state"] == "killed" and not h2_now["engine"] and not h2_now["agent"]
    healed = lab.run("heal", "h2")
    assert healed.returncode == 0, healed.stdout + healed.stderr
    h2_now = lab.host("h2")
    assert h2_now["state"] == "up" and h2_now["engine"] and h2_now["agent"]
    healthy = lab.run("heal", "h2")
    assert healthy.returncode == 0 and "nothing to heal" in healthy.stdout

    down = lab.run("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert _leftovers(lab) == []
    second = lab.run("down")
    assert second.returncode == 0 and "no lab" in second.stdout
