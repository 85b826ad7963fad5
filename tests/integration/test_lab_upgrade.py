"""An upgrade across versions on a lab with an HA pair: every master and agent first runs the
previous release (PREVIOUS, its sources taken from git, this venv's dependencies); then, under a
client loop, the masters are upgraded to this tree one at a time, the new masters place and
remove an app on the old agents (adjacent versions work together), and then the agents are
upgraded: nothing acknowledged is lost, no instance is restarted or moved
(tests.integration.rolling)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import REPO
from tests.integration.labkit import LabCluster, web
from tests.integration.rolling import pair_lab, restart_all, under_load_nothing_lost

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

# The previous release: the first with versioned records (schema 1), the ops merge. Bump it to
# the last release a cluster may be upgraded from.
PREVIOUS = "e2d3409"


@pytest.fixture(scope="module")
def previous(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding PREVIOUS's `sigmad` package and an executable `sigmad` that runs
    it with this venv's Python (never this tree's package: -P, and its path first)."""
    if subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{PREVIOUS}^{{commit}}"],
                      capture_output=True).returncode != 0:
        pytest.skip(f"this checkout lacks commit {PREVIOUS} (a shallow clone?): "
                    "run 'git fetch --unshallow'")
    root = tmp_path_factory.mktemp("previous")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", PREVIOUS, "sigmad"],
                             capture_output=True, check=True, timeout=60)
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True,
                   timeout=60)
    script = root / "sigmad-previous"
    script.write_text(f'#!/bin/sh\nPYTHONPATH={root} exec {sys.executable} -P -m sigmad "$@"\n')
    script.chmod(0o755)
    return root


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabCluster]:
    with pair_lab(tmp_path_factory.mktemp("upgrade"), "up", 76) as lab:
        yield lab


def runs_from(pid: int) -> str:
    """The PYTHONPATH a sigmad process runs with ("" for this tree's lab default)."""
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"PYTHONPATH=")),
                "")


def processes(pair: LabCluster) -> list[int]:
    return [m.pid for m in pair.lab.masters] + [h.agent_pid for h in pair.lab.hosts]


def test_an_upgrade_from_the_previous_release_loses_nothing(pair: LabCluster,
                                                            previous: Path) -> None:
    restart_all(pair, str(previous / "sigmad-previous"))  # the cluster as it was
    assert {runs_from(pid) for pid in processes(pair)} == {str(previous)}

    def mixed() -> None:
        """New masters, old agents: an app is placed, runs, answers and is removed."""
        assert str(previous) not in {runs_from(m.pid) for m in pair.lab.masters}
        assert {runs_from(h.agent_pid) for h in pair.lab.hosts} == {str(previous)}
        app = f"mx{uuid.uuid4().hex[:6]}"
        pair.apply(web(pair, app, 3, placement={"spread": "host"}))
        running = pair.running(app, 3)
        assert {i["node"] for i in running} == {h.name for h in pair.lab.hosts}
        assert all(i["name"] in pair.fetch(running[0], i["ip"]) for i in running)
        pair.delete(app)

    under_load_nothing_lost(pair, "", between=mixed)
    assert str(previous) not in {runs_from(pid) for pid in processes(pair)}
