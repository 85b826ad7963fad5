"""`sigmad node`: registers its host and keeps a heartbeat lease (DESIGN.md §1, §6).

The agent is not in the container data path: the master talks to the engine directly. It
delivers the config files its instances pin (sigmad.node.configs); the master runs their
`on_change` through the engine.

Invariants:
- the heartbeat (sigmad.models.Beat) says whether the engine answers; it says so only after
  `before_ready` has removed the copies of instances that moved away while this node was not
  Ready, so the overlay never has two holders of one IP;
- while the engine does not answer, the agent keeps its lease (the node is NotReady but
  alive): the containers that engine runs cannot be fenced, so the master must not count
  them as gone;
- the lease is renewed every third of the TTL whatever else the agent does: making the host
  safe to rejoin (`before_ready`) runs beside the renewals, and Ready is said once it is done;
- an agent that cannot renew its lease stops its instances' containers before the lease can
  lapse (sigmad.node.fence); once its lease is found lapsed it rejoins with a new one, as a
  node that comes back (`before_ready` first);
- rejoining costs etcd the records of this host's own containers (read by key), never a
  read of every instance: a mass lease lapse makes every agent rejoin at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric

from sigmad import metrics, schema
from sigmad.config import NodeConfig
from sigmad.engine import LABEL_INSTANCE, ContainerState, DockerEngine
from sigmad.errors import EngineError, SigmaError
from sigmad.events import EventLog
from sigmad.models import Beat, Instance, Node, now, split_name
from sigmad.network.overlay import OverlayError
from sigmad.node import dockerd
from sigmad.node.configs import ConfigKeeper
from sigmad.node.disks import DiskKeeper, LinuxHost
from sigmad.node.fastpath import FastPathKeeper
from sigmad.node.fence import SelfFence
from sigmad.node.tunnels import TunnelKeeper, tunnel_for
from sigmad.node.usage import Sampler
from sigmad.reasons import Kill, Reason
from sigmad.spec import Resources
from sigmad.store import EtcdStore, Store
from sigmad.tls import client_context

log = logging.getLogger(__name__)
READS_AT_ONCE = 16  # record reads in flight while an agent looks for stale containers


def config_root(config: NodeConfig) -> str:
    """Where the agent delivers configs (sigmad.node.configs): `configs/` of its data dir."""
    return f"{config.data_dir.rstrip('/')}/configs"


def check_engine(url: str, info: dict[str, object],
                 userland_proxy: bool | None = None) -> list[str]:
    """Check the engine's settings from `docker info` (and `userland_proxy`, which the Engine
    API does not show: sigmad.node.dockerd reads it from a local daemon; None: not known):
    refuse a host whose engine cannot cap memory and swap together (sigma's caps would not
    hold: a container could swap past its memory limit); return a warning, with its fix, for
    each setting that production wants and the engine lacks (the node still joins: labs and
    dev hosts run without them)."""
    if not info.get("SwapLimit") or not info.get("MemoryLimit"):
        raise NodeRefused(
            f"the engine at {url} has no memory-swap accounting (docker info: "
            "SwapLimit=false), so sigma cannot cap memory with swap off; enable it "
            "(kernel parameter swapaccount=1 on cgroup v1, or cgroup v2) and restart"
        )
    warnings = []
    if not info.get("LiveRestoreEnabled"):
        warnings.append(
            f"the engine at {url} runs without live-restore: restarting or upgrading dockerd "
            "stops every instance on this host; set \"live-restore\": true in "
            "/etc/docker/daemon.json and reload dockerd (systemctl reload docker)")
    driver = info.get("CgroupDriver")
    if driver not in (None, "systemd"):
        warnings.append(
            f"the engine at {url} uses the {driver} cgroup driver: under systemd two managers "
            "own the cgroup tree and limits can drift under memory pressure; set "
            "\"exec-opts\": [\"native.cgroupdriver=systemd\"] in /etc/docker/daemon.json "
            "and restart dockerd")
    if userland_proxy:
        warnings.append(
            f"the engine at {url} runs the userland proxy: every connection to a published "
            "port (host ports of overlay instances, clients on this host) is copied through "
            "a docker-proxy process; set \"userland-proxy\": false in /etc/docker/daemon.json "
            "and restart dockerd")
    return warnings


class NodeRefused(SigmaError):
    code = "node_refused"
    status = 400


def node_record(config: NodeConfig, info: dict[str, object], draining: bool,
                disks: tuple[int, int] = (0, 0)) -> Node:
    """The Node record from the engine's `info` (real CPU count and memory of the host, unless
    the config's `capacity` overrides them) and its `disks` (allow-listed SSDs and their
    summed size)."""
    capacity = Resources(
        config.capacity.cpu_m or int(str(info.get("NCPU", 0))) * 1000,
        config.capacity.memory or int(str(info.get("MemTotal", 0))))
    allocatable = Resources(
        max(capacity.cpu_m - config.reserved.cpu_m, 0),
        max(capacity.memory - config.reserved.memory, 0),
    )
    return Node(
        name=config.name, engine=config.engine, address=config.address,
        labels=dict(config.labels), capacity=capacity, allocatable=allocatable,
        overcommit=config.overcommit, port_range=list(config.port_range),
        draining=draining, engine_version=str(info.get("ServerVersion", "")),
        ssds=disks[0], ssd_bytes=disks[1], updated=now(),
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
        self.tunnels = TunnelKeeper(config, store, self.engine, lambda: self.lease) \
            if overlay else None
        # The host-compatible fast path needs the host's own address (none on a single host).
        self.fastpath = FastPathKeeper(config.address, self.engine) \
            if overlay and tunnel_for(config) is not None else None
        self.events = EventLog(store)
        self.lease = 0
        self.disks = DiskKeeper(config.name, config.data_dir, config.ssds, store, LinuxHost()) \
            if config.ssds else None
        self.configs = ConfigKeeper(config.name, config_root(config), store) if overlay \
            else None
        self.said: bool | None = None  # what the heartbeat says of the engine (None: no beat)
        self.readying: asyncio.Task[None] | None = None  # `before_ready`, while it runs
        self._woken = asyncio.Event()  # the readying is done: beat now, not at the next tick
        self.fence = SelfFence(lambda: self.engine, config.heartbeat_ttl)
        self.usage = Sampler(config.name, self.engine, store, config.usage_cgroup) \
            if config.usage_interval and overlay else None
        self.node: Node | None = None  # as last registered

    def figures(self) -> Iterator[Metric]:
        """This agent's figures for /metrics: its node's capacity, its heartbeat and its
        last usage sample (host and instance count; no per-instance labels)."""
        node, last = self.node, self.usage.last if self.usage else None
        yield GaugeMetricFamily("sigma_agent_heartbeat_ok", "1 while the agent holds its "
                                "heartbeat lease and says its engine answers",
                                value=int(bool(self.lease) and bool(self.said)))
        cpu = GaugeMetricFamily("sigma_agent_cpu_cores", "this host's cpu: capacity, "
                                "allocatable, used", labels=["kind"])
        memory = GaugeMetricFamily("sigma_agent_memory_bytes", "this host's memory: "
                                   "capacity, allocatable, used", labels=["kind"])
        if node is not None:
            for kind, r in (("capacity", node.capacity), ("allocatable", node.allocatable)):
                cpu.add_metric([kind], r.cpu_m / 1000)
                memory.add_metric([kind], r.memory)
        if last is not None:
            cpu.add_metric(["used"], last.host.cpu)
            memory.add_metric(["used"], last.host.memory)
        yield from (cpu, memory)
        if last is not None:
            yield GaugeMetricFamily("sigma_agent_instances", "instances sampled on this host",
                                    value=len(last.instances))
            yield GaugeMetricFamily("sigma_agent_ssd_used_bytes", "bytes used on this "
                                    "host's SSDs", value=sum(d.used for d in last.ssds.values()))

    async def _engine_info(self) -> dict[str, object]:
        delay = 0.5
        while True:
            try:
                return await self.engine.info()
            except EngineError as exc:
                log.warning("waiting for the engine: %s", exc.message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def warn_engine(self, warnings: list[str]) -> None:
        """Log the engine settings production wants and this engine lacks (with the fix)."""
        for warning in warnings:
            log.warning("%s", warning)

    async def register(self) -> Node:
        """Write the node record, keeping the master-owned `draining` flag."""
        info = await self._engine_info()
        proxy = await asyncio.to_thread(dockerd.userland_proxy, self.config.engine)
        self.warn_engine(check_engine(self.config.engine, info, proxy))
        key = self.store.keys.node(self.config.name)
        disks = await self.disks.capacity() if self.disks else (0, 0)
        while True:
            current = await self.store.get(key, Node)
            node = node_record(self.config, info, current.value.draining if current else False,
                               disks)
            node.config_dir = self.configs.root if self.configs is not None else ""
            if current is None:
                if await self.store.create(key, node):
                    break
            elif await self.store.update(key, node, current.mod_revision):
                break
        self.node = node
        log.info(
            "node %s registered: %d cpu, %d MiB, engine %s %s", node.name,
            node.capacity.cpu_m // 1000, node.capacity.memory >> 20, node.engine,
            node.engine_version,
        )
        return node

    async def heartbeat(self) -> None:
        """Hold a leased heartbeat key saying whether the engine answers, renewed every
        third of the TTL; re-grant the lease if it lapsed (e.g. an etcd outage or a network
        partition). The heartbeat says the engine answers only once the host is made safe
        to rejoin (see `before_ready`). An engine that stops answering makes the node
        NotReady, but its instances stay put until the engine answers again (nothing can
        stop the copies it runs); see the module docstring."""
        ttl = self.config.heartbeat_ttl
        fence = asyncio.create_task(self.fence.run())
        try:
            while True:
                tick = time.monotonic()
                try:
                    await self.beat()
                except SigmaError as exc:
                    log.warning("heartbeat failed: %s", exc.message)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._woken.wait(),
                                           max(tick + ttl / 3 - time.monotonic(), 0.0))
                self._woken.clear()
        finally:
            fence.cancel()
            self._stop_readying()
            await asyncio.gather(fence, return_exceptions=True)

    def _stop_readying(self) -> None:
        if self.readying is not None:
            self.readying.cancel()
            self.readying = None

    async def beat(self) -> None:
        """One heartbeat: renew the lease (or get a new one) while asking the engine, and say
        what changed."""
        key = self.store.keys.heartbeat(self.config.name)
        sent = time.monotonic()
        if self.lease:
            answers, renewed = await asyncio.gather(self._engine_answers(),
                                                    self.store.keepalive(self.lease))
            if renewed:
                self.fence.renewed(sent)
            else:
                log.warning("heartbeat lease %x lapsed", self.lease)
                self.lease, self.said = 0, None
                self._stop_readying()  # what moved away meanwhile: look again
        else:
            answers = await self._engine_answers()
        if not self.lease:
            sent = time.monotonic()
            self.lease = await self.store.grant(self.config.heartbeat_ttl)
            self.fence.renewed(sent)
            log.info("heartbeat lease %x granted (ttl %ds)", self.lease,
                     self.config.heartbeat_ttl)
        if answers == self.said:
            return
        if answers:
            # Made safe to rejoin in a task of its own: the renewals go on meanwhile (a
            # thousand agents rejoining at once, or one slow engine, took longer than the
            # TTL: the new lease lapsed before its first renewal, again and again).
            if self.readying is None:
                self.readying = asyncio.create_task(self.before_ready())
                self.readying.add_done_callback(lambda _: self._woken.set())
            if not self.readying.done():
                return
            done, self.readying = self.readying, None
            done.result()  # raises what failed: the next beat starts it again
        else:
            self._stop_readying()
            log.warning("the engine does not answer: the node is NotReady (its instances "
                        "stay until it answers)")
        await self.store.put(key, Beat(self.config.name, now(), answers), lease=self.lease)
        self.said = answers

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
        """Stop and remove, all at once, the containers no instance record places here;
        none while the cluster's records are absent (no schema key: a lost or fresh etcd)
        or half restored (sigmad.schema): they would all look stale."""
        me = self.config.name
        found = await self.engine.find({LABEL_INSTANCE: ""})
        if not found:
            return
        version, restoring = await schema.read(self.store)
        if version is None or restoring:
            log.warning("%d sigma containers here, and %s: none is removed as stale",
                        len(found), "a restore is under way" if restoring else
                        "etcd holds no cluster records (no schema key)")
            return
        placed = await self._records_of(found)
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

    async def _records_of(self, found: list[ContainerState]) -> dict[str, Instance]:
        """The instance records (`ns/app-index` → record) of the containers `found` here,
        read key by key, READS_AT_ONCE at a time: the records of this host's containers,
        never a scan of every instance (a thousand agents rejoining at once after a mass
        lease lapse each read the whole table: etcd was buried under gigabytes of reads)."""
        owners = {c.labels.get(LABEL_INSTANCE, "") for c in found}
        gate = asyncio.Semaphore(READS_AT_ONCE)

        async def read(owner: str) -> Instance | None:
            ns, _, name = owner.partition("/")
            parts = split_name(name)
            if not ns or parts is None:
                return None  # not an instance's name: no record can place it
            async with gate:
                v = await self.store.get(self.store.keys.instance(ns, *parts), Instance)
            return v.value if v is not None else None

        ordered = sorted(owners)
        found_records = await asyncio.gather(*(read(o) for o in ordered))
        return {o: r for o, r in zip(ordered, found_records, strict=True) if r is not None}

    async def run(self) -> None:
        events = asyncio.create_task(self.events.run())
        try:
            await self.register()
            loops = [self.heartbeat()]
            if self.tunnels is not None:
                loops.append(self.tunnels.run())
            if self.fastpath is not None:
                loops.append(self.fastpath.run())
            if self.disks is not None:
                loops.append(self.disks.run())
            if self.usage is not None:
                loops.append(self.usage.run(lambda: self.lease, self.config.usage_interval))
            if self.config.metrics_listen:
                loops.append(serve_metrics(self.config.metrics_listen,
                                           metrics.registry(self.figures)))
            if self.configs is not None:
                loops.append(self.configs.run())
            await asyncio.gather(*loops)
        finally:
            events.cancel()
            await asyncio.gather(events, return_exceptions=True)
            await self.engine.close()


async def serve_metrics(listen: str, registry: CollectorRegistry) -> None:
    """Serve GET /metrics of `registry` on `listen` (HOST:PORT) until cancelled."""

    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(registry),
                            headers={"Content-Type": metrics.CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    try:
        await web.TCPSite(runner, host.strip("[]") or "0.0.0.0", int(port)).start()
        log.info("metrics on http://%s/metrics", listen)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def run_agent(config: NodeConfig) -> None:
    """Run the agent of `config` until cancelled."""
    store = EtcdStore(config.etcd.endpoints, config.etcd.prefix, tls=config.etcd.tls)
    try:
        await Agent(config, store).run()
    finally:
        await store.close()
