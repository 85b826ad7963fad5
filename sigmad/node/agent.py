"""`sigmad node`: registers its host and keeps a heartbeat lease (DESIGN.md §1, §6).

The agent is not in the container data path: the master talks to the engine directly.
"""

from __future__ import annotations

import asyncio
import logging

from sigmad.config import NodeConfig
from sigmad.engine import LABEL_INSTANCE, ContainerState, DockerEngine
from sigmad.errors import EngineError, SigmaError
from sigmad.events import EventLog
from sigmad.models import Instance, Node, now
from sigmad.network.overlay import OverlayError
from sigmad.node.tunnels import TunnelKeeper
from sigmad.reasons import Kill, Reason
from sigmad.spec import Resources
from sigmad.store import EtcdStore, Store
from sigmad.tls import client_context

log = logging.getLogger(__name__)


def check_engine(url: str, info: dict[str, object]) -> None:
    """Refuse a host whose engine cannot cap memory and swap together (sigma's caps would not
    hold: a container could swap past its memory limit)."""
    if not info.get("SwapLimit") or not info.get("MemoryLimit"):
        raise NodeRefused(
            f"the engine at {url} has no memory-swap accounting (docker info: "
            "SwapLimit=false), so sigma cannot cap memory with swap off; enable it "
            "(kernel parameter swapaccount=1 on cgroup v1, or cgroup v2) and restart"
        )


class NodeRefused(SigmaError):
    code = "node_refused"
    status = 400


def node_record(config: NodeConfig, info: dict[str, object], draining: bool) -> Node:
    """The Node record from the engine's `info` (real CPU count and memory of the host)."""
    capacity = Resources(int(str(info.get("NCPU", 0))) * 1000, int(str(info.get("MemTotal", 0))))
    allocatable = Resources(
        max(capacity.cpu_m - config.reserved.cpu_m, 0),
        max(capacity.memory - config.reserved.memory, 0),
    )
    return Node(
        name=config.name, engine=config.engine, address=config.address,
        labels=dict(config.labels), capacity=capacity, allocatable=allocatable,
        overcommit=config.overcommit, port_range=list(config.port_range),
        draining=draining, engine_version=str(info.get("ServerVersion", "")), updated=now(),
    )


class Agent:
    """Keeps the node record current and the heartbeat lease alive.

    `overlay=False` leaves out the overlay work (engine network, tunnel, FDB): hollow hosts
    (sigmad.lab.hollow_hosts) run thousands of agents in one process and have no kernel
    side to program."""

    def __init__(self, config: NodeConfig, store: Store, overlay: bool = True) -> None:
        self.config = config
        self.store = store
        # Only this cluster's containers: an engine may be shared.
        self.engine = DockerEngine(config.engine, cluster=config.etcd.prefix,
                                   tls=client_context(config.engine_tls)
                                   if config.engine_tls else None)
        self.tunnels = TunnelKeeper(config, store, self.engine) if overlay else None
        self.events = EventLog(store)
        self.lease = 0

    async def _engine_info(self) -> dict[str, object]:
        delay = 0.5
        while True:
            try:
                return await self.engine.info()
            except EngineError as exc:
                log.warning("waiting for the engine: %s", exc.message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def register(self) -> Node:
        """Write the node record, keeping the master-owned `draining` flag."""
        info = await self._engine_info()
        check_engine(self.config.engine, info)
        key = self.store.keys.node(self.config.name)
        while True:
            current = await self.store.get(key, Node)
            node = node_record(self.config, info, current.value.draining if current else False)
            if current is None:
                if await self.store.create(key, node):
                    break
            elif await self.store.update(key, node, current.mod_revision):
                break
        log.info(
            "node %s registered: %d cpu, %d MiB, engine %s %s", node.name,
            node.capacity.cpu_m // 1000, node.capacity.memory >> 20, node.engine,
            node.engine_version,
        )
        return node

    async def heartbeat(self) -> None:
        """Hold a leased heartbeat key while the engine answers; re-grant the lease if it
        lapsed (e.g. an etcd outage or a network partition), but only after the host is
        made safe to rejoin (see `before_ready`). An engine that stops answering makes the
        node NotReady: its instances are then moved elsewhere."""
        ttl = self.config.heartbeat_ttl
        key = self.store.keys.heartbeat(self.config.name)
        while True:
            try:
                if not await self._engine_answers():
                    if self.lease:
                        log.warning("the engine stopped answering: withdrawing the heartbeat")
                        await self.store.delete(key)
                        self.lease = 0
                elif not self.lease or not await self.store.keepalive(self.lease):
                    await self.before_ready()
                    self.lease = await self.store.grant(ttl)
                    await self.store.put(key, {"node": self.config.name, "since": now()},
                                         lease=self.lease)
                    log.info("heartbeat lease %x granted (ttl %ds)", self.lease, ttl)
            except SigmaError as exc:
                log.warning("heartbeat failed: %s", exc.message)
                self.lease = 0
            await asyncio.sleep(ttl / 3)

    async def _engine_answers(self) -> bool:
        """Whether the engine answers a ping within a third of the TTL (hollow hosts
        override it with an in-process check)."""
        try:
            await asyncio.wait_for(self.engine.ping(), self.config.heartbeat_ttl / 3)
        except (EngineError, TimeoutError):
            return False
        return True

    async def before_ready(self) -> None:
        """Before the node (re)joins: remove containers of instances that moved away (or were
        deleted) while it was gone, and bring the tunnel's FDB in line with etcd, so the
        overlay never has two holders of one IP."""
        await self.remove_stale()
        if self.tunnels is None:
            return
        try:
            await self.tunnels.setup()
            await self.tunnels.sync()
        except (SigmaError, OverlayError) as exc:
            log.warning("overlay not ready yet: %s", exc)

    async def remove_stale(self) -> None:
        """Stop and remove, all at once, the containers no instance record places here."""
        me = self.config.name
        found = await self.engine.find({LABEL_INSTANCE: ""})
        if not found:
            return
        records, _ = await self.store.scan(self.store.keys.instances(), Instance)
        placed = {v.value.key: v.value for v in records}  # `ns/app-index` → record
        stale = []
        for c in found:
            owner = c.labels.get(LABEL_INSTANCE, "")
            ns, _, name = owner.partition("/")
            inst = placed.get(owner)
            if inst is None or me not in (inst.node, inst.next_node):
                reason = Reason.killed(Kill.MIGRATED if inst and inst.node else Kill.DELETED)
                stale.append((c, ns, name, name.rpartition("-")[0], reason))

        async def remove(c: ContainerState, ns: str, name: str, app: str, reason: str) -> None:
            if c.running:
                await self.engine.stop(c.id, timeout=2)
            await self.engine.remove(c.id)
            message = f"stale container {c.name} ({c.id[:12]}) removed on {me}: {reason}"
            log.info("%s", message)
            self.events.emit("instance", ns, name, app, message, warning=True)

        await asyncio.gather(*(remove(*item) for item in stale))

    async def run(self) -> None:
        events = asyncio.create_task(self.events.run())
        try:
            await self.register()
            if self.tunnels is None:
                await self.heartbeat()
            else:
                await asyncio.gather(self.heartbeat(), self.tunnels.run())
        finally:
            events.cancel()
            await asyncio.gather(events, return_exceptions=True)
            await self.engine.close()


async def run_agent(config: NodeConfig) -> None:
    """Run the agent of `config` until cancelled."""
    store = EtcdStore(config.etcd.endpoints, config.etcd.prefix, tls=config.etcd.tls)
    try:
        await Agent(config, store).run()
    finally:
        await store.close()
