"""On a lab with an HA pair of masters: a rolling restart as an upgrade does it
(tests.integration.rolling: nothing acknowledged is lost, no instance is restarted or moved),
`--check` on every master and host, and the install path on a lab host."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sigmad import schema
from sigmad.lab import services
from sigmad.lab.net import inside
from tests.integration.conftest import REPO
from tests.integration.labkit import LabCluster, web
from tests.integration.rolling import (
    pair_lab,
    restart_agent,
    restart_master,
    roles,
    under_load_nothing_lost,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabCluster]:
    with pair_lab(tmp_path_factory.mktemp("rolling"), "rr", 75) as lab:
        yield lab


def test_rolling_restart_of_masters_then_agents_loses_nothing(pair: LabCluster) -> None:
    under_load_nothing_lost(pair)


def test_check_passes_on_the_labs_masters_and_hosts(pair: LabCluster) -> None:
    """`sigmad master --check` and `sigmad node --check` against real etcd, engines and
    certificates: nothing to fix; the schema is the leader's, version 1."""
    lab = pair.lab
    env = services.sigma_env()
    for m in lab.masters:
        done = subprocess.run([sys.executable, "-m", "sigmad", "master", "--check",
                               "--config", m.config], capture_output=True, text=True,
                              timeout=60, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"ok    schema under /sigma/v1: version {schema.VERSION}" in done.stdout
        assert "WARN  listen" in done.stdout  # the master runs there
    for h in lab.hosts:
        done = subprocess.run([*inside(h.netns), sys.executable, "-m", "sigmad", "node",
                               "--check", "--config", h.node_config], capture_output=True,
                              text=True, timeout=60, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "ok    engine tcp://" in done.stdout and "FAIL" not in done.stdout


@pytest.mark.timeout(900)
def test_the_install_path_on_a_lab_host_offline_then_its_agent_and_a_master_run_it(
        pair: LabCluster, tmp_path: Path) -> None:
    """scripts/install.sh run inside a lab host's own network namespace with no package
    index (the wheel of `make dist` and its pinned dependencies carried in as files, as on a
    host without internet); the installed `sigmad node --check` passes there; that host's
    agent and the standby master are replaced by the installed sigmad (an upgrade): the node
    is Ready again with the same containers running, and the pair has a leader again."""
    lab = pair.lab
    host = lab.hosts[0]
    app = f"ri{uuid.uuid4().hex[:6]}"
    pair.apply(web(pair, app, 3, placement={"spread": "host"}))
    here = {i["containers"][0]["id"] for i in pair.running(app, 3) if i["node"] == host.name}
    assert len(here) == 1

    dist, wheels = tmp_path / "dist", tmp_path / "wheels"
    built = subprocess.run(["make", "-s", "dist", f"DIST={dist}"], capture_output=True,
                           text=True, cwd=REPO, timeout=300)
    assert built.returncode == 0, built.stderr
    [wheel] = dist.glob("sigma_orchestrator-*.whl")
    constraints = tmp_path / "constraints.txt"  # the lock's versions, as install.sh takes them
    constraints.write_text("".join(line.split(" \\")[0].rstrip() + "\n" for line in
                                   (REPO / "requirements.lock").read_text().splitlines()
                                   if "--hash" not in line))
    fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet",
                              "--disable-pip-version-check", "-d", str(wheels),
                              "-c", str(constraints), str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert fetched.returncode == 0, fetched.stderr

    root = tmp_path / "host"
    prefix, bin_dir, etc = root / "opt/sigma", root / "usr/local/bin", root / "etc/sigma"
    installed = subprocess.run(
        [*inside(host.netns), "bash", str(REPO / "scripts/install.sh"), "--wheel", str(wheel),
         "--pip-args", f"--no-index --find-links {wheels}", "--prefix", str(prefix),
         "--bin-dir", str(bin_dir), "--etc-dir", str(etc),
         "--unit-dir", str(root / "etc/systemd/system")],
        capture_output=True, text=True, timeout=300, env=_without_pythonpath())
    assert installed.returncode == 0, installed.stdout + installed.stderr
    sigmad = str(bin_dir / "sigmad")
    checked = subprocess.run([*inside(host.netns), sigmad, "node", "--check", "--config",
                              host.node_config], capture_output=True, text=True, timeout=60,
                             env=_without_pythonpath())
    assert checked.returncode == 0 and "FAIL" not in checked.stdout, \
        checked.stdout + checked.stderr

    restart_agent(pair, host.name, sigmad)
    agent = lab.host(host.name).agent_pid
    assert str(prefix) in Path(f"/proc/{agent}/cmdline").read_text()  # the installed one runs
    assert {i["containers"][0]["id"] for i in pair.running(app, 3)
            if i["node"] == host.name} == here  # its instance kept running, untouched

    now = roles(lab)
    standby = next(listen for listen, role in now.items() if role == "standby")
    restart_master(lab, standby, sigmad)
    pid = next(m.pid for m in lab.masters if m.listen == standby)
    assert str(prefix) in Path(f"/proc/{pid}/cmdline").read_text()
    pair.delete(app)


def _without_pythonpath() -> dict[str, str]:
    """This environment without the test's PYTHONPATH: an installed sigmad imports its own."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
