"""Issues 4 and 5 checked on the lab: `pool` and `why` answer for the 3-host pool, `update`
changes a running instance's caps with the same container id, and `describe instance` tells an
OOM kill from a `kill -9`."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.conftest import wait_for
from tests.integration.labkit import LabCluster, web

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_pool_and_why_on_the_lab(lab: LabCluster) -> None:
    lab.apply(web(lab, "pooled", 3, placement={"spread": "zone"}))
    big = web(lab, "huge", 1, placement={"labels": {"zone": "room-a"}})
    big["containers"][0]["resources"]["request"]["cpu"] = "64"
    lab.apply(big)
    try:
        lab.running("pooled", 3)
        pool = lab.ctl("pool").stdout
        assert "zone=room-a" in pool and "zone=room-b" in pool, pool
        assert pool.splitlines()[1].split()[1:3] == ["3", "3"], pool  # 3 nodes, 3 placed
        def explained() -> str | None:
            out = lab.ctl("why", "huge-0").stdout
            return out if "insufficient cpu" in out else None

        why = wait_for(explained, 30, "why huge-0")
        assert "2 nodes: insufficient cpu (need 64" in why and "1 node: labels mismatch" in why
    finally:
        lab.delete("huge")
        lab.delete("pooled")


def test_update_in_place_and_kill_reasons_on_the_lab(lab: LabCluster) -> None:
    caps = web(lab, "caps", 1)
    caps["containers"][0]["resources"]["limit"] = {"cpu": "500m", "memory": "64Mi"}
    lab.apply(caps)
    hog = web(lab, "hog", 1, restart="never")
    hog["containers"][0]["command"] = ["sh", "-c", "sleep 1; x=a; while true; do x=$x$x; done"]
    hog["containers"][0]["resources"]["limit"] = {"memory": "32Mi"}
    hog["containers"][0].pop("ready")
    lab.apply(hog)
    victim = web(lab, "victim", 1, restart="never")
    lab.apply(victim)
    try:
        (before,) = lab.running("caps", 1)
        result = lab.ctl("update", "caps", "--limit-cpu", "2", "--limit-memory", "256Mi")
        assert result.returncode == 0 and "resized in place" in result.stdout, result
        (after,) = lab.instances("caps")
        cid = before["containers"][0]["id"]
        assert after["containers"][0]["id"] == cid and after["state"] == "Running"
        host = lab.docker(before["node"], "inspect", "--format",
                          "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}} "
                          "{{.HostConfig.MemorySwap}}", cid).stdout.split()
        assert host == ["2000000000", str(256 << 20), str(256 << 20)]

        (target,) = lab.running("victim", 1)
        lab.docker(target["node"], "kill", "-s", "KILL", target["containers"][0]["id"])

        def ended(app: str) -> dict[str, Any] | None:
            (inst,) = lab.instances(app)
            return inst if inst["state"] in ("Failed", "Exited") else None

        for app, reason in (("hog", "OOMKilled"), ("victim", "Signaled(SIGKILL)")):
            inst = wait_for(lambda app=app: ended(app), 60, f"{app} ended")  # type: ignore[misc]
            assert inst["reason"] == reason
            described = lab.ctl("describe", "instance", f"{app}-0").stdout
            assert reason in described and "137" in described, described
    finally:
        for app in ("caps", "hog", "victim"):
            lab.delete(app)
