"""The Writer (sigmad.state.writes): changes packed into bounded transactions, a conflict
fails only its own change, no key twice in one transaction, the cache sees writes at once."""

from __future__ import annotations

import asyncio

from sigmad.models import Owner
from sigmad.state.cache import Cache
from sigmad.state.writes import Change, Writer
from sigmad.store import Guard, Op
from tests.fakes.store import MemoryStore


async def writer_on(store: MemoryStore) -> tuple[Writer, Cache, asyncio.Task[None]]:
    cache = Cache(store)
    writer = Writer(store, cache)
    return writer, cache, asyncio.create_task(writer.run())


async def test_many_changes_go_in_few_transactions_and_one_conflict_fails_alone() -> None:
    store = MemoryStore("/t")
    await store.put("/t/alloc/ip/10.0.0.7", Owner("someone"))
    writer, cache, task = await writer_on(store)
    try:
        changes = [Change([Guard(f"/t/alloc/ip/10.0.0.{i}", 0)],
                          [Op(f"/t/alloc/ip/10.0.0.{i}", Owner(f"ns/a-{i}"))])
                   for i in range(200)]
        results = await asyncio.gather(*(writer.write(c) for c in changes))
        assert [i for i, r in enumerate(results) if not r] == [7]  # only the taken one lost
        assert store.value("/t/alloc/ip/10.0.0.8", Owner) == Owner("ns/a-8")
        assert writer.transactions < 200
        assert cache.get("ips", "/t/alloc/ip/10.0.0.8").value == Owner("ns/a-8")  # at once
    finally:
        task.cancel()


async def test_two_changes_of_one_key_never_share_a_transaction() -> None:
    store = MemoryStore("/t")
    writer, _, task = await writer_on(store)
    try:
        first = Change([], [Op("/t/alloc/ip/10.0.0.1", Owner("a"))])
        second = Change([], [Op("/t/alloc/ip/10.0.0.1", Owner("b"))])
        results = await asyncio.gather(writer.write(first), writer.write(second))
        assert all(results) and results[0] != results[1]
        assert store.value("/t/alloc/ip/10.0.0.1", Owner) == Owner("b")
    finally:
        task.cancel()


async def test_a_change_too_big_for_a_transaction_is_refused() -> None:
    writer, _, task = await writer_on(MemoryStore("/t"))
    try:
        big = Change([], [Op(f"/t/k{i}", 1) for i in range(129)])
        try:
            await writer.write(big)
        except ValueError as exc:
            assert "does not fit a transaction" in str(exc)
        else:
            raise AssertionError("a 129-op change was accepted")
    finally:
        task.cancel()


async def test_a_rewrite_of_a_record_read_before_another_write_loses() -> None:
    from sigmad.models import Instance
    from sigmad.state.writes import Writes

    store = MemoryStore("/t")
    writes = Writes(store.keys)
    key = "/t/instances/ns/web/0"
    await store.put(key, Instance("ns", "web", 0, 1))
    read = await store.get(key, Instance)
    assert read is not None
    theirs = read.value.copy()
    theirs.target = "b"
    await store.put(key, theirs)  # someone else wrote it after our read
    mine = read.value.copy()
    mine.reason = "stale view"
    change = writes.update_instance(read, mine)
    assert not await store.commit(change.guards, change.ops)
    assert store.value(key, Instance).target == "b"  # their write stands
    gone = writes.delete_instance(read, None)
    assert not await store.commit(gone.guards, gone.ops)
    assert store.value(key, Instance) is not None
