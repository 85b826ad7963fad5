"""Bounds on a real etcd and a real master process (issue 16, item 6): the leader compacts
etcd's history; a compaction while a cache's watch is cut loses no change (the cache
relists); a client of an event stream that vanishes is noticed and its stream and watch are
released; slow clients are closed. Needs etcd only (its own, without auto-compaction)."""

from __future__ import annotations

import asyncio
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sigmad.procs import EtcdProcess
from sigmad.state.cache import Cache
from sigmad.store import EtcdStore, WatchCompacted
from tests.integration.conftest import free_port, stop_process, wait_for


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    """An etcd that never compacts by itself: only the master may."""
    proc = EtcdProcess(tmp_path_factory.mktemp("etcd"), free_port(), free_port(),
                       name="bounded", history="")
    proc.start()
    try:
        asyncio.run(proc.wait_ready())
        yield proc
    finally:
        proc.stop()


class Master:
    """One `sigmad master` process on `etcd`, with `settings` in its config."""

    def __init__(self, root: Path, etcd: EtcdProcess, **settings: object) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_hex(16)
        self.prefix = f"/sigma-bounded/{uuid.uuid4().hex[:8]}"
        config = root / "master.yaml"
        config.write_text(yaml.safe_dump({
            "listen": f"127.0.0.1:{self.port}", "token": self.token,
            "etcd": {"endpoints": [etcd.endpoint], "prefix": self.prefix}, **settings}))
        with open(root / "master.log", "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "sigmad", "master", "--config",
                                          str(config)], stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._healthy, 30, f"the master's API (log: {root / 'master.log'})")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def metrics(self) -> dict[str, int]:
        """The master's unlabelled metrics, parsed as Prometheus does (counters with their
        `_total` suffix)."""
        request = urllib.request.Request(f"{self.url}/metrics",
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as r:
            text = r.read().decode()
        return {s.name: int(s.value) for f in text_string_to_metric_families(text)
                for s in f.samples if not s.labels}

    def connect(self, head: str) -> socket.socket:
        """A connection that has sent `head` (a request line and headers, maybe cut)."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        sock.sendall(head.replace("TOKEN", self.token).encode())
        return sock

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def master(tmp_path: Path, etcd: EtcdProcess) -> Iterator[Master]:
    m = Master(tmp_path, etcd, stream_heartbeat=0.5, header_timeout=1, body_timeout=1,
               history_keep=2, compact_interval=0.5, leader_ttl=2)
    yield m
    m.stop()


async def compacted_at(store: EtcdStore) -> int:
    """The oldest revision etcd still holds history from (1 if nothing is compacted): a
    watch from revision 1 of the probe key (written at least once) answers it."""
    await store.put(probe_key(store), {"at": time.time()})
    watch = store.watch_batches(probe_key(store), 1, end="")
    try:
        while not (await anext(watch)).events:  # (etcd first says the watch is created)
            pass
        return 1
    except WatchCompacted as exc:
        return exc.revision
    finally:
        await watch.aclose()


def probe_key(store: EtcdStore) -> str:
    return store.keys.prefix + "/probe"


async def until(check: object, timeout: float, what: str) -> None:
    """Poll the coroutine function `check` until it returns true (bounded)."""
    deadline = time.monotonic() + timeout
    while not await check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)


async def test_the_leader_compacts_etcd_history_keeping_the_last_seconds(
        master: Master, etcd: EtcdProcess) -> None:
    store = EtcdStore([etcd.endpoint], master.prefix)
    try:
        first = 0

        async def compacted_once() -> bool:
            nonlocal first
            first = await compacted_at(store)
            return first > 1

        await until(compacted_once, 60, "the leader's first compaction")

        async def moved_on() -> bool:
            return await compacted_at(store) > first

        await until(moved_on, 60, "the compacted revision to move forward")
        now = await store.ping()
        assert await compacted_at(store) < now  # the last seconds of history stay
        assert master.metrics()["sigma_etcd_compacted_revision"] >= first
    finally:
        await store.close()


class Proxy:
    """A TCP proxy to etcd that can cut every connection through it and refuse new ones."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.cut = False
        self.pairs: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.pairs += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut_all(self) -> None:
        self.cut = True
        for writer in self.pairs:
            writer.transport.abort()
        self.pairs.clear()

    async def close(self) -> None:
        self.cut_all()
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def proxy(etcd: EtcdProcess) -> AsyncIterator[Proxy]:
    p = Proxy(etcd.client_port)
    await p.start()
    yield p
    await p.close()


async def test_a_compaction_while_a_watch_is_cut_loses_no_change(
        etcd: EtcdProcess, proxy: Proxy) -> None:
    prefix = f"/sigma-bounded/{uuid.uuid4().hex[:8]}"
    writer = EtcdStore([etcd.endpoint], prefix)
    behind = EtcdStore([f"http://127.0.0.1:{proxy.port}"], prefix, retry_for=60)
    cache = Cache(behind)
    told: list[str] = []
    cache.subscribe(lambda kind, key, old, new:
                    told.append(f"{key.rsplit('/', 1)[1]}:{'del' if new is None else 'put'}"))
    filling = asyncio.create_task(cache.run())
    try:
        for n in range(10):
            await writer.put(writer.keys.heartbeat(f"h{n}"), {"node": f"h{n}"})
        await cache.synced.wait()

        async def both_see(names: set[str]) -> bool:
            return cache.ready == names and cache.stale_for() == 0

        await until(lambda: both_see({f"h{n}" for n in range(10)}), 30, "the cache to fill")
        proxy.cut_all()  # the cache's watch breaks and cannot resume ...

        async def stale() -> bool:
            return cache.stale_for() > 0

        await until(stale, 30, "the cache's watch to break")
        for n in range(5):  # ... while keys change and the history of it is compacted
            await writer.delete(writer.keys.heartbeat(f"h{n}"))
            await writer.put(writer.keys.heartbeat(f"h{n + 10}"), {"node": f"h{n + 10}"})
        assert await writer.compact(await writer.ping())
        proxy.cut = False
        await until(lambda: both_see({f"h{n}" for n in range(5, 15)}), 60,
                    "the cache to relist after the compaction")
        assert {f"h{n}:del" for n in range(5)} <= set(told)
        assert {f"h{n}:put" for n in range(10, 15)} <= set(told)
    finally:
        filling.cancel()
        await asyncio.gather(filling, return_exceptions=True)
        for store in (behind, writer):
            await store.close()


def test_a_vanished_stream_client_is_released(master: Master) -> None:
    sock = master.connect("GET /v1/events?watch=true HTTP/1.1\r\nHost: sigma\r\n"
                          "Authorization: Bearer TOKEN\r\n\r\n")
    assert b"text/event-stream" in sock.recv(4096)
    wait_for(lambda: master.metrics()["sigma_api_streams_open"] == 1
             and master.metrics()["sigma_api_watches_open"] == 1, 30, "the stream")
    sock.close()  # gone, without reading what came since
    wait_for(lambda: master.metrics()["sigma_api_streams_open"] == 0
             and master.metrics()["sigma_api_watches_open"] == 0, 30,
             "the stream and its watch to be released")
    assert master.metrics()["sigma_api_streams_closed_total"] == 1


def test_slow_clients_are_closed_and_others_served(master: Master) -> None:
    slow = [master.connect("GET /v1/apps HTTP/1.1\r\nHost: sigma\r\n") for _ in range(50)]
    body = master.connect("PUT /v1/apps HTTP/1.1\r\nHost: sigma\r\nAuthorization: Bearer "
                          "TOKEN\r\nContent-Length: 100\r\n\r\napp: web\n")
    closed: set[int] = set()
    deadline = time.monotonic() + 60
    while len(closed) < len(slow) and time.monotonic() < deadline:
        for n, sock in enumerate(slow):  # a header byte every 0.2 s from each
            if n in closed:
                continue
            try:
                sock.sendall(b"X")
                sock.setblocking(False)
                if sock.recv(4096) == b"":
                    closed.add(n)
            except BlockingIOError:
                pass
            except OSError:
                closed.add(n)
            finally:
                sock.setblocking(True)
        time.sleep(0.2)
    assert len(closed) == len(slow), "slow request heads were not closed"
    answer = body.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1s" in answer
    assert master.metrics()["sigma_api_slow_bodies_total"] == 1
    for sock in [*slow, body]:
        sock.close()
    assert master._healthy()  # and the master serves on
