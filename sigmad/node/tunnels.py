"""The agent's overlay work (DESIGN.md §5): the engine's `sigma` network, this host's VXLAN
device, and its FDB kept in line with etcd as instances and nodes come and go.

The kernel is read back on every sync, so a restarted agent only fills in what is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging

from sigmad.config import NodeConfig
from sigmad.engine import Engine
from sigmad.errors import SigmaError
from sigmad.models import Instance, Node
from sigmad.network.ipam import BRIDGE, MTU, VNI, VXLAN, VXLAN_PORT, OverlayNet, mac_for
from sigmad.network.overlay import Overlay, OverlayError, Tunnel
from sigmad.store import Store, WatchCompacted

log = logging.getLogger(__name__)
RESYNC = 10.0  # seconds between syncs when etcd reports nothing (repairs hand-made damage)
SETTLE = 0.02  # seconds to gather a burst of changes into one sync


def desired_fdb(me: str, nodes: list[Node], instances: list[Instance]
                ) -> tuple[dict[str, str], set[str]]:
    """What this host's tunnel should hold: remote instance MAC → its node's VTEP, and the
    VTEPs of every peer (flood entries). Instances on this host need no entry."""
    vteps = {n.name: n.address for n in nodes if n.address}
    own = vteps.get(me)
    peers = {a for name, a in vteps.items() if name != me and a != own}
    remote = {
        mac_for(i.ip): vteps[i.node] for i in instances
        if i.ip and i.node != me and i.node in vteps and vteps[i.node] != own
    }
    return remote, peers


def tunnel_for(config: NodeConfig) -> Tunnel | None:
    """This host's tunnel; None on a single host (no underlay address, or a loopback one)."""
    if not config.address or ipaddress.ip_address(config.address).is_loopback:
        return None
    gateway = OverlayNet(config.overlay_cidr).gateway
    return Tunnel(BRIDGE, VXLAN, VNI, config.address, VXLAN_PORT, MTU, mac_for(gateway))


class TunnelKeeper:
    """Sets up the overlay on this host, then keeps its FDB in line with etcd."""

    def __init__(self, config: NodeConfig, store: Store, engine: Engine) -> None:
        self.config = config
        self.store = store
        self.engine = engine
        tunnel = tunnel_for(config)
        self.overlay = Overlay(tunnel) if tunnel else None
        self.changed = asyncio.Event()
        self.setting_up = asyncio.Lock()  # the heartbeat's rejoin and `run` both set up

    async def setup(self) -> None:
        """The engine's network and the tunnel device, made or repaired (idempotent)."""
        net = OverlayNet(self.config.overlay_cidr)
        async with self.setting_up:
            if await self.engine.ensure_network(net.cidr, net.gateway):
                log.info("created the engine's network for the overlay %s", net.cidr)
            if self.overlay is not None and await asyncio.to_thread(self.overlay.ensure):
                log.info("tunnel %s set up (VTEP %s)", VXLAN, self.config.address)

    async def sync(self) -> None:
        """Program the FDB from the nodes and instances in etcd."""
        if self.overlay is None:
            return
        nodes, _ = await self.store.scan(self.store.keys.nodes(), Node)
        instances, _ = await self.store.scan(self.store.keys.instances(), Instance)
        remote, peers = desired_fdb(
            self.config.name, [v.value for v in nodes], [v.value for v in instances]
        )
        done = await asyncio.to_thread(self.overlay.sync, remote, peers)
        if done.added or done.removed:
            log.info("fdb: %d entries added, %d removed (%d remote instances, %d peers)",
                     done.added, done.removed, len(remote), len(peers))

    async def _watch(self) -> None:
        keys = self.store.keys
        while True:
            try:
                revision = await self.store.ping()
                self.changed.set()  # whatever happened before the watch began
                async for event in self.store.watch(keys.prefix + "/", revision + 1):
                    if event.key.startswith((keys.instances(), keys.nodes())):
                        self.changed.set()
            except (WatchCompacted, SigmaError) as exc:
                log.info("watch restarted: %s", exc)
                await asyncio.sleep(1)

    async def run(self) -> None:
        """Until cancelled: set up, then sync on every change (and every RESYNC seconds)."""
        watcher = asyncio.create_task(self._watch())
        delay = 0.5
        try:
            while True:
                try:
                    await self.setup()
                    await self.sync()
                    delay = 0.5
                except (SigmaError, OverlayError, OSError) as exc:
                    log.warning("overlay: %s; retrying in %gs", exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RESYNC)
                    continue
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), RESYNC)
                self.changed.clear()
                await asyncio.sleep(SETTLE)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
