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
        stream = store._leases
        assert stream is not None and not stream.broken  # one stream served all of them
        await store.revoke(leases[0])
        assert await store.keepalive(leases[0]) is False
        assert await store.keepalive(leases[1]) is True
        stream.abandon()  # as when its channel breaks: the next refresh opens a new one
        assert await store.keepalive(leases[2]) is True
        assert store._leases is not stream
    finally:
        await store.close()
