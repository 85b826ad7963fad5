"""`sigmad master`: the state cache, the API served from it, and the controller while this
master leads."""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import time

from aiohttp import web

from sigmad.api import make_app
from sigmad.config import MasterConfig
from sigmad.control.controller import Controller
from sigmad.leader import Elector
from sigmad.state.cache import Cache
from sigmad.store import EtcdStore, Store

log = logging.getLogger(__name__)
API_RETRY_FOR = 3.0  # an API call waits this long for etcd, then answers 503
GC_PAUSE_WARN = 1.0  # seconds


def tune_gc() -> None:
    """Full garbage collections scan every object a big cache holds: make them rarer, and
    say when one pauses the process for long (everything waits for it)."""
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


def raise_file_limit() -> None:
    """Open files up to the hard limit: one connection (or more) per node engine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve_api(store: Store, cache: Cache, token: str, listen: str) -> web.AppRunner:
    """Start the API on `listen` (HOST:PORT); the caller cleans up."""
    app = make_app(store, cache, token)
    # Open event streams hold requests forever: give them 2 s on shutdown, then cancel them.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    await web.TCPSite(runner, host or "0.0.0.0", int(port)).start()
    log.info("API listening on http://%s", listen)
    return runner


async def run_master(config: MasterConfig) -> None:
    """Fill the cache, serve the API, and run the controller while this master leads, until
    cancelled.

    The controller gets a store of its own, fenced by the leader key while this master leads
    (sigmad.leader); the election has a store with short timeouts, so that a lost etcd is
    noticed within the lease's TTL."""
    raise_file_limit()
    tune_gc()
    endpoints, prefix = config.etcd.endpoints, config.etcd.prefix
    reads = EtcdStore(endpoints, prefix)
    cache = Cache(reads)
    filling = asyncio.create_task(cache.run())
    api_store = EtcdStore(endpoints, prefix, retry_for=API_RETRY_FOR)
    ttl = config.leader_ttl
    election = EtcdStore(endpoints, prefix, retry_for=ttl / 3, rpc_timeout=max(1.0, ttl / 3))
    store = EtcdStore(endpoints, prefix)
    runner: web.AppRunner | None = None
    try:
        await cache.synced.wait()
        runner = await serve_api(api_store, cache, config.token, config.listen)
        elector = Elector(election, store, config.master_id(), config.api_url(), ttl,
                          keep_in_thread=True)

        async def lead() -> None:
            await Controller(store, cache, config).run()

        log.info("master %s (API %s) campaigns for leadership (lease TTL %ds)",
                 elector.id, elector.api, ttl)
        await elector.run(lead)
    finally:
        if runner is not None:
            await runner.cleanup()
        filling.cancel()
        await asyncio.gather(filling, return_exceptions=True)
        for s in (store, election, api_store, reads):
            await s.close()
