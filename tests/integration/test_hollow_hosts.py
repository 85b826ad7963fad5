"""Hollow hosts (sigmad lab hollow) against a real etcd: the agents register their hollow
engine's capacity and hold heartbeats; a killed host's heartbeat lapses, a frozen host's says
its engine does not answer, and both come back when healed."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from sigmad.lab.hollow_hosts import HollowConfig, HollowHosts
from sigmad.models import Beat, Node
from sigmad.procs import EtcdProcess
from sigmad.store import EtcdStore

pytestmark = pytest.mark.integration


async def wait_beats(store: EtcdStore, expected: set[str], timeout: float = 15) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found, _ = await store.scan(store.keys.heartbeats(), Beat)
        beats = {v.key.rsplit("/", 1)[-1] for v in found if v.value.engine}
        if beats == expected:
            return
        assert loop.time() < deadline, f"heartbeats {sorted(beats)}, expected {sorted(expected)}"
        await asyncio.sleep(0.2)


async def test_hollow_hosts_register_beat_die_and_heal(etcd: EtcdProcess, tmp_path: Path
                                                       ) -> None:
    prefix = f"/hollow-test/{uuid.uuid4().hex[:8]}"
    config = HollowConfig(hosts=4, dir=tmp_path / "hosts", etcd=[etcd.endpoint], prefix=prefix,
                          ttl=2, cpu=16, memory=64 << 30, zones=2)
    hosts = HollowHosts(config, say=lambda _: None)
    run = asyncio.create_task(hosts.run())
    store = EtcdStore([etcd.endpoint], prefix)
    try:
        everyone = {"h1", "h2", "h3", "h4"}
        await wait_beats(store, everyone)
        nodes, _ = await store.scan(store.keys.nodes(), Node)
        h1 = next(v.value for v in nodes if v.value.name == "h1")
        assert h1.capacity.cpu_m == 16_000 and h1.capacity.memory == 64 << 30
        assert h1.labels == {"host": "h1", "zone": "z0"}
        assert h1.engine == f"unix://{tmp_path / 'hosts' / 'h1.sock'}"
        await hosts.kill(["h1"])
        hosts.freeze(["h2"])
        assert not (tmp_path / "hosts" / "h1.sock").exists()
        await wait_beats(store, {"h3", "h4"})  # h1's lease lapsed, h2's engine is frozen
        await hosts.heal(["h1", "h2"])
        await wait_beats(store, everyone)
        stats = hosts.stats()
        assert stats["ready"] == 4 and stats["killed"] == [] and stats["frozen"] == []
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        await store.close()
