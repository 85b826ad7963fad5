"""`sigmad master`: the API server and the controller against one etcd."""

from __future__ import annotations

import logging

from aiohttp import web

from sigmad.api import make_app
from sigmad.config import MasterConfig
from sigmad.controller import Controller
from sigmad.store import Store

log = logging.getLogger(__name__)


async def serve_api(store: Store, token: str, listen: str) -> web.AppRunner:
    """Start the API on `listen` (HOST:PORT); the caller cleans the runner up."""
    host, _, port = listen.rpartition(":")
    runner = web.AppRunner(make_app(store, token), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host or "0.0.0.0", int(port)).start()
    log.info("API listening on http://%s", listen)
    return runner


async def run_master(config: MasterConfig) -> None:
    """Serve the API and run the controller until cancelled."""
    store = Store(config.etcd.endpoints, config.etcd.prefix)
    runner = await serve_api(store, config.token, config.listen)
    try:
        await Controller(store, config.reconcile_interval).run()
    finally:
        await runner.cleanup()
        await store.close()



