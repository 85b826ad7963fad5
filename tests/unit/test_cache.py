"""The state cache (sigmad.state.cache): list then watch, indexes kept in step, own writes
seen at once and their echo dropped, relist after compaction, staleness when etcd is gone."""

from __future__ import annotations

import asyncio

from sigmad.models import Instance
from sigmad.spec import Resources
from sigmad.state.cache import Cache
from sigmad.store import Op
from tests.fakes.store import MemoryStore


def inst(index: int, node: str = "", cpu: int = 100) -> Instance:
    return Instance("ns", "web", index, 1, node=node, request=Resources(cpu, 0),
                    host_ports={"http": 31000 + index} if node else {})


async def started(store: MemoryStore) -> tuple[Cache, asyncio.Task[None]]:
    cache = Cache(store)
    task = asyncio.create_task(cache.run())
    await cache.synced.wait()
    return cache, task


async def until(check: object, timeout: float = 2.0) -> None:
    async def wait() -> None:
        while not check():  # type: ignore[operator]
            await asyncio.sleep(0.005)
    await asyncio.wait_for(wait(), timeout)


async def test_indexes_follow_every_change() -> None:
    store = MemoryStore("/t")
    await store.put("/t/instances/ns/web/0", inst(0, "a"))
    cache, task = await started(store)
    try:
        assert cache.usage["a"].requested == Resources(100, 0)
        assert cache.usage["a"].ports == {31000: 1}
        await store.put("/t/instances/ns/web/1", inst(1, "a", cpu=300))
        await store.put("/t/instances/ns/web/0", inst(0, "b"))  # moved
        await until(lambda: "/t/instances/ns/web/0" in cache.by_node.get("b", ()))
        assert cache.usage["a"].requested == Resources(300, 0)
        assert cache.usage["b"].requested == Resources(100, 0)
        assert sorted(cache.instances_of("ns/web")) == ["/t/instances/ns/web/0",
                                                       "/t/instances/ns/web/1"]
        await store.delete("/t/instances/ns/web/1")
        await until(lambda: cache.usage["a"].instances == 0)
        assert cache.usage["a"].requested == Resources(0, 0) and not cache.usage["a"].ports
    finally:
        task.cancel()


async def test_own_writes_are_seen_at_once_and_their_echo_changes_nothing() -> None:
    store = MemoryStore("/t")
    cache, task = await started(store)
    seen: list[tuple[str, int]] = []
    cache.subscribe(lambda kind, key, old, new: seen.append((key, new.mod_revision if new
                                                              else -1)))
    try:
        ops = [Op("/t/instances/ns/web/0", inst(0, "a"))]
        revision = await store.commit([], ops)
        cache.written(revision, ops)
        assert cache.instance("/t/instances/ns/web/0").mod_revision == revision  # type: ignore[union-attr]
        await until(lambda: cache.revision >= revision)
        assert seen == [("/t/instances/ns/web/0", revision)]  # the echo was dropped
        gone = [Op("/t/instances/ns/web/0", delete=True)]
        cache.written(await store.commit([], gone), gone)
        assert cache.instance("/t/instances/ns/web/0") is None
        await asyncio.sleep(0.05)
        assert cache.instance("/t/instances/ns/web/0") is None  # no late put brings it back
    finally:
        task.cancel()


async def test_a_view_does_not_move_under_its_reader() -> None:
    store = MemoryStore("/t")
    await store.put("/t/instances/ns/web/0", inst(0, "a"))
    cache, task = await started(store)
    try:
        view = cache.view()
        await store.put("/t/instances/ns/web/1", inst(1, "a"))
        await until(lambda: len(cache.instances()) == 2)
        assert list(view.table("instances")) == ["/t/instances/ns/web/0"]
    finally:
        task.cancel()


async def test_a_compacted_watch_relists_and_tells_what_changed() -> None:
    store = MemoryStore("/t")
    await store.put("/t/instances/ns/web/0", inst(0, "a"))
    cache, task = await started(store)
    told: list[str] = []
    cache.subscribe(lambda kind, key, old, new:
                    told.append(f"{key}:{'del' if new is None else 'put'}"))
    try:
        stream = store._changed
        store._changed = asyncio.Condition()  # the cache's stream hears nothing from now on
        await store.put("/t/instances/ns/web/1", inst(1, "a"))
        await store.delete("/t/instances/ns/web/0")
        await store.compact(store.revision)  # and the history it missed is compacted away
        store._changed = stream
        await store.break_watches()  # it resumes, finds its revision gone, and relists
        await until(lambda: list(cache.instances()) == ["/t/instances/ns/web/1"])
        assert "/t/instances/ns/web/0:del" in told and "/t/instances/ns/web/1:put" in told
    finally:
        task.cancel()


async def test_a_broken_watch_makes_the_cache_stale_until_it_resumes() -> None:
    store = MemoryStore("/t")
    cache, task = await started(store)
    try:
        assert cache.stale_for() == 0
        await store.break_watches()
        await until(lambda: cache.stale_for() > 0)
        await store.put("/t/nodes/a", {"name": "a", "engine": "x"})
        await until(lambda: cache.stale_for() == 0)
    finally:
        task.cancel()


async def test_a_malformed_record_is_ignored_and_the_rest_loads() -> None:
    """A value written by hand that is not a record must not stop the cache: it is skipped
    at the list, and a later bad value leaves the last good record in place."""
    store = MemoryStore("/t")
    await store.put("/t/nodes/bad", {"name": "bad"})  # no engine, no address: not a Node
    await store.put("/t/instances/ns/web/0", inst(0, "a"))
    cache, task = await started(store)
    try:
        assert "/t/nodes/bad" not in cache.nodes()
        assert list(cache.instances()) == ["/t/instances/ns/web/0"]
        await store.put("/t/instances/ns/web/0", "not a record")
        await store.put("/t/instances/ns/web/1", inst(1, "a"))
        await until(lambda: "/t/instances/ns/web/1" in cache.instances())
        assert cache.instance("/t/instances/ns/web/0").value == inst(0, "a")  # type: ignore[union-attr]
    finally:
        task.cancel()
