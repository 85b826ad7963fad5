"""`sigmad master`: the state cache, the API served from it, and the controller while this
master leads."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gc
import logging
import resource
import ssl
import sys
import threading
import time
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

from sigmad import schema
from sigmad.api import make_app
from sigmad.api.auth import DEFAULT_CAPS, TokenCaps
from sigmad.api.serving import Limits, Served
from sigmad.config import MasterConfig
from sigmad.control.compaction import Compactor
from sigmad.control.controller import Controller
from sigmad.engine import EnginePool
from sigmad.leader import Elector
from sigmad.metrics import Metrics
from sigmad.state.cache import Cache
from sigmad.store import EtcdStore, Store
from sigmad.tls import client_context, server_context

log = logging.getLogger(__name__)
API_RETRY_FOR = 3.0  # an API call waits this long for etcd, then answers 503
GC_PAUSE_WARN = 1.0  # seconds
GC_FREEZE = 60.0  # seconds
API_STOP = 10.0  # seconds the API's thread has to stop
# How long a thread waiting for the GIL waits before the running one must yield (Python's
# default is 5 ms). A GET takes the GIL a few times (socket ready, read, write): at 5 ms
# each, the API's thread queued behind a busy leader's loop answered a one-app GET in
# 0.2 s at the 99th percentile.
SWITCH_INTERVAL = 0.001
T = TypeVar("T")


def tune_gc() -> None:
    """Full garbage collections scan every object a big cache holds (seconds, at 100,000
    instances, during which nothing else runs): make them rarer, and say when one pauses
    the process for long. `freeze_gc` keeps what they scan small."""
    gc.set_threshold(10_000, 20, 100)
    started = [0.0]

    def timing(phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            started[0] = time.monotonic()
        elif (pause := time.monotonic() - started[0]) > GC_PAUSE_WARN:
            log.warning("a full garbage collection paused the master for %.1fs", pause)

    gc.callbacks.append(timing)


async def freeze_gc() -> None:
    """Every GC_FREEZE seconds, move what lives into the collector's permanent generation
    (gc.freeze): the cache's records are acyclic and freed by their reference counts, so
    full collections need only scan what was made since."""
    while True:
        await asyncio.sleep(GC_FREEZE)
        gc.freeze()


def raise_file_limit() -> None:
    """Open files up to the hard limit: one connection (or more) per node engine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class ApiThread:
    """The API served from a thread of its own, on its own event loop: reads answer from the
    cache however busy the leader's loop is (a burst of work never delays a GET), and what
    needs etcd or an engine runs on the main loop (sigmad.api.routes). It is served within
    `limits` (sigmad.api.serving)."""

    def __init__(self, store: Store, cache: Cache, token: str, listen: str, limits: Limits,
                 metrics: Metrics, tls: ssl.SSLContext | None = None,
                 engines: EnginePool | None = None, caps: TokenCaps = DEFAULT_CAPS,
                 audit_log: str = "", master_id: str = "") -> None:
        self.store, self.cache, self.token, self.listen = store, cache, token, listen
        self.limits, self.metrics = limits, metrics
        self.tls, self.engines = tls, engines
        self.caps, self.audit_log, self.master_id = caps, audit_log, master_id
        self.main = asyncio.get_running_loop()
        self.loop = asyncio.new_event_loop()
        self.ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.thread = threading.Thread(target=self._serve, name="api", daemon=True)

    def _on_main(self, coro: Coroutine[Any, Any, T]) -> Awaitable[T]:
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.main))

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = make_app(self.store, self.cache, self.token, self.engines,
                       on_main=self._on_main, limits=self.limits, metrics=self.metrics,
                       caps=self.caps, audit_log=self.audit_log, master_id=self.master_id)
        served = Served(app, self.limits, self.metrics)
        try:
            host, _, port = self.listen.rpartition(":")
            self.loop.run_until_complete(served.start(host or "0.0.0.0", int(port),
                                                      self.tls))
        except BaseException as exc:
            self.ready.set_exception(exc)
            return
        self.ready.set_result(None)
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(served.stop())
            self.loop.close()

    async def start(self) -> None:
        self.thread.start()
        await asyncio.wrap_future(self.ready)
        log.info("API listening on %s://%s", "https" if self.tls else "http", self.listen)
        host = self.listen.rpartition(":")[0].strip("[]")
        if self.tls is None and host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("the API on %s is plain HTTP beyond this host: tokens cross the "
                        "network in clear. Set tls (cert, key) in the master config "
                        "(sigmad pki issue master NAME)", self.listen)

    async def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        await asyncio.to_thread(self.thread.join, API_STOP)


async def run_master(config: MasterConfig) -> None:
    """Fill the cache, serve the API, and run the controller while this master leads, until
    cancelled.

    The controller gets a store of its own, fenced by the leader key while this master leads
    (sigmad.leader); the election has a store with short timeouts, so that a lost etcd is
    noticed within the lease's TTL."""
    raise_file_limit()
    tune_gc()
    sys.setswitchinterval(SWITCH_INTERVAL)
    endpoints, prefix, tls = config.etcd.endpoints, config.etcd.prefix, config.etcd.tls
    reads = EtcdStore(endpoints, prefix, tls=tls)
    cache = Cache(reads)
    filling = asyncio.create_task(cache.run())
    freezing = asyncio.create_task(freeze_gc())
    api_store = EtcdStore(endpoints, prefix, retry_for=API_RETRY_FOR, tls=tls)
    ttl = config.leader_ttl
    election = EtcdStore(endpoints, prefix, retry_for=ttl / 3, rpc_timeout=max(1.0, ttl / 3),
                         tls=tls)
    store = EtcdStore(endpoints, prefix, tls=tls)
    metrics = Metrics()
    limits = Limits(config.header_timeout, config.body_timeout, config.max_connections,
                    config.stream_heartbeat, config.exec_idle_timeout)
    api: ApiThread | None = None
    try:
        await cache.synced.wait()
        engine_tls = client_context(config.engine_tls) if config.engine_tls else None
        api = ApiThread(api_store, cache, config.token, config.listen, limits, metrics,
                        server_context(config.tls) if config.tls else None,
                        EnginePool(prefix, tls=engine_tls),
                        TokenCaps(config.max_requests_per_token, config.max_streams_per_token),
                        config.audit_log, config.master_id())
        await api.start()
        elector = Elector(election, store, config.master_id(), config.api_url(), ttl,
                          keep_in_thread=True,
                          gate=functools.partial(schema.why_not_lead, election))

        async def lead() -> None:
            version = await schema.settle(store, elector.id)
            log.info("records are of schema version %d", version)
            compactor = Compactor(store, config.history_keep, config.compact_interval,
                                  metrics)
            compacting = asyncio.create_task(compactor.run())
            try:
                await Controller(store, cache, config).run()
            finally:
                compacting.cancel()
                await asyncio.gather(compacting, return_exceptions=True)

        log.info("master %s (API %s) campaigns for leadership (lease TTL %ds)",
                 elector.id, elector.api, ttl)
        await elector.run(lead)
    finally:
        if api is not None:
            await api.stop()
        for task in (filling, freezing):
            task.cancel()
        await asyncio.gather(filling, freezing, return_exceptions=True)
        for s in (store, election, api_store, reads):
            await s.close()
