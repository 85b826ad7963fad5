"""The agent's overlay work (DESIGN.md §5): the engine's `sigma` network, this host's VXLAN
device, and its FDB kept in line with etcd as instances and nodes come and go.

Invariants:
- the nodes and instances come from a state cache (list + watch), never from a scan per
  change; only a change of an instance's IP or node, or of a node's address, triggers a sync;
- the engine's network, the tunnel device and the kernel's FDB are read back at start, after
  any failure and every RESYNC seconds (repairing hand-made damage), so a restarted agent only
  fills in what is missing; between those, a sync applies what changed since the last one;
- after each sync the agent says which store revision its FDB now reflects, in the key
  `overlay-applied/{node}` under its heartbeat lease (sigmad.models.OverlayApplied): the
  controller stops the old copy of a live move only once every Ready node has applied the
  flip (sigmad.control.moves). A host without a tunnel says so too (it has nothing to apply);
- frames bridged between instances skip the host's iptables unless `overlay_netfilter`
  (sigmad.network.netfilter), set again with every full sync;
- the same record says which old copies of moving instances here are drained
  (sigmad.node.quiesce): a change of an instance's quiesce mark triggers a sync too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import subprocess
import time
from collections.abc import Callable, Iterable
from typing import Any

from sigmad.config import NodeConfig
from sigmad.engine import Engine
from sigmad.errors import SigmaError
from sigmad.models import Instance, Node, OverlayApplied, now
from sigmad.network import netfilter
from sigmad.network.ipam import BRIDGE, MTU, VNI, VXLAN, VXLAN_PORT, OverlayNet, mac_for
from sigmad.network.overlay import Overlay, OverlayError, Tunnel
from sigmad.node.quiesce import Quiescer
from sigmad.state.cache import APPLIED, INSTANCES, NODES, USAGE, Cache
from sigmad.store import Store, Versioned

log = logging.getLogger(__name__)
RESYNC = 10.0  # seconds between full syncs, read back from the kernel (repairs hand-made damage)
SETTLE = 0.1  # seconds to gather a burst of changes into one sync


def desired_fdb(me: str, nodes: list[Node], instances: Iterable[Instance]
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

    def __init__(self, config: NodeConfig, store: Store, engine: Engine,
                 lease: Callable[[], int] = lambda: 0) -> None:
        self.config = config
        self.store = store
        self.engine = engine
        self.lease = lease  # the heartbeat lease (0: none yet) the applied revision goes under
        self.said: tuple[int, int, frozenset[tuple[str, float]]] = (0, 0, frozenset())
        # (lease, revision, drained) last said applied
        tunnel = tunnel_for(config)
        self.overlay = Overlay(tunnel) if tunnel else None
        self.changed = asyncio.Event()
        self.quiescer = Quiescer(config.name, engine, BRIDGE, self.changed.set)
        self.setting_up = asyncio.Lock()  # the heartbeat's rejoin and `run` both set up

    async def setup(self) -> None:
        """The engine's network and the tunnel device, made or repaired (idempotent)."""
        net = OverlayNet(self.config.overlay_cidr)
        async with self.setting_up:
            if await self.engine.ensure_network(net.cidr, net.gateway):
                log.info("created the engine's network for the overlay %s", net.cidr)
            if self.overlay is not None and await asyncio.to_thread(self.overlay.ensure):
                log.info("tunnel %s set up (VTEP %s)", VXLAN, self.config.address)
            await self._bridge_netfilter(net.cidr)

    async def _bridge_netfilter(self, cidr: str) -> None:
        """Set how frames bridged on the overlay meet iptables (sigmad.network.netfilter);
        a failure is logged and tried again at the next full sync: it slows the overlay down
        or leaves it as Docker set it, and must not hold up the FDB."""
        keep = self.config.overlay_netfilter
        try:
            if await asyncio.to_thread(netfilter.apply, BRIDGE, cidr, keep):
                log.info("frames bridged on %s: %s", BRIDGE,
                         "through iptables" if keep else "around iptables (hairpin rule set)")
        except (OverlayError, OSError, subprocess.SubprocessError) as exc:
            log.warning("frames bridged on %s: could not set how they meet iptables: %s "
                        "(trying again in %gs)", BRIDGE, exc, RESYNC)

    async def sync(self) -> None:
        """Program the FDB from the nodes and instances in etcd now (read back the kernel's)."""
        if self.overlay is None:
            return
        nodes, _ = await self.store.scan(self.store.keys.nodes(), Node)
        instances, _ = await self.store.scan(self.store.keys.instances(), Instance)
        await self._program([v.value for v in nodes], [v.value for v in instances], True)

    async def _program(self, nodes: list[Node], instances: Iterable[Instance],
                       verify: bool) -> None:
        assert self.overlay is not None
        remote, peers = desired_fdb(self.config.name, nodes, instances)
        done = await asyncio.to_thread(self.overlay.sync, remote, peers, verify)
        if done.added or done.removed:
            log.info("fdb: %d entries added, %d removed (%d remote instances, %d peers)",
                     done.added, done.removed, len(remote), len(peers))

    def _on_change(self, kind: str, key: str, old: Versioned[Any] | None,
                   new: Versioned[Any] | None) -> None:
        if kind in (NODES, INSTANCES) and (
                fdb_input(kind, old) != fdb_input(kind, new)
                or (kind == INSTANCES and quiesce_input(old) != quiesce_input(new))):
            self.changed.set()

    async def run(self) -> None:
        """Until cancelled: set up, then sync on every change that matters (and fully every
        RESYNC seconds)."""
        cache = Cache(self.store, ignore=(USAGE, APPLIED))  # (not needed here)
        cache.subscribe(self._on_change)
        filling = asyncio.create_task(cache.run())
        delay = 0.5
        full_at = 0.0  # monotonic time of the next full sync
        try:
            await cache.synced.wait()
            while True:
                full = time.monotonic() >= full_at
                self.changed.clear()
                try:
                    if full:
                        await self.setup()
                    revision = cache.revision
                    if self.overlay is not None:
                        await self._program([v.value for v in cache.nodes().values()],
                                            [v.value for v in cache.instances().values()], full)
                    await self.quiescer.refresh({v.value.key: v.value for v in
                                                 cache.instances().values()}, full)
                    await self._say_applied(revision)
                    delay = 0.5
                except (SigmaError, OverlayError, OSError) as exc:
                    log.warning("overlay: %s; retrying in %gs", exc, delay)
                    full_at = 0.0
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RESYNC)
                    continue
                if full:
                    full_at = time.monotonic() + RESYNC
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.changed.wait(),
                                           max(0.0, full_at - time.monotonic()))
                await asyncio.sleep(SETTLE)
        finally:
            self.quiescer.stop()
            filling.cancel()
            await asyncio.gather(filling, return_exceptions=True)


    async def _say_applied(self, revision: int) -> None:
        """Put `overlay-applied/{node}` = `revision` under the heartbeat lease (once per
        lease and revision)."""
        lease = self.lease()
        drained = dict(self.quiescer.drained)
        said = (lease, revision, frozenset(drained.items()))
        if not lease or said == self.said:
            return
        key = self.store.keys.overlay_applied(self.config.name)
        try:
            await self.store.put(key, OverlayApplied(self.config.name, revision, now(), drained),
                                 lease=lease)
        except SigmaError as exc:  # (the FDB is programmed: only the news is late)
            log.warning("could not say the overlay revision applied (%s): the leader waits "
                        "up to its bound before it stops a moved instance's old copy",
                        exc.message)
            return
        self.said = said


def quiesce_input(record: Versioned[Instance] | None) -> object:
    """What of an instance record its node's quiesce depends on."""
    if record is None:
        return None
    i = record.value
    return (i.quiesce, i.node, i.next_node)


def fdb_input(kind: str, record: Versioned[Any] | None) -> object:
    """What of a node or instance record the FDB depends on."""
    if record is None:
        return None
    value = record.value
    return (value.ip, value.node) if kind == INSTANCES else value.address
