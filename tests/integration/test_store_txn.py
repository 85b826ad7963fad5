"""A guarded transaction sent again after its answer was lost, against a real etcd: the store
reads back what happened (sigmad.store.StoreOps.landed) instead of reporting a conflict for
a write that committed, and still reports a real conflict as one."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aetcd
import pytest

from sigmad.models import NodeLock, Owner
from sigmad.procs import EtcdProcess
from sigmad.store import EtcdStore, Guard, Op


class LossyStore(EtcdStore):
    """Loses the answer of the next `lose` transactions (after etcd applied them), or runs
    `before` instead of sending the next one (then loses it, unsent)."""

    lose = 0
    before: Callable[[], Awaitable[None]] | None = None

    async def _stub(self, client: aetcd.Client, method: str, request: Any) -> Any:
        if method == "Txn" and self.before is not None:
            before, self.before = self.before, None
            await before()
            raise TimeoutError  # never sent
        answer = await super()._stub(client, method, request)
        if method == "Txn" and self.lose:
            self.lose -= 1
            raise TimeoutError  # sent and applied; the answer is lost
        return answer


@pytest.fixture
async def store(etcd: EtcdProcess) -> AsyncIterator[LossyStore]:
    s = LossyStore([etcd.endpoint], f"/txn-{uuid.uuid4().hex[:8]}")
    try:
        yield s
    finally:
        await s.close()


async def test_a_create_whose_answer_was_lost_is_not_a_conflict(store: LossyStore) -> None:
    key = store.keys.ip("10.244.0.9")
    store.lose = 1
    assert await store.create(key, Owner("default/web-0"))
    assert store.lose == 0  # the answer really was lost once
    item = await store.get_raw(key)
    assert item is not None and b"default/web-0" in item.value


async def test_a_guarded_change_whose_answer_was_lost_reports_its_revision(
        store: LossyStore) -> None:
    lock, port = store.keys.node_lock("a"), store.keys.port("a", 31000)
    await store.put(lock, NodeLock("x"))
    await store.put(port, Owner("old"))
    lock_rev = (await store.get_raw(lock)).mod_revision  # type: ignore[union-attr]
    port_rev = (await store.get_raw(port)).mod_revision  # type: ignore[union-attr]
    ip = store.keys.ip("10.244.0.10")
    store.lose = 1
    revision = await store.commit(
        [Guard(lock, lock_rev), Guard(port, port_rev), Guard(ip, 0)],
        [Op(lock, NodeLock("y")), Op(port, delete=True), Op(ip, Owner("default/web-1"))])
    assert revision and store.lose == 0
    assert (await store.get_raw(ip)).mod_revision == revision  # type: ignore[union-attr]
    assert (await store.get_raw(lock)).mod_revision == revision  # type: ignore[union-attr]
    assert await store.get_raw(port) is None


async def test_a_guarded_delete_whose_answer_was_lost_is_done(store: LossyStore) -> None:
    key = store.keys.instance("default", "web", 0)
    await store.put(key, {"name": "web-0"})
    rev = (await store.get_raw(key)).mod_revision  # type: ignore[union-attr]
    store.lose = 1
    assert await store.delete(key, rev)
    assert store.lose == 0 and await store.get_raw(key) is None


async def test_a_real_conflict_after_a_lost_request_is_still_a_conflict(
        store: LossyStore) -> None:
    key = store.keys.ip("10.244.0.11")
    other = EtcdStore(store.endpoints, store.keys.prefix)

    async def someone_else_takes_it() -> None:
        assert await other.create(key, Owner("default/db-0"))

    store.before = someone_else_takes_it
    try:
        assert not await store.create(key, Owner("default/web-0"))
    finally:
        await other.close()
    item = await store.get_raw(key)
    assert item is not None and b"default/db-0" in item.value
