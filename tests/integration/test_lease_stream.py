"""Lease keepalives over one shared stream (EtcdStore(shared_leases=True), sigmad.store.LeaseStream)
against a real etcd: many leases at once, an expired lease, and a stream that broke."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from sigmad.procs import EtcdProcess
from sigmad.store import EtcdStore

pytestmark = pytest.mark.integration


async def test_many_leases_share_one_stream(etcd: EtcdProcess) -> None:
    store = EtcdStore([etcd.endpoint], f"/lease-test/{uuid.uuid4().hex[:8]}", shared_leases=True)
    try:
        leases = await asyncio.gather(*(store.grant(30) for _ in range(200)))
        for _ in range(3):
            assert all(await asyncio.gather(*(store.keepalive(lease) for lease in leases)))
        (stream,) = store._leases.values()
        assert stream is not None and not stream.broken  # one stream served all of them
        await store.revoke(leases[0])
        assert await store.keepalive(leases[0]) is False
        assert await store.keepalive(leases[1]) is True
        stream.abandon()  # as when its channel breaks: the next refresh opens a new one
        assert await store.keepalive(leases[2]) is True
        assert store._leases[0] is not stream
    finally:
        await store.close()


async def test_leases_are_spread_over_streams(etcd: EtcdProcess) -> None:
    """etcd renews the leases of one stream one after the other: hollow hosts spread theirs
    over several, each lease always on the same one."""
    store = EtcdStore([etcd.endpoint], f"/lease-test/{uuid.uuid4().hex[:8]}",
                      shared_leases=True, lease_streams=4)
    try:
        leases = await asyncio.gather(*(store.grant(30) for _ in range(200)))
        for _ in range(3):
            assert all(await asyncio.gather(*(store.keepalive(lease) for lease in leases)))
        assert sorted(store._leases) == [0, 1, 2, 3]
        streams = dict(store._leases)
        await store.keepalive(leases[0])
        assert store._leases == streams  # the same streams again, none broken
        await store.revoke(leases[5])
        assert await store.keepalive(leases[5]) is False
    finally:
        await store.close()
