"""`sigmad lab hollow`: N hollow hosts in ONE process, for scale runs (kubemark's hollow nodes).

Each host `hI` is a hollow engine on `DIR/hI.sock` (sigmad.lab.hollow_engine) and a real node
agent (sigmad.node.agent) as an asyncio task: it registers its Node record with the capacity
its engine reports and holds its heartbeat lease, exactly as on a real host, but without the
overlay (there is no kernel side) and with an in-process engine check instead of a ping per
tick. All agents share one etcd client, whose lease keepalives share LEASE_STREAMS gRPC streams
(sigmad.store.LeaseStream): a heartbeat tick costs ~0.2 ms of CPU instead of ~0.8 ms, so
5,000 agents at TTL 10 s (a tick every 3.3 s) cost about a third of a core. Not ONE stream:
etcd renews a stream's leases one after the other, each waiting for its apply to catch up,
and behind the master's burst of writes 5,000 renewals in a row outlasted the TTL.

A control endpoint, `DIR/control.sock` (HTTP), breaks and heals hosts while it runs:
    POST /kill   {"hosts": ["h1", ...]}  power loss: the agent stops (its lease lapses after
                                          the TTL), the engine's containers die, its socket goes
    POST /freeze {"hosts": [...]}         the engine stops answering (the agent's heartbeat
                                          says so: NotReady, as with a SIGSTOPped dockerd)
    POST /heal   {"hosts": [...]}         the engine answers again; a killed host's agent
                                          starts over (stale copies removed before Ready)
    GET  /stats                           hosts, ready, killed, frozen, containers, running,
                                          requests served, CPU seconds and peak RSS
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from sigmad.config import DEFAULT_OVERLAY_CIDR, EtcdConfig, NodeConfig
from sigmad.engine import LABEL_CLUSTER, DockerEngine
from sigmad.lab.hollow import Capacity
from sigmad.lab.hollow_engine import EngineServer
from sigmad.models import DEFAULT_PORT_RANGE
from sigmad.network.ipam import BRIDGE, MTU, NETWORK, OverlayNet
from sigmad.node.agent import Agent
from sigmad.store import EtcdStore

log = logging.getLogger(__name__)
DEFAULT_IMAGE = "sigma/busybox:latest"
CONTROL = "control.sock"
REGISTER_CONCURRENCY = 64  # agents registering at once (each costs a few etcd calls)
LEASE_STREAMS = 32  # keepalive streams the agents' leases are spread over (etcd renews the
# leases of one stream one by one: see sigmad.store.EtcdStore)
Say = Callable[[str], None]


@dataclass
class HollowConfig:
    hosts: int
    dir: Path
    etcd: list[str]
    prefix: str = "/sigma/v1"
    ttl: int = 10
    latency: float = 0.0  # seconds added to create/start/stop...
    cpu: int = 8  # cores per host
    memory: int = 32 << 30  # bytes per host
    labels: dict[str, str] = field(default_factory=dict)
    zones: int = 0  # > 0: label zone=zN (hosts round-robin over N zones)
    images: tuple[str, ...] = (DEFAULT_IMAGE,)
    pull_any: bool = True  # a pull of an image not in `images` succeeds (else: manifest unknown)
    overlay_cidr: str = DEFAULT_OVERLAY_CIDR

    def names(self) -> list[str]:
        return [f"h{i}" for i in range(1, self.hosts + 1)]


def raise_nofile() -> int:
    """Raise this process's open-file limit (root may go past the hard limit); the new limit.
    Each host holds a listening socket, and every connection to it is one more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for wanted in (max(hard, 1 << 18), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            continue
    return soft


class HollowAgent(Agent):
    """A node agent whose engine is in this process: it checks the engine's fault switches
    instead of pinging it, and registers behind a gate (a burst of 5,000 registrations
    would otherwise queue thousands of etcd calls at once)."""

    def __init__(self, config: NodeConfig, store: EtcdStore, server: EngineServer,
                 gate: asyncio.Semaphore, registered: Callable[[], None]) -> None:
        super().__init__(config, store, overlay=False)
        # No kept-alive connection to its own engine: both ends are in this process (two
        # descriptors each), and after a mass lease lapse every agent's self-fence and
        # rejoin had left two such connections idle, 4 descriptors a host on top of the
        # master's: 5,000 hosts went past the open-file limit (EMFILE).
        self.engine = DockerEngine(config.engine, cluster=config.etcd.prefix,
                                   keep_alive=False)
        self.server = server
        self.gate = gate
        self.registered = registered

    async def _engine_answers(self) -> bool:
        return self.server.answers

    def warn_engine(self, warnings: list[str]) -> None:
        """Silent: the hollow engine answers like a stock dockerd (no live-restore, cgroupfs),
        and thousands of hosts saying so would bury the log."""

    async def register(self) -> Any:
        async with self.gate:
            node = await super().register()
        self.registered()
        return node


class HollowHosts:
    """The engines, agents and control endpoint of one hollow-hosts process."""

    def __init__(self, config: HollowConfig, say: Say | None = None) -> None:
        self.config = config
        self.say: Say = say or log.info
        self.servers: dict[str, EngineServer] = {}
        self.agents: dict[str, HollowAgent] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.killed: set[str] = set()
        self.registrations = 0
        self.store: EtcdStore | None = None
        self.gate = asyncio.Semaphore(REGISTER_CONCURRENCY)
        self._control: web.AppRunner | None = None

    def _registered(self) -> None:
        self.registrations += 1

    def node_config(self, index: int, name: str) -> NodeConfig:
        c = self.config
        labels = {**c.labels, "host": name}
        if c.zones:
            labels["zone"] = f"z{index % c.zones}"
        return NodeConfig(
            name=name, engine=self.servers[name].url, labels=labels,
            port_range=list(DEFAULT_PORT_RANGE), heartbeat_ttl=c.ttl,
            overlay_cidr=c.overlay_cidr, etcd=EtcdConfig(c.etcd, c.prefix),
        )

    async def start_engines(self) -> None:
        c = self.config
        c.dir.mkdir(parents=True, exist_ok=True)
        net = OverlayNet(c.overlay_cidr)
        network = {
            "Name": NETWORK, "Driver": "bridge",
            "IPAM": {"Driver": "default",
                     "Config": [{"Subnet": net.cidr, "Gateway": net.gateway}]},
            "Options": {"com.docker.network.bridge.name": BRIDGE,
                        "com.docker.network.driver.mtu": str(MTU)},
            "Labels": {LABEL_CLUSTER: c.prefix},
        }
        for i, name in enumerate(c.names()):
            server = EngineServer(
                c.dir / f"{name}.sock", Capacity(c.cpu, c.memory, name), c.latency, c.images,
                None if c.pull_any else set(),
            )
            server.model.create_network(network)  # what the agent's overlay set-up makes
            await server.start()
            self.servers[name] = server
            if (i + 1) % 1000 == 0:
                self.say(f"engines listening: {i + 1}/{c.hosts}")

    def start_agent(self, index: int, name: str) -> None:
        assert self.store is not None
        agent = HollowAgent(self.node_config(index, name), self.store, self.servers[name],
                            self.gate, self._registered)
        self.agents[name] = agent
        task = self.tasks[name] = asyncio.create_task(agent.run(), name=f"agent {name}")
        task.add_done_callback(self._agent_ended)

    def _agent_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s stopped: %r", task.get_name(), task.exception())

    def ready(self) -> int:
        """Agents holding a heartbeat lease."""
        return sum(1 for name, a in self.agents.items() if a.lease and name in self.tasks)

    async def run(self) -> None:
        """Start everything, report progress, then serve until cancelled."""
        c = self.config
        limit = raise_nofile()
        started = time.monotonic()
        gc.set_threshold(50_000, 50, 100)  # fewer collections while thousands of hosts start
        self.say(f"hollow hosts: {c.hosts} engines in {c.dir} ({c.cpu} cpu, "
                 f"{c.memory >> 30} GiB each), open-file limit {limit}")
        await self.start_engines()
        self.store = EtcdStore(c.etcd, c.prefix, shared_leases=True,
                               lease_streams=LEASE_STREAMS)
        await self.start_control()
        try:
            for i, name in enumerate(c.names()):
                self.start_agent(i, name)
            await self._progress(started)
            await asyncio.Event().wait()  # until cancelled; agents end only when killed
        finally:
            await self.close()

    async def _progress(self, started: float) -> None:
        """Print how many hosts registered and hold their lease, until all do."""
        total = self.config.hosts
        last = (-1, -1)
        while True:
            now = (self.registrations, self.ready())
            if now != last:
                self.say(f"registered {now[0]}/{total}, heartbeating {now[1]}/{total} "
                         f"({time.monotonic() - started:.1f}s)")
                last = now
            if now[1] >= total:
                # Everything made so far lives as long as the process: keep the collector
                # from walking it again and again (full collections of ~10^6 objects cost
                # more than the heartbeats themselves).
                gc.collect()
                gc.freeze()
                self.say(f"all {total} hollow hosts Ready in {time.monotonic() - started:.1f}s;"
                         f" control: {self.config.dir / CONTROL}")
                return
            if any(t.done() for t in self.tasks.values()):
                failed = next(t for t in self.tasks.values() if t.done())
                failed.result()  # raises what stopped it
            await asyncio.sleep(1.0)

    async def close(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        self.tasks.clear()
        if self._control is not None:
            await self._control.cleanup()
        await asyncio.gather(*(s.close() for s in self.servers.values()),
                             return_exceptions=True)
        if self.store is not None:
            await self.store.close()

    # -- faults ----------------------------------------------------------------------------

    def _known(self, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in self.servers]
        if unknown:
            raise web.HTTPBadRequest(text=json.dumps({"message": f"unknown hosts: {unknown}"}),
                                     content_type="application/json")
        return names

    async def kill(self, names: list[str]) -> None:
        """Power loss of each host: agent gone (no more keepalives), engine dead."""
        tasks = [self.tasks.pop(n) for n in names if n in self.tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(self.servers[n].kill() for n in names))
        self.killed.update(names)

    def freeze(self, names: list[str]) -> None:
        for n in names:
            self.servers[n].freeze()

    async def heal(self, names: list[str]) -> None:
        for n in names:
            await self.servers[n].heal()
            if n not in self.tasks:
                self.start_agent(int(n[1:]) - 1, n)
            self.killed.discard(n)

    def stats(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        models = [s.model for s in self.servers.values()]
        return {
            "hosts": len(self.servers), "registered": self.registrations,
            "ready": self.ready(), "killed": sorted(self.killed),
            "frozen": sorted(n for n, s in self.servers.items() if s.frozen),
            "containers": sum(len(m.containers) for m in models),
            "running": sum(1 for m in models for c in m.containers.values()
                           if c.status == "running"),
            "requests": sum(s.requests for s in self.servers.values()),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "rss_mb": round(usage.ru_maxrss / 1024, 1), "pid": os.getpid(),
        }

    async def start_control(self) -> None:
        app = web.Application()

        async def hosts(request: web.Request) -> list[str]:
            body = await request.json() if request.can_read_body else {}
            return self._known([str(h) for h in body.get("hosts", [])])

        async def kill(request: web.Request) -> web.Response:
            names = await hosts(request)
            await self.kill(names)
            return web.json_response({"killed": names})

        async def freeze(request: web.Request) -> web.Response:
            names = await hosts(request)
            self.freeze(names)
            return web.json_response({"frozen": names})

        async def heal(request: web.Request) -> web.Response:
            names = await hosts(request)
            await self.heal(names)
            return web.json_response({"healed": names})

        async def stats(request: web.Request) -> web.Response:
            return web.json_response(self.stats())

        app.router.add_post("/kill", kill)
        app.router.add_post("/freeze", freeze)
        app.router.add_post("/heal", heal)
        app.router.add_get("/stats", stats)
        self._control = web.AppRunner(app, access_log=None)
        await self._control.setup()
        path = self.config.dir / CONTROL
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        await web.UnixSite(self._control, str(path)).start()


async def run_hollow(config: HollowConfig, say: Say | None = None) -> None:
    """Run hollow hosts until cancelled."""
    for name in ("sigmad.node.agent", "sigmad.events"):
        logging.getLogger(name).setLevel(logging.WARNING)  # 5,000 "registered" lines
    await HollowHosts(config, say).run()
