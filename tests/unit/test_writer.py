"""The Writer (sigmad.state.writes): changes packed into bounded transactions, a conflict
fails only its own change, no key twice in one transaction, the cache sees writes at once."""

from __future__ import annotations

import asyncio

from sigmad.models import Owner, SsdClaim
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


async def test_a_disk_released_before_its_agent_saw_the_claim_is_marked_for_a_wipe() -> None:
    """Claimed and released between two passes of its agent, a disk's record still says
    `ready`, though an instance wrote to it: the release marks it `wiping` (its agent then
    wipes it); a disk its agent saw claimed (`bound`) is left to the agent."""
    from sigmad.models import SSD_BOUND, SSD_READY, SSD_WIPING, BoundSsd, Instance, Ssd
    from sigmad.state.writes import Writes

    store = MemoryStore("/t")
    writes = Writes(store.keys)
    inst = Instance("ns", "db", 0, 1)
    inst.node = "h1"
    inst.ssds = [BoundSsd("data", "loop0", "/d/loop0/data"), BoundSsd("logs", "loop1", "/d/l")]
    key = store.keys.instance("ns", "db", 0)
    await store.put(key, inst)
    for disk, state in (("loop0", SSD_READY), ("loop1", SSD_BOUND)):
        await store.put(store.keys.ssd("h1", disk), Ssd("h1", disk, f"/dev/{disk}", state=state,
                                                        owner="" if state == SSD_READY
                                                        else "ns/db-0"))
        await store.put(store.keys.ssd_claim("h1", disk), SsdClaim("ns/db-0", disk))
    read = await store.get(key, Instance)
    disks = {d: await store.get(store.keys.ssd("h1", d), Ssd) for d in ("loop0", "loop1")}
    assert read is not None
    gone = writes.delete_instance(read, None, disks)
    assert await store.commit(gone.guards, gone.ops)
    assert store.value(store.keys.ssd("h1", "loop0"), Ssd).state == SSD_WIPING
    assert store.value(store.keys.ssd("h1", "loop1"), Ssd).state == SSD_BOUND
    assert store.value(store.keys.ssd_claim("h1", "loop0"), SsdClaim) is None
    # read `ready`, then its agent marks it bound: the release fails whole, to be tried
    # again on what is there now
    await store.put(store.keys.ssd("h1", "loop0"), Ssd("h1", "loop0", "/dev/loop0",
                                                       state=SSD_READY))
    await store.put(store.keys.ssd_claim("h1", "loop0"), SsdClaim("ns/db-0", "data"))
    stale = await store.get(store.keys.ssd("h1", "loop0"), Ssd)
    claim = await store.get(store.keys.ssd_claim("h1", "loop0"), SsdClaim)
    assert stale is not None and claim is not None
    await store.put(stale.key, Ssd("h1", "loop0", "/dev/loop0", state=SSD_BOUND))
    released = writes.release_ssd(claim, stale)
    assert released.ops[-1].key == stale.key  # it would have marked the disk
    assert not await store.commit(released.guards, released.ops)
    assert store.value(store.keys.ssd_claim("h1", "loop0"), SsdClaim) is not None
