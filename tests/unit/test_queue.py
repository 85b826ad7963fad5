"""The work queue (sigmad.control.queue): each key once, one worker per key, rate-limited
retry, low priority for the resync."""

from __future__ import annotations

import asyncio

from sigmad.control.queue import WorkQueue


async def test_a_key_is_queued_once_however_often_it_is_added() -> None:
    q: WorkQueue[str] = WorkQueue()
    for key in ("a", "b", "a", "a", "c", "b"):
        q.add(key)
    assert len(q) == 3
    assert [await q.get() for _ in range(3)] == ["a", "b", "c"]


async def test_a_key_added_while_processed_comes_back_after_done() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    key = await q.get()
    q.add("a")  # changed again while a worker has it: not handed to a second worker
    assert len(q) == 0 and q.busy == 1
    q.done(key)
    assert len(q) == 1 and await q.get() == "a"


async def test_rate_limited_retry_doubles_per_failure_and_forget_resets() -> None:
    q: WorkQueue[str] = WorkQueue(base_delay=0.02, max_delay=0.08)
    loop = asyncio.get_running_loop()
    waits = []
    for _ in range(4):
        start = loop.time()
        q.add_rate_limited("a")
        assert len(q) == 0
        key = await asyncio.wait_for(q.get(), 1)
        waits.append(loop.time() - start)
        q.done(key)
    assert all(w >= d * 0.9 for w, d in zip(waits, (0.02, 0.04, 0.08, 0.08), strict=True)), waits
    assert waits[3] < 0.2  # capped
    assert q.failures("a") == 4
    q.forget("a")
    assert q.failures("a") == 0


async def test_low_priority_keys_wait_for_normal_work_and_can_be_promoted() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("old-1", low=True)
    q.add("old-2", low=True)
    q.add("new")
    q.add("old-2")  # someone needs it now
    assert [await q.get() for _ in range(3)] == ["new", "old-2", "old-1"]
    assert len(q) == 0


async def test_add_after_keeps_the_earliest_timer() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add_after("a", 5.0)
    q.add_after("a", 0.01)
    assert await asyncio.wait_for(q.get(), 1) == "a"
    q.close()
