"""Whether a transaction whose answer was lost had committed (sigmad.store.StoreOps.landed),
read back from the in-memory store: its own commit is recognised, anything else is not."""

from __future__ import annotations

from sigmad.models import NodeLock, Owner
from sigmad.store import Guard, Op
from tests.fakes.store import MemoryStore

K, L, M = "/t/alloc/ip/10.0.0.1", "/t/alloc/node/a", "/t/alloc/port/a/31000"


async def test_a_committed_transaction_is_recognised() -> None:
    store = MemoryStore("/t")
    await store.put(L, NodeLock("x"))
    await store.put(M, Owner("old"))
    lock = (await store.get_raw(L)).mod_revision  # type: ignore[union-attr]
    port = (await store.get_raw(M)).mod_revision  # type: ignore[union-attr]
    guards = [Guard(K, 0), Guard(L, lock), Guard(M, port)]
    ops = [Op(K, Owner("default/web-0")), Op(L, NodeLock("y")), Op(M, delete=True)]
    revision = await store.commit(guards, ops)
    assert revision
    assert await store.landed(guards, ops) == revision
    await store.put("/t/elsewhere", {"n": 1})  # later writes elsewhere change nothing
    assert await store.landed(guards, ops) == revision


async def test_what_another_writer_did_is_not_taken_for_ours() -> None:
    store = MemoryStore("/t")
    ops = [Op(K, Owner("default/web-0"))]
    assert await store.landed([Guard(K, 0)], ops) == 0  # nothing was written
    await store.put(K, Owner("default/db-0"))
    assert await store.landed([Guard(K, 0)], ops) == 0  # another value
    await store.delete(K)
    # The same value, but written over a key that existed: our guard (absent) did not hold.
    await store.put(K, Owner("other"))
    first = (await store.get_raw(K)).mod_revision  # type: ignore[union-attr]
    await store.put(K, Owner("default/web-0"))
    assert await store.landed([Guard(K, 0)], ops) == 0
    # Ours, had it been guarded on the revision it overwrote.
    assert await store.landed([Guard(K, first)], ops) == \
        (await store.get_raw(K)).mod_revision  # type: ignore[union-attr]


async def test_keys_put_at_different_revisions_are_not_one_transaction() -> None:
    store = MemoryStore("/t")
    ops = [Op(K, Owner("a")), Op(L, NodeLock("b"))]
    await store.put(K, Owner("a"))
    await store.put(L, NodeLock("b"))
    assert await store.landed([Guard(K, 0), Guard(L, 0)], ops) == 0


async def test_a_fenced_store_checks_its_fence_too() -> None:
    store = MemoryStore("/t")
    await store.put("/t/leader", {"id": "m1"})
    won = (await store.get_raw("/t/leader")).mod_revision  # type: ignore[union-attr]
    store.fence = Guard("/t/leader", won)
    ops = [Op(K, Owner("default/web-0"))]
    revision = await store.commit([Guard(K, 0)], ops)
    assert await store.landed([Guard(K, 0)], ops) == revision
    store.fence = Guard("/t/leader", won + 100)  # a fence that did not hold then
    assert await store.landed([Guard(K, 0)], ops) == 0


async def test_a_delete_only_transaction_is_done_once_its_keys_are_gone() -> None:
    store = MemoryStore("/t")
    await store.put(K, Owner("default/web-0"))
    v = (await store.get_raw(K)).mod_revision  # type: ignore[union-attr]
    guards, ops = [Guard(K, v)], [Op(K, delete=True)]
    assert await store.landed(guards, ops) == 0  # still there: not done
    assert await store.commit(guards, ops)
    assert await store.landed(guards, ops) == store.revision
    # A guard on a key it does not delete cannot be checked without the revision: unknown.
    assert await store.landed([Guard(L, 0), *guards], ops) == 0


async def test_a_compacted_history_means_cannot_tell() -> None:
    store = MemoryStore("/t")
    ops = [Op(K, Owner("default/web-0"))]
    assert await store.commit([Guard(K, 0)], ops)
    await store.compact(store.revision)
    assert await store.landed([Guard(K, 0)], ops) == 0
