"""The leader's lease kept from a thread (sigmad.store.LeaseKeeper) against a real etcd: a
busy event loop does not lose it, a loop that stops turning does."""

from __future__ import annotations

import asyncio
import time
import uuid

from sigmad.procs import EtcdProcess
from sigmad.store import EtcdStore, LeaseKeeper


async def test_a_blocked_loop_keeps_its_lease_and_a_dead_one_loses_it(etcd: EtcdProcess) -> None:
    store = EtcdStore([etcd.endpoint], f"/keeper-{uuid.uuid4().hex[:8]}")
    try:
        lease = await store.grant(2)
        await store.put(store.keys.leader(), {"id": "m"}, lease=lease)
        turning = True
        keeper = LeaseKeeper([etcd.endpoint], lease, 2, lambda: turning)
        keeper.start()
        time.sleep(5)  # the loop is busy for 2.5 TTLs: no await at all
        assert await store.get_raw(store.keys.leader()) is not None
        assert time.monotonic() - keeper.last_ok < 2 and not keeper.expired
        turning = False  # the loop stopped: the keeper lets the lease lapse
        await asyncio.sleep(3.5)
        assert await store.get_raw(store.keys.leader()) is None
        keeper.stop()
    finally:
        await store.close()
