"""`sigmad master`: the API server and the controller against one etcd."""

from __future__ import annotations

import logging

from aiohttp import web

from sigmad.api import make_app
from sigmad.config import EtcdConfig, MasterConfig
from sigmad.controller import Controller
from sigmad.leader import Elector
from sigmad.store import Store

log = logging.getLogger(__name__)
API_RETRY_FOR = 3.0  # an API call waits this long for etcd, then answers 503


async def serve_api(etcd: EtcdConfig, token: str, listen: str) -> web.AppRunner:
    """Start the API on `listen` (HOST:PORT) with a store of its own; the caller cleans up."""
    store = Store(etcd.endpoints, etcd.prefix, retry_for=API_RETRY_FOR)
    app = make_app(store, token)

    async def close_store(_: web.Application) -> None:
        await store.close()

    app.on_cleanup.append(close_store)
    # Open event streams hold requests forever: give them 2 s on shutdown, then cancel them.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    await web.TCPSite(runner, host or "0.0.0.0", int(port)).start()
    log.info("API listening on http://%s", listen)
    return runner


async def run_master(config: MasterConfig) -> None:
    """Serve the API, and run the controller while this master leads, until cancelled.

    The controller gets a store of its own, fenced by the leader key while this master leads
    (sigmad.leader); the election has a store with short timeouts, so that a lost etcd is
    noticed within the lease's TTL."""
    runner = await serve_api(config.etcd, config.token, config.listen)
    ttl = config.leader_ttl
    election = Store(config.etcd.endpoints, config.etcd.prefix, retry_for=ttl / 3,
                     rpc_timeout=max(1.0, ttl / 3))
    store = Store(config.etcd.endpoints, config.etcd.prefix)
    elector = Elector(election, store, config.master_id(), config.api_url(), ttl)

    async def lead() -> None:
        await Controller(store, config.reconcile_interval, config.overlay_cidr).run()

    log.info("master %s (API %s) campaigns for leadership (lease TTL %ds)",
             elector.id, elector.api, ttl)
    try:
        await elector.run(lead)
    finally:
        await runner.cleanup()
        await store.close()
        await election.close()
