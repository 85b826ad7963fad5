"""Bounds of the master (issue 16, item 6), on fakes and real sockets of 127.0.0.1: events
read by range within a fixed number of reads, event streams that notice a gone client by
their heartbeats, slow clients closed, connections capped, etcd history compacted."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from sigmad import events
from sigmad.api import make_app, serving
from sigmad.api.serving import Limits, Served
from sigmad.control import compaction
from sigmad.control.compaction import Compactor
from sigmad.engine import EnginePool
from sigmad.events import Event
from sigmad.metrics import Metrics
from sigmad.store import Op, WatchCompacted
from tests.fakes.store import MemoryStore
from tests.unit.harness import TOKEN, Leader
from tests.unit.test_sigmactl_client import Fake, run
from tests.unit.test_sigmactl_views import EVENT

NOW = 1_800_000_000.0
HEAD = f"Authorization: Bearer {TOKEN}\r\nHost: sigma\r\n"


async def until(check: Callable[[], Any], timeout: float = 20.0) -> None:
    """Until `check()` is true (bounded: fails after `timeout` seconds)."""
    async def wait() -> None:
        while not check():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(wait(), timeout)


async def put_events(store: MemoryStore, times: list[float], app: str = "web") -> None:
    """Events at `times` (seconds), written as EventLog writes them (128 to a transaction)."""
    seq = itertools.count()
    prefix = store.keys.events()
    for n in range(0, len(times), 128):
        await store.commit([], [
            Op(f"{events._at(prefix, t)}-{next(seq)}",
               Event(t, "instance", "default", f"{app}-{i}", app, "Normal", f"event {i}"))
            for i, t in enumerate(times[n:n + 128], n)])


# -- events read by range --------------------------------------------------------------------


async def test_the_newest_events_are_read_without_reading_the_older_ones() -> None:
    store = MemoryStore("/t")
    times = [NOW - 3000 + i * 0.15 for i in range(20_000)]  # 50 minutes of events
    await put_events(store, times)
    got = await events.recent(store, 100, lambda e: True, now=NOW)
    assert [e.time for e in got.items] == times[-100:]  # the newest 100, oldest first
    assert got.more and got.revision == store.revision
    assert store.items_read < len(times) // 20  # a few reads of a few keys, not a scan


async def test_a_burst_in_one_second_is_read_by_halving_the_window() -> None:
    store = MemoryStore("/t")
    times = [NOW - 1 + i * 1e-4 for i in range(5000)]  # 5,000 events in the last second
    await put_events(store, times)
    got = await events.recent(store, 1000, lambda e: True, now=NOW)
    assert [e.time for e in got.items] == times[-1000:]
    assert store.spans <= events.MAX_READS and store.items_read < len(times)


async def test_a_filter_that_matches_nothing_stops_after_max_reads() -> None:
    store = MemoryStore("/t")
    await put_events(store, [NOW - 600 + i * 0.01 for i in range(60_000)])  # 100/s
    got = await events.recent(store, 10, lambda e: e.app == "other", now=NOW)
    assert got.items == [] and got.more  # it says that older events were not read
    assert store.spans == events.MAX_READS
    assert store.items_read <= events.MAX_READS * events.PAGE < 60_000


async def test_since_a_revision_answers_only_what_came_after() -> None:
    store = MemoryStore("/t")
    await put_events(store, [NOW - 100 + i for i in range(50)])
    revision = store.revision
    await put_events(store, [NOW - 10 + i for i in range(5)], app="late")
    got = await events.recent(store, 100, lambda e: True, since=revision, now=NOW)
    assert [e.app for e in got.items] == ["late"] * 5 and not got.more
    await store.put("/t/events/99999999999999999-x", {"v": 3})  # not an event: skipped
    assert len((await events.recent(store, 100, lambda e: True, now=NOW)).items) == 55
    empty = MemoryStore("/t")
    assert (await events.recent(empty, 100, lambda e: True, now=NOW)).items == []
    assert empty.spans <= 12  # windows double until they pass the oldest time an event lives


async def test_the_events_api_answers_a_bounded_newest_first_range() -> None:
    async with Leader() as lead:
        app = make_app(lead.store, lead.cache, TOKEN, EnginePool("/t", factory=lead._engine))
        async with served(app, Limits()) as (port, _):
            await put_events(lead.store, [NOW + i for i in range(300)])
            status, body = await request(port, "GET /v1/events?limit=7")
            assert status == 200 and body.count(b'"time"') == 7 and b'"more": true' in body
            status, body = await request(port, "GET /v1/events?limit=1001")
            assert status == 400 and b'"field": "limit"' in body
            status, body = await request(port, "GET /v1/events?since=x")
            assert status == 400 and b'"field": "since"' in body


# -- serving: streams, slow clients, the connection cap --------------------------------------


class served:
    """The API (of `app`) served by sigmad.api.serving on a free port of 127.0.0.1."""

    def __init__(self, app: web.Application, limits: Limits,
                 metrics: Metrics | None = None) -> None:
        self.metrics = metrics or Metrics()
        self.server = Served(app, limits, self.metrics)

    async def __aenter__(self) -> tuple[int, Metrics]:
        return await self.server.start("127.0.0.1", 0), self.metrics

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop()


async def request(port: int, line: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request on a connection of its own: the answer's status and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{line} HTTP/1.1\r\n{HEAD}Content-Length: {len(body)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + body)
        answer = await asyncio.wait_for(reader.read(), 20)
    finally:
        writer.close()
    head, _, rest = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """What the server sent until it closed the connection (bounded: 20 s)."""
    got = b""
    try:
        async with asyncio.timeout(20):
            while chunk := await reader.read(4096):
                got += chunk
    except ConnectionResetError:
        pass
    return got


@pytest.fixture
async def lead() -> AsyncIterator[Leader]:
    async with Leader() as leader:
        yield leader


def api_of(lead: Leader, limits: Limits, metrics: Metrics) -> web.Application:
    return make_app(lead.store, lead.cache, TOKEN, EnginePool("/t", factory=lead._engine),
                    limits=limits, metrics=metrics)


async def test_an_idle_stream_sends_heartbeats_and_a_gone_client_is_released(
        lead: Leader) -> None:
    limits, metrics = Limits(stream_heartbeat=0.1), Metrics()
    async with served(api_of(lead, limits, metrics), limits, metrics) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /v1/events?watch=true HTTP/1.1\r\n{HEAD}\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"text/event-stream" in head
        await until(lambda: metrics.api_streams_open == 1 and metrics.api_watches_open == 1)
        assert b": keep-alive" in await reader.readuntil(b"\n\n")  # nothing happened: a beat
        await reader.readuntil(b": keep-alive\n\n")
        writer.close()  # the client vanishes without reading on
        await until(lambda: metrics.api_streams_open == 0 and metrics.api_watches_open == 0)
        assert metrics.api_streams_closed == 1


async def test_a_stream_sends_the_recent_events_then_each_new_one(lead: Leader) -> None:
    limits, metrics = Limits(stream_heartbeat=0.1), Metrics()
    await put_events(lead.store, [NOW, NOW + 1])
    async with served(api_of(lead, limits, metrics), limits, metrics) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /v1/events?watch=true&app=web HTTP/1.1\r\n{HEAD}\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")
        await until(lambda: metrics.api_watches_open == 1)
        await put_events(lead.store, [NOW + 2], app="other")
        await put_events(lead.store, [NOW + 3])
        got = []
        while len(got) < 3:
            line = await asyncio.wait_for(reader.readuntil(b"\n\n"), 20)
            if b"data: " in line:  # (after the chunk's size line)
                got.append(line)
        assert [b'"app":"web"' in g for g in got] == [True] * 3
        assert [b'"event 0"' in g for g in got] == [True, False, True]
        writer.close()
        await until(lambda: metrics.api_streams_open == 0)


async def test_a_compacted_watch_ends_the_stream_saying_why(lead: Leader) -> None:
    limits, metrics = Limits(stream_heartbeat=0.1), Metrics()
    async with served(api_of(lead, limits, metrics), limits, metrics) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /v1/events?watch=true HTTP/1.1\r\n{HEAD}\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")
        await until(lambda: metrics.api_watches_open == 1)
        stream = lead.store._changed
        lead.store._changed = asyncio.Condition()  # the watch misses what comes next
        await put_events(lead.store, [NOW])
        await lead.store.compact(lead.store.revision)
        lead.store._changed = stream
        await lead.store.break_watches()
        rest = await closed_by_server(reader)
        assert b"the event watch ended" in rest and b"reconnect" in rest
        writer.close()
        await until(lambda: metrics.api_streams_open == 0 and metrics.api_watches_open == 0)


async def test_slow_request_heads_are_closed_after_the_header_timeout(lead: Leader) -> None:
    limits = Limits(header_timeout=0.5)
    async with served(api_of(lead, limits, Metrics()), limits) as (port, _):
        slow = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
        for _, writer in slow[:4]:  # slow from the first request ...
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: sigma\r\n")
        reader, writer = slow[4]  # ... or from the second one of a kept-alive connection
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: sigma\r\n\r\n")
        assert b'"ok": true' in await reader.readuntil(b"}")  # the whole answer
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: sigma\r\n")

        async def dribble(writer: asyncio.StreamWriter) -> None:
            for _ in range(400):  # a header byte every 0.05 s: 20 s unless closed
                await asyncio.sleep(0.05)
                if writer.is_closing() or writer.transport.get_extra_info("socket") is None:
                    return
                try:
                    writer.write(b"X")
                except ConnectionError:
                    return

        tasks = [asyncio.create_task(dribble(w)) for _, w in slow]
        try:
            answers = await asyncio.gather(*(closed_by_server(r) for r, _ in slow))
        finally:
            for task in tasks:
                task.cancel()
        assert answers == [b""] * 5  # closed, never answered (again)
        for _, writer in slow:
            writer.close()
        assert (await request(port, "GET /healthz"))[0] == 200  # others are served


async def test_the_first_head_guard_closes_what_aiohttp_would_not_time() -> None:
    """(aiohttp before 3.14.5 timed a request head only after a first answer.)"""
    got: list[bytes] = []

    class Inner(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            got.append(data)

    server = await asyncio.get_running_loop().create_server(
        lambda: serving._FirstHead(Inner(), 0.3), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: sigma\r\n")
        assert await closed_by_server(reader) == b""
        writer.close()
        assert got == [b"GET / HTTP/1.1\r\nHost: sigma\r\n"]  # the handler had it all
    finally:
        server.close()


async def test_a_slow_body_is_answered_408_and_nothing_is_written(lead: Leader) -> None:
    limits, metrics = Limits(body_timeout=0.3), Metrics()
    async with served(api_of(lead, limits, metrics), limits, metrics) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"PUT /v1/apps HTTP/1.1\r\n{HEAD}Content-Length: 400\r\n\r\n"
                     "app: web\n".encode())
        answer = await closed_by_server(reader)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.3s" in answer
        assert metrics.api_slow_bodies == 1 and not lead.cache.apps()


async def test_connections_over_the_cap_are_answered_503(lead: Leader) -> None:
    limits, metrics = Limits(max_connections=3), Metrics()
    async with served(api_of(lead, limits, metrics), limits, metrics) as (port, _):
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        await until(lambda: metrics.connections() == 3)
        status, body = await request(port, "GET /healthz")
        assert status == 503 and b"try again" in body and metrics.api_connections_refused == 1
        held.pop()[1].close()
        await until(lambda: metrics.connections() == 2)
        assert (await request(port, "GET /healthz"))[0] == 200
        for _, writer in held:
            writer.close()
        await until(lambda: metrics.connections() == 0)
        status, text = await request(port, "GET /metrics")
        assert status == 200 and b"sigma_api_connections_refused_total 1.0\n" in text


# -- etcd history compaction -----------------------------------------------------------------


def test_the_target_is_the_newest_sample_old_enough() -> None:
    samples = deque([(0.0, 10), (60.0, 20), (120.0, 30), (180.0, 40)])
    assert compaction.target(samples, 100.0, 300.0) == 0 and len(samples) == 4
    assert compaction.target(samples, 400.0, 300.0) == 20  # 300 s old or more: 10 and 20
    assert list(samples) == [(120.0, 30), (180.0, 40)]  # those are dropped


async def test_the_leader_compacts_what_is_older_than_it_keeps() -> None:
    store = MemoryStore("/t")
    metrics = Metrics()
    compactor = Compactor(store, keep=300, interval=60, metrics=metrics)
    done = []
    for minute in range(12):
        await store.put("/t/nodes/a", {"minute": minute})
        await compactor.step(now=1000.0 + 60 * minute)
        done.append(store.compacted)
    assert done[:5] == [0] * 5  # nothing is 5 minutes old yet
    assert done[5] == 2 and done == sorted(done) and done[-1] == 8  # 5 minutes kept
    assert metrics.etcd_compacted_revision == 8 and len(compactor.samples) <= 6
    with pytest.raises(WatchCompacted):
        async for _ in store.watch("/t/", 2):
            pass


# -- sigmactl events -------------------------------------------------------------------------


def test_sigmactl_events_asks_for_a_bounded_range_and_says_when_there_is_more(
        fake: Fake) -> None:
    fake.answer("GET", "/v1/events", (200, {"items": [EVENT], "revision": 42, "more": True}))
    result = run(fake, "events", "--limit", "1", "--since", "7")
    assert result.exit_code == 0, result.output
    assert fake.seen[-1]["query"] == "limit=1&since=7"
    assert "older events not shown" in result.stderr and "revision 42" in result.stderr
    assert run(fake, "events", "--limit", "1001").exit_code == 2  # the server's most
