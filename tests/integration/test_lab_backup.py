"""Backup and restore on the lab: back up, lose every key under etcd's prefix, restore, and
every instance is Running again with the same containers (none restarted, no copies), IPs
and host ports, the masters adopting what runs by its labels."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from sigmad.lab import system
from sigmad.lab.services import PREFIX
from sigmad.store import MAX_TXN_OPS, Op
from tests.integration.conftest import wait_for
from tests.integration.labkit import LabCluster, web

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def sigmad(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sigmad", *args], capture_output=True,
                          text=True, timeout=120)


def wipe(lab: LabCluster) -> int:
    """Delete every key under the lab's prefix (as losing etcd's data would); how many."""
    async def run() -> int:
        store = lab.etcd()
        try:
            items, _ = await store.range_raw(PREFIX + "/")
            for start in range(0, len(items), MAX_TXN_OPS):
                await store.commit([], [Op(i.key, delete=True)
                                        for i in items[start:start + MAX_TXN_OPS]])
            return len(items)
        finally:
            await store.close()

    return asyncio.run(run())


def keys(lab: LabCluster, under: str) -> list[str]:
    async def run() -> list[str]:
        store = lab.etcd()
        try:
            return await store.keys_under(under)
        finally:
            await store.close()

    return asyncio.run(run())


def containers(lab: LabCluster, app: str) -> dict[str, dict[str, Any]]:
    """container id → `docker inspect` of every container of `app` on every host."""
    found = {}
    for node in lab.lab.engines:
        ids = lab.docker(node, "ps", "-aq", "--no-trunc", "--filter",
                         f"label=sigma.app={app}").stdout.split()
        for cid in ids:
            found[cid] = json.loads(lab.docker(node, "inspect", cid).stdout)[0]
    return found


def test_backup_wipe_restore_adopts_what_runs(lab: LabCluster, tmp_path: Path) -> None:
    app = f"bk{uuid.uuid4().hex[:6]}"
    lab.apply(web(lab, app, 3, network={"mode": "host-compat",
                                        "ports": [{"name": "http"}]}))
    try:
        before = {i["name"]: i for i in lab.running(app, 3)}
        running = containers(lab, app)
        assert len(running) == 3
        ports = {k: v for k, v in lab.port_claims().items()
                 if v.startswith(f"default/{app}-")}
        assert len(ports) == 3

        file = tmp_path / "sigma.backup"
        result = lab.ctl("backup", "-o", str(file))
        assert result.returncode == 0, result.stderr
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
        assert "REVISION" in result.stdout and str(file) in result.stdout

        # lose the cluster's state: masters and agents stopped, every key gone
        masters = lab.lab.masters
        system.stop([m.pid for m in masters], timeout=20)
        system.stop([h.agent_pid for h in lab.lab.hosts], timeout=20)
        assert wipe(lab) > 0
        assert keys(lab, PREFIX + "/") == []

        config = masters[0].config
        lab_store_stray(lab)
        refused = sigmad("restore", str(file), "--config", config)
        assert refused.returncode == 1 and "--force" in refused.stderr, refused.stderr
        done = sigmad("restore", str(file), "--config", config, "--force")
        assert done.returncode == 0, done.stderr
        assert "restored" in done.stdout and "leased keys left out" in done.stdout

        # agents first (their heartbeats), then the masters: they adopt what runs
        for h in lab.lab.hosts:
            lab.lab.restart_agent(h.name)
        wait_for(lambda: len(keys(lab, PREFIX + "/heartbeats/")) == len(lab.lab.hosts), 30,
                 "every agent's heartbeat")
        for m in masters:
            lab.lab.restart_master(m.listen)
        wait_for(lambda: lab.ctl("get", "nodes").returncode == 0, 30, "the master answers")

        after = {i["name"]: i for i in lab.running(app, 3, timeout=60)}
        assert {n: (i["node"], i["ip"], i["containers"][0]["id"]) for n, i in after.items()} \
            == {n: (i["node"], i["ip"], i["containers"][0]["id"]) for n, i in before.items()}
        now = containers(lab, app)
        assert set(now) == set(running)  # no copy started, none removed
        assert all(now[c]["State"]["StartedAt"] == running[c]["State"]["StartedAt"] and
                   now[c]["State"]["Running"] for c in now)  # none restarted
        claims = lab.port_claims()
        assert {k: claims.get(k) for k in ports} == ports
        ips = {k.rsplit("/", 1)[-1] for k in keys(lab, PREFIX + "/alloc/ip/")}
        assert {i["ip"] for i in after.values()} <= ips
    finally:
        lab.delete(app)


def lab_store_stray(lab: LabCluster) -> None:
    """One stray key: the prefix is not empty any more."""
    async def run() -> None:
        store = lab.etcd()
        try:
            await store.put(f"{PREFIX}/nodes/stray", {"name": "stray"})
        finally:
            await store.close()

    asyncio.run(run())
