"""Issue 11 on the lab: real loop devices, real ext4, real containers (2 SSDs per host).

A sentinel written on an instance's SSD survives a container kill (a new container, the same
disk) and an in-place resize; deleting the app gives the disk back `ready` with a fresh
filesystem (no sentinel); bad volume specs are refused naming the field, nothing written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import wait_for
from tests.integration.labkit import LabCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def db(lab: LabCluster, replicas: int = 1, **volume: Any) -> dict[str, Any]:
    return {"app": "db", "replicas": replicas, "restart": "always", "containers": [{
        "name": "main", "image": lab.lab.image, "command": ["sh", "-c", "exec sleep 3600"],
        "resources": {"request": {"cpu": "10m", "memory": "8Mi"},
                      "limit": {"memory": "64Mi"}},
    }], "volumes": [{"name": "data", "ssd": 1, "min_size": "512Mi", "mount": "/data",
                     **volume}]}


def ssds(lab: LabCluster) -> dict[str, dict[str, Any]]:
    result = lab.ctl("get", "ssds", "-o", "json")
    assert result.returncode == 0, result.stderr
    return {f"{d['node']}/{d['id']}": d for d in json.loads(result.stdout)}


def all_ready(lab: LabCluster) -> dict[str, dict[str, Any]] | None:
    found = ssds(lab)
    return found if len(found) == 6 and all(d["state"] == "ready" for d in found.values()) \
        else None


def test_data_survives_restarts_and_is_wiped_on_delete(lab: LabCluster) -> None:
    before = wait_for(lambda: all_ready(lab), 60, "the lab's 6 SSDs ready")
    lab.apply(db(lab))
    try:
        (inst,) = lab.running("db", 1)
        (bound,) = inst["ssds"]
        disk = ssds(lab)[f"{inst['node']}/{bound['disk']}"]
        assert disk["claimed_by"] == "default/db-0"
        wait_for(lambda: ssds(lab)[f"{inst['node']}/{bound['disk']}"]["state"] == "bound", 30,
                 "the agent marking the disk bound")
        write = lab.in_instance(inst, "sh", "-c", "echo tenant-1 > /data/sentinel && sync")
        assert write.returncode == 0, write.stderr
        mounts = lab.in_instance(inst, "cat", "/proc/mounts").stdout
        assert any(line.split()[1] == "/data" for line in mounts.splitlines())

        # the container is killed: a new container, the same disk, the data kept
        lab.docker(inst["node"], "kill", "-s", "KILL", inst["containers"][0]["id"])

        def restarted() -> dict[str, Any] | None:
            (now,) = lab.instances("db")
            return now if now["restarts"] >= 1 and now["state"] == "Running" else None

        again = wait_for(restarted, 60, "db-0 restarted")
        assert again["containers"][0]["id"] != inst["containers"][0]["id"]
        assert again["node"] == inst["node"] and again["ssds"] == inst["ssds"]
        assert lab.in_instance(again, "cat", "/data/sentinel").stdout == "tenant-1\n"

        # an in-place resize keeps the container, so the disk and its data
        resized = lab.ctl("update", "db", "--limit-memory", "96Mi")
        assert resized.returncode == 0 and "resized in place" in resized.stdout, resized
        (same,) = lab.instances("db")
        assert same["containers"][0]["id"] == again["containers"][0]["id"]
        assert lab.in_instance(same, "cat", "/data/sentinel").stdout == "tenant-1\n"
        source = Path(bound["source"])
        assert (source / "sentinel").read_text() == "tenant-1\n"
    finally:
        lab.delete("db")

    def wiped() -> dict[str, Any] | None:
        d = ssds(lab)[f"{inst['node']}/{bound['disk']}"]
        return d if d["state"] == "ready" and d["fs_uuid"] != disk["fs_uuid"] else None

    fresh = wait_for(wiped, 60, "the released disk wiped and ready again")
    assert not fresh["claimed_by"]
    assert os.listdir(source) == []  # a fresh filesystem: no sentinel
    assert fresh["fs_uuid"] != before[f"{inst['node']}/{bound['disk']}"]["fs_uuid"]


@pytest.mark.parametrize(("volume", "field"), [
    ({"ssd": -1}, "volumes[0].ssd"),
    ({"mount": "data"}, "volumes[0].mount"),
    ({"mount": "/"}, "volumes[0].mount"),
])
def test_bad_volume_specs_are_refused_naming_the_field(lab: LabCluster, volume: dict[str, Any],
                                                       field: str) -> None:
    spec = db(lab, **volume)
    result = lab.ctl("apply", "-f", "-", stdin=json.dumps(spec))
    assert result.returncode == 1 and field in result.stderr, result.stderr
    assert lab.ctl("get", "apps", "-o", "json").stdout.strip() in ("[]", "")


def test_a_volume_name_used_twice_is_refused(lab: LabCluster) -> None:
    spec = db(lab)
    spec["volumes"].append({"name": "data", "ssd": 1, "mount": "/logs"})
    result = lab.ctl("apply", "-f", "-", stdin=json.dumps(spec))
    assert result.returncode == 1 and "volumes[1].name" in result.stderr, result.stderr
    assert "used twice" in result.stderr
