"""The binder on a real etcd: two schedulers racing never book capacity or a host port twice,
and a Pending instance is placed once a node that fits joins."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from sigmad.models import SSD_READY, Instance, Node, NodeLock, Overcommit, Owner, Ssd, SsdClaim
from sigmad.procs import EtcdProcess
from sigmad.reasons import State
from sigmad.scheduler.binder import BindResult, schedule
from sigmad.spec import (
    AppSpec,
    ContainerSpec,
    NetworkSpec,
    Placement,
    Port,
    Resources,
    ResourceSpec,
    VolumeSpec,
)
from sigmad.state.cache import Cache
from sigmad.state.writes import Writer, Writes
from sigmad.store import EtcdStore, Guard, Op, Store

MI = 2**20
PENDING, SCHEDULED = State.PENDING, State.SCHEDULED


def store(etcd: EtcdProcess, prefix: str) -> EtcdStore:
    return EtcdStore([etcd.endpoint], prefix)


class Scheduler:
    """One scheduler as a leader runs it: its own state cache and Writer on `store`."""

    def __init__(self, s: Store) -> None:
        self.store = s
        self.cache = Cache(s)
        self.writer = Writer(s, self.cache)
        self.tasks: list[asyncio.Task[Any]] = []

    async def __aenter__(self) -> Scheduler:
        self.tasks = [asyncio.create_task(self.cache.run()),
                      asyncio.create_task(self.writer.run())]
        await self.cache.synced.wait()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def place(self, apps: dict[str, AppSpec], rng: random.Random) -> BindResult:
        """One scheduling call over every instance, once the cache has seen etcd as it is."""
        await self.cache.wait_for(await self.store.ping())
        keys: Sequence[str] = list(self.cache.instances())
        return await schedule(self.cache, self.writer, Writes(self.store.keys), apps, keys, rng)


def app(name: str, cpu_m: int, memory: int, ports: int = 0,
        placement: Placement | None = None) -> AppSpec:
    return AppSpec(
        app=name, namespace="ns",
        containers=[ContainerSpec("main", "busybox", resources=ResourceSpec(
            request=Resources(cpu_m, memory), limit=Resources(4 * cpu_m, 4 * memory)))],
        network=NetworkSpec(ports=[Port(f"p{i}", 8000 + i) for i in range(ports)]),
        placement=placement or Placement(),
    )


async def add_node(s: Store, name: str, cpu_m: int, memory: int, zone: str,
                   ports: int = 10, overcommit: Overcommit | None = None) -> None:
    node = Node(name, "unix:///nowhere", labels={"zone": zone},
                capacity=Resources(cpu_m, memory), allocatable=Resources(cpu_m, memory),
                overcommit=overcommit or Overcommit(), port_range=[31000, 31000 + ports - 1])
    await s.put(s.keys.node(name), node)
    await s.put(s.keys.heartbeat(name), {"node": name})


async def add_instances(s: Store, spec: AppSpec, start: int, count: int) -> None:
    for index in range(start, start + count):
        inst = Instance(namespace=spec.namespace, app=spec.app, index=index, generation=1,
                        ip=f"10.244.1.{index}", request=spec.request())
        assert await s.create(s.keys.instance(spec.namespace, spec.app, index), inst)


async def check_no_double_booking(s: Store) -> list[Instance]:
    """Assert the invariants from what etcd holds; the Scheduled instances."""
    nodes = {v.value.name: v.value for v in (await s.scan(s.keys.nodes(), Node))[0]}
    instances = [v.value for v in (await s.scan(s.keys.instances(), Instance))[0]]
    owners = {v.key: v.value.owner for v in (await s.scan(s.keys.ports(), Owner))[0]}
    scheduled = [i for i in instances if i.state == SCHEDULED]
    for name, node in nodes.items():
        mine = [i for i in scheduled if i.node == name]
        assert sum(i.request.cpu_m for i in mine) <= node.allocatable.cpu_m * node.overcommit.cpu
        assert sum(i.request.memory for i in mine) <= (
            node.allocatable.memory * node.overcommit.memory
        )
        ports = [p for i in mine for p in i.host_ports.values()]
        assert len(ports) == len(set(ports)), f"a host port on {name} is given twice"
        lo, hi = node.port_range
        assert all(lo <= p <= hi for p in ports)
    for inst in scheduled:
        for port in inst.host_ports.values():
            assert owners.get(s.keys.port(inst.node, port)) == inst.key
    assert len(owners) == sum(len(i.host_ports) for i in scheduled), "stray port keys"
    for inst in instances:
        if inst.state == PENDING:
            assert not inst.node and not inst.host_ports
    return scheduled


async def test_two_racing_schedulers_never_double_book(etcd: EtcdProcess) -> None:
    prefix = f"/sigma-test/{uuid.uuid4().hex[:8]}"
    one, two = store(etcd, prefix), store(etcd, prefix)
    try:
        for i in range(4):
            await add_node(one, f"node-{i}", 2000, 2048 * MI, f"z{i % 2}",
                           overcommit=Overcommit(cpu=1.5))
        apps = {
            "ns/web": app("web", 250, 256 * MI, ports=1),
            "ns/api": app("api", 500, 128 * MI, ports=2, placement=Placement(spread="zone")),
            "ns/batch": app("batch", 100, 64 * MI, placement=Placement(strategy="binpack")),
            "ns/free": app("free", 0, 0),
        }
        results: list[BindResult] = []
        async with Scheduler(one) as a, Scheduler(two) as b:
            for round_ in range(4):
                for spec in apps.values():
                    await add_instances(one, spec, round_ * 8, 8)
                results += await asyncio.gather(a.place(apps, random.Random(round_)),
                                                b.place(apps, random.Random(100 + round_)))
                await check_no_double_booking(one)
        scheduled = await check_no_double_booking(one)
        # Every instance was committed by exactly one of the two schedulers.
        assert sum(r.placed for r in results) == len(scheduled)
        keys = [k for r in results for k in r.scheduled]
        assert len(keys) == len(set(keys)) == len(scheduled)
        # The pool is over-asked: it is full, and what is left says why.
        assert 0 < len(scheduled) < 4 * 8 * len(apps)
        assert Counter(i.app for i in scheduled)["free"] == 32  # best effort always fits
        left = [v.value for v in (await one.scan(one.keys.instances(), Instance))[0]
                if v.value.state == PENDING]
        assert left and all(i.reason and i.unschedulable for i in left)
        locks = (await one.scan(one.keys.node_locks(), NodeLock))[0]
        assert {v.key.rsplit("/", 1)[-1] for v in locks} == {f"node-{i}" for i in range(4)}
    finally:
        await one.close()
        await two.close()


class Interfering(EtcdStore):
    """A store whose first transaction is preceded by a whole call of a rival scheduler
    (whose placements this scheduler's cache has not seen yet): a race lost for certain."""

    def __init__(self, etcd: EtcdProcess, prefix: str, rival: Scheduler,
                 apps: dict[str, AppSpec]) -> None:
        super().__init__([etcd.endpoint], prefix)
        self.rival, self.apps, self.rival_result = rival, apps, BindResult()

    async def commit(self, guards: Sequence[Guard], ops: Sequence[Op]) -> int:
        if not self.rival_result.rounds:
            self.rival_result = await self.rival.place(self.apps, random.Random(9))
        return await super().commit(guards, ops)


async def test_a_lost_race_is_replanned_once_the_cache_caught_up(etcd: EtcdProcess) -> None:
    prefix = f"/sigma-test/{uuid.uuid4().hex[:8]}"
    rival_store = store(etcd, prefix)
    apps = {"ns/web": app("web", 500, 256 * MI, ports=1)}
    async with Scheduler(rival_store) as rival:
        s = Interfering(etcd, prefix, rival, apps)
        try:
            for i in range(3):
                await add_node(s, f"node-{i}", 2000, 2048 * MI, "z1")
            await add_instances(rival_store, apps["ns/web"], 0, 10)
            async with Scheduler(s) as me:
                mine = await me.place(apps, random.Random(1))
            theirs = s.rival_result
            assert theirs.placed == 10
            assert mine.conflicts >= 1 and mine.rounds == 1  # nothing wants a node any more
            assert mine.placed == 0 and mine.unplaced == 0
            assert len(await check_no_double_booking(s)) == 10
        finally:
            await s.close()
            await rival_store.close()


async def test_pending_is_placed_when_a_node_joins(etcd: EtcdProcess) -> None:
    prefix = f"/sigma-test/{uuid.uuid4().hex[:8]}"
    s = store(etcd, prefix)
    try:
        apps = {"ns/db": app("db", 1000, 512 * MI, ports=1)}
        await add_node(s, "small", 500, 4096 * MI, "z1")
        await add_instances(s, apps["ns/db"], 0, 2)
        # A big node whose agent has not sent a heartbeat is not Ready: never used.
        await s.put(s.keys.node("silent"), Node("silent", "unix:///nowhere",
                                                 allocatable=Resources(64000, 64 * 2**30)))
        async with Scheduler(s) as sched:
            first = await sched.place(apps, random.Random(1))
            assert (first.placed, first.unplaced) == (0, 2)
            reason = "1 node: insufficient cpu (need 1, best free 500m); 1 node: node not ready"
            assert first.pending == {"ns/db-0": reason, "ns/db-1": reason}
            for v in (await s.scan(s.keys.instances(), Instance))[0]:
                assert v.value.state == PENDING
                assert v.value.reason == reason
                assert v.value.unschedulable == {"insufficient cpu": 1, "node not ready": 1}

            again = await sched.place(apps, random.Random(2))
            assert again.pending == {}  # unchanged reasons are not rewritten

            await add_node(s, "big", 4000, 8192 * MI, "z2")
            joined = await sched.place(apps, random.Random(3))
            assert (joined.placed, joined.unplaced, joined.conflicts) == (2, 0, 0)
        for inst in await check_no_double_booking(s):
            assert inst.node == "big" and inst.reason == "" and inst.unschedulable == {}
            assert list(inst.host_ports) == ["p0"]
    finally:
        await s.close()


async def test_many_placements_on_one_node_commit_in_pieces(etcd: EtcdProcess) -> None:
    prefix = f"/sigma-test/{uuid.uuid4().hex[:8]}"
    s = store(etcd, prefix)
    try:
        apps = {"ns/tiny": app("tiny", 10, MI, ports=1)}
        await add_node(s, "only", 4000, 4096 * MI, "z1", ports=500)
        await add_instances(s, apps["ns/tiny"], 0, 150)  # 2 guards and 2 ops each: 3 pieces
        async with Scheduler(s) as sched:
            result = await sched.place(apps, random.Random(1))
        assert (result.placed, result.conflicts, result.rounds) == (150, 0, 1)
        assert len(await check_no_double_booking(s)) == 150
    finally:
        await s.close()


class LockThief(EtcdStore):
    """A store that lets another writer bump a node lock right after its first transaction,
    as a rival scheduler placing on that node would."""

    stolen = False

    async def commit(self, guards: Sequence[Guard], ops: Sequence[Op]) -> int:
        ok = await super().commit(guards, ops)
        if not self.stolen and any(o.key == self.keys.node_lock("only") for o in ops):
            self.stolen = True
            await self.put(self.keys.node_lock("only"), NodeLock("rival", "rival"))
        return ok


async def test_a_lock_taken_between_pieces_is_replanned(etcd: EtcdProcess) -> None:
    prefix = f"/sigma-test/{uuid.uuid4().hex[:8]}"
    s = LockThief([etcd.endpoint], prefix)
    try:
        apps = {"ns/tiny": app("tiny", 10, MI)}
        await add_node(s, "only", 4000, 4096 * MI, "z1")
        await add_instances(s, apps["ns/tiny"], 0, 150)  # 1 guard and 1 op each: two pieces
        async with Scheduler(s) as sched:
            result = await sched.place(apps, random.Random(1))
        assert s.stolen
        assert (result.placed, result.conflicts, result.rounds) == (150, 1, 2)
        assert len(await check_no_double_booking(s)) == 150
    finally:
        await s.close()


async def test_two_racing_schedulers_never_claim_one_disk_twice(etcd: EtcdProcess) -> None:
    """SSD volumes: 6 ready disks on 3 nodes, 8 instances wanting one each, two schedulers
    at once: 6 placed, each with a disk of its own whose claim names it; 2 say why not."""
    prefix = f"/sigma-test/{uuid.uuid4().hex[:8]}"
    one, two = store(etcd, prefix), store(etcd, prefix)
    try:
        spec = app("db", 100, 64 * MI)
        spec.volumes = [VolumeSpec("data", "/data", 1, 512 * MI)]
        for i in range(3):
            await add_node(one, f"node-{i}", 4000, 4096 * MI, "z1")
            for d in range(2):
                await one.put(one.keys.ssd(f"node-{i}", f"loop{d}"), Ssd(
                    f"node-{i}", f"loop{d}", f"/dev/loop{d}", 1024 * MI, state=SSD_READY,
                    mount=f"/m/loop{d}"))
        await add_instances(one, spec, 0, 8)
        async with Scheduler(one) as a, Scheduler(two) as b:
            await asyncio.gather(a.place({"ns/db": spec}, random.Random(1)),
                                 b.place({"ns/db": spec}, random.Random(2)))
        scheduled = await check_no_double_booking(one)
        claims = {v.key: v.value.owner for v in (await one.scan(one.keys.ssd_claims(),
                                                                SsdClaim))[0]}
        assert len(scheduled) == 6 and len(claims) == 6
        assert sorted(claims.values()) == sorted(i.key for i in scheduled)
        for inst in scheduled:
            (disk,) = inst.ssds
            assert claims[one.keys.ssd_claim(inst.node, disk.disk)] == inst.key
        left = [v.value for v in (await one.scan(one.keys.instances(), Instance))[0]
                if v.value.state == PENDING]
        assert len(left) == 2 and all("insufficient ssd" in i.reason for i in left)
    finally:
        await one.close()
        await two.close()
