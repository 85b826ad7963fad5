"""At most one live copy (DESIGN.md §6), on fakes: the leader moves an instance off a lost
node only once its copy there is fenced (stopped through the node's engine, or the node's
lease lapsed plus the grace; never while the node's agent is alive), and an agent that
cannot renew its lease stops its containers before the lease can lapse."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from sigmad.config import EtcdConfig, NodeConfig
from sigmad.control.controller import FENCE_TIMEOUT
from sigmad.engine import LABEL_CLUSTER, LABEL_INSTANCE
from sigmad.errors import Conflict, StoreUnavailable
from sigmad.models import Beat, Instance
from sigmad.node.agent import Agent
from sigmad.node.fence import margin
from sigmad.schema import VERSION, SchemaRecord
from tests.fakes.engine import FakeEngine
from tests.fakes.store import MemoryStore
from tests.unit.harness import GI, Leader, spec

KEY = "/t/instances/default/web/0"


def watch_creates(lead: Leader, node: str, other: str) -> list[tuple[int, float]]:
    """On every create on `node`'s engine: how many containers run on `other`'s then, and
    when (monotonic)."""
    engine = lead.engine(node)
    seen: list[tuple[int, float]] = []
    create = engine.create

    async def counted(name: str, config: dict[str, Any]) -> str:
        seen.append((len(lead.engine(other).running()), time.monotonic()))
        return await create(name, config)

    engine.create = counted  # type: ignore[method-assign]
    return seen


async def test_a_lost_node_whose_engine_answers_is_fenced_through_it_before_the_move() -> None:
    async with Leader() as lead:
        await lead.add_node("a")
        await lead.apply(spec(replicas=2))
        before = {i.name: i.ip for i in await lead.running("web", 2)}
        await lead.add_node("b")
        creates = watch_creates(lead, "b", "a")
        await lead.lose_node("a")  # its agent died; its engine still answers
        after = await lead.until(
            lambda: all(i.node == "b" and i.state == "Running" for i in lead.instances())
            and lead.instances(), what="both Running on b")
        assert {i.name: i.ip for i in after} == before
        assert [n for n, _ in creates] == [0, 0]  # a's copies stopped before any on b
        assert not lead.engine("a").running()
        assert all(t.reason == "KilledBySigma(fenced)" for i in after for t in i.terminations)


async def test_a_lost_node_whose_engine_hangs_moves_only_after_lapse_plus_grace() -> None:
    grace = FENCE_TIMEOUT + 1.0  # longer than one engine attempt
    async with Leader(fence_grace=grace) as lead:
        await lead.add_node("a")
        await lead.apply(spec(replicas=1))
        await lead.running("web", 1)
        await lead.add_node("b")
        creates = watch_creates(lead, "b", "a")
        lead.engine("a").hang()  # the host is gone: nothing answers there
        lapsed = time.monotonic()
        await lead.lose_node("a")
        waiting = await lead.until(lambda: [i for i in lead.instances()
                                            if "waiting for a fence" in i.reason],
                                   timeout=grace + 5, what="waiting for the fence")
        assert waiting[0].state == "NeedMigration" and waiting[0].node == "a"
        assert f"{grace:g}s after its node's heartbeat lease lapsed, its engine is asked" in \
            waiting[0].reason
        (inst,) = await lead.running("web", 1, timeout=grace + 10)
        assert inst.node == "b" and [t.reason for t in inst.terminations] == ["NodeLost"]
        await lead.until(lambda: f"fenced: the heartbeat lease of a lapsed {grace:g}s ago and "
                         "its engine does not answer" in lead.events(), what="the fence event")
        ((_, made),) = creates
        assert made - lapsed >= grace  # the new copy was made only after lapse + grace
        lead.engine("a").release()


async def test_an_agent_back_within_the_grace_finds_its_copies_untouched() -> None:
    """An agent restart (an upgrade) that lets the node's lease lapse: its engine still
    answers, but it is not asked to stop anything before the grace has passed; the agent is
    back first, and the instance resumes with the same container."""
    async with Leader(fence_grace=2.0) as lead:
        await lead.add_node("a")
        await lead.apply(spec(replicas=1))
        (before,) = await lead.running("web", 1)
        await lead.add_node("b")
        await lead.lose_node("a")
        await lead.until(lambda: [i for i in lead.instances() if "waiting for a fence" in
                                  i.reason], what="waiting for the fence")
        lead.leases["a"] = await lead.store.grant(5)
        await lead.beat("a")  # the new agent's heartbeat
        (after,) = await lead.running("web", 1)
        assert after.node == "a" and after.containers[0].id == before.containers[0].id
        await asyncio.sleep(2.5)  # past the grace: still nothing stopped
        assert [c.status for c in lead.engine("a").by_id.values()] == ["running"]
        assert not [e for e in lead.events() if e.startswith("fenced")]


async def test_a_dead_engine_is_not_waited_for_once_per_instance() -> None:
    async with Leader(workers=1, fence_grace=0.2) as lead:
        await lead.add_node("a", cpu_m=8000)
        await lead.apply(spec(replicas=6))
        await lead.running("web", 6)
        await lead.add_node("b", cpu_m=8000)
        lead.engine("a").hang()
        calls = len(lead.engine("a").calls)
        await lead.lose_node("a")
        await lead.until(lambda: all(i.node == "b" and i.state == "Running"
                                     for i in lead.instances()), timeout=15,
                         what="all six Running on b")
        asked = [c for c in lead.engine("a").calls[calls:] if c[0] == "containers"]
        assert 1 <= len(asked) < 6  # not FENCE_TIMEOUT for each of the six in turn
        lead.engine("a").release()


async def test_an_alive_agent_whose_engine_hangs_keeps_its_instances() -> None:
    async with Leader(fence_grace=0.1) as lead:
        await lead.add_node("a")
        await lead.apply(spec(replicas=1))
        (inst,) = await lead.running("web", 1)
        await lead.add_node("b")
        lead.engine("a").hang()
        await lead.beat("a", engine=False)  # NotReady, but its agent holds its lease
        (waiting,) = await lead.until(lambda: [i for i in lead.instances()
                                               if "agent is alive" in i.reason],
                                      what="waiting for a fence")
        assert waiting.state == "NeedMigration" and waiting.node == "a"
        await asyncio.sleep(1.0)  # ten graces: still no copy anywhere else
        (still,) = lead.instances()
        assert still.node == "a" and still.state == "NeedMigration"
        assert not [c for c in lead.engine("b").calls if c[0] == "create"]
        lead.engine("a").release()
        await lead.beat("a", engine=True)  # its engine answers again: it resumes there
        (back,) = await lead.running("web", 1)
        assert back.node == "a" and back.containers[0].id == inst.containers[0].id


async def test_manual_migrate_is_refused_until_the_copy_is_fenced() -> None:
    async with Leader(fence_grace=1.0) as lead:
        await lead.add_node("a")
        await lead.apply(spec(replicas=1, migration="manual"))
        await lead.running("web", 1)
        await lead.add_node("b")
        lead.engine("a").down = True  # unreachable: only the lapse and the grace fence
        await lead.lose_node("a")
        await lead.until(lambda: "waiting for a fence" in lead.instances()[0].reason,
                         what="waiting for the fence")
        v = lead.cache.instance(KEY)
        assert v is not None
        with pytest.raises(Conflict, match="not fenced yet"):
            await lead.api.migrate(v, "b")
        fenced = await lead.until(lambda: lead.cache.instance(KEY) if
                                  lead.instances()[0].fence else None, what="the fence")
        assert lead.instances()[0].state == "NeedMigration"  # manual: it waits
        moved = await lead.api.migrate(fenced, "b")
        assert moved.state == "Pending"
        (inst,) = await lead.running("web", 1)
        assert inst.node == "b"


# -- the agent's self-fence ---------------------------------------------------------------------


class Partition(MemoryStore):
    """An etcd this agent cannot reach while `cut`: calls hang (`hang`) or fail."""

    def __init__(self, hang: bool) -> None:
        super().__init__("/t")
        self.hang = hang
        self.cut = False
        self.healed = asyncio.Event()

    async def _cut(self) -> None:
        if self.cut:
            if not self.hang:
                raise StoreUnavailable("etcd is unreachable (partition)")
            await self.healed.wait()

    async def keepalive(self, lease_id: int) -> bool:
        await self._cut()
        return await super().keepalive(lease_id)

    async def grant(self, ttl: int) -> int:
        await self._cut()
        return await super().grant(ttl)


async def run_containers(engine: FakeEngine, *owners: str) -> list[str]:
    ids = []
    for owner in owners:
        cid = await engine.create(owner.replace("/", "-"), {"Image": "img", "Labels": {
            LABEL_INSTANCE: owner, LABEL_CLUSTER: "/t", "sigma.container": "main"}})
        await engine.start(cid)
        ids.append(cid)
    return ids


async def beat_of(store: MemoryStore, node: str) -> Beat | None:
    v = await store.get(store.keys.heartbeat(node), Beat)
    return v.value if v else None


@pytest.mark.parametrize("hang", [True, False], ids=["etcd-hangs", "etcd-refuses"])
async def test_an_agent_that_cannot_renew_stops_its_containers_before_the_ttl(
        hang: bool) -> None:
    store = Partition(hang)
    ttl = 2
    agent = Agent(NodeConfig(name="h1", engine="fake://h1", heartbeat_ttl=ttl,
                             etcd=EtcdConfig(prefix="/t")), store, overlay=False)
    engine = agent.engine = FakeEngine("fake://h1", "/t")  # type: ignore[assignment]
    a, b = await run_containers(engine, "default/web-0", "default/web-1")
    mine = Instance("default", "web", 0, 1, node="h1")
    elsewhere = Instance("default", "web", 1, 1, node="h2")  # its copy here is stale
    await store.put(store.keys.schema(), SchemaRecord(VERSION))  # the cluster's records
    await store.put(store.keys.instance("default", "web", 0), mine)
    await store.put(store.keys.instance("default", "web", 1), elsewhere)
    beating = asyncio.create_task(agent.heartbeat())
    try:
        deadline = time.monotonic() + 10
        while await beat_of(store, "h1") is None:
            assert time.monotonic() < deadline, "no heartbeat"
            await asyncio.sleep(0.01)
        assert b not in engine.by_id  # web-1 is placed on h2: removed before Ready
        store.cut = True
        while not agent.fence.done_at:
            assert time.monotonic() < deadline + 10, "the agent never fenced"
            await asyncio.sleep(0.01)
        fence = agent.fence
        assert fence.renewed_at is not None
        assert fence.fired_at >= fence.renewed_at + ttl - margin(ttl)  # not before it must
        assert fence.done_at < fence.renewed_at + ttl  # done before the lease can lapse
        assert not engine.running() and fence.stopped == [a]
        lease = agent.lease
        await store.expire(lease)  # as etcd does at the TTL
        await store.put(store.keys.instance("default", "web", 0),
                        Instance("default", "web", 0, 1, node="h2"))  # moved meanwhile
        store.cut = False
        store.healed.set()
        while (beat := await beat_of(store, "h1")) is None or agent.lease == lease:
            assert time.monotonic() < deadline + 20, "the agent never rejoined"
            await asyncio.sleep(0.01)
        assert beat.engine and agent.said is True
        assert not engine.by_id  # the stale copy was removed before it said Ready again
    finally:
        beating.cancel()
        await asyncio.gather(beating, return_exceptions=True)


async def test_an_agent_whose_renewals_succeed_never_fences() -> None:
    store = MemoryStore("/t")
    agent = Agent(NodeConfig(name="h1", engine="fake://h1", heartbeat_ttl=2,
                             etcd=EtcdConfig(prefix="/t")), store, overlay=False)
    engine = agent.engine = FakeEngine("fake://h1", "/t")  # type: ignore[assignment]
    await store.put(store.keys.instance("default", "web", 0),
                    Instance("default", "web", 0, 1, node="h1"))
    (cid,) = await run_containers(engine, "default/web-0")
    beating = asyncio.create_task(agent.heartbeat())
    try:
        await asyncio.sleep(3)  # one and a half TTLs of renewals (it would fire at 1.5 s)
        assert engine.by_id[cid].status == "running" and not agent.fence.fired_at
    finally:
        beating.cancel()
        await asyncio.gather(beating, return_exceptions=True)



@pytest.mark.parametrize("state", ["no-schema", "restoring"])
async def test_an_agent_removes_nothing_while_the_clusters_records_are_absent(
        state: str) -> None:
    """A fresh or lost etcd (no schema key) or a restore under way: every container would
    look stale, so none is removed; once the records are there, the stale one goes."""
    store = MemoryStore("/t")
    agent = Agent(NodeConfig(name="h1", engine="fake://h1", heartbeat_ttl=2,
                             etcd=EtcdConfig(prefix="/t")), store, overlay=False)
    engine = agent.engine = FakeEngine("fake://h1", "/t")  # type: ignore[assignment]
    a, b = await run_containers(engine, "default/web-0", "default/web-1")
    await store.put(store.keys.instance("default", "web", 0),
                    Instance("default", "web", 0, 1, node="h1"))
    if state == "restoring":
        await store.put(store.keys.schema(), SchemaRecord(VERSION))
        await store.put(store.keys.restoring(), {"revision": 5})
    await agent.remove_stale()
    assert set(engine.by_id) == {a, b}
    await store.delete(store.keys.restoring())
    await store.put(store.keys.schema(), SchemaRecord(VERSION))
    await agent.remove_stale()
    assert set(engine.by_id) == {a}  # web-1 has no record placing it here


async def test_rejoining_reads_only_the_records_of_its_own_containers() -> None:
    """A mass lease lapse makes every agent rejoin at once: each reads the records of its
    own containers by key, never every instance of the cluster (a thousand agents each
    reading 20,000 records buried etcd)."""
    store = MemoryStore("/t")
    await store.put(store.keys.schema(), SchemaRecord(VERSION))
    agent = Agent(NodeConfig(name="h1", engine="fake://h1", heartbeat_ttl=2,
                             etcd=EtcdConfig(prefix="/t")), store, overlay=False)
    engine = agent.engine = FakeEngine("fake://h1", "/t")  # type: ignore[assignment]
    for i in range(500):  # the rest of the cluster
        await store.put(store.keys.instance("default", "other", i),
                        Instance("default", "other", i, 1, node="h2"))
    await store.put(store.keys.instance("default", "web", 0),
                    Instance("default", "web", 0, 1, node="h1"))
    await store.put(store.keys.instance("default", "web", 1),
                    Instance("default", "web", 1, 1, node="h2"))  # moved away
    a, *_ = await run_containers(engine, "default/web-0", "default/web-1", "default/gone-3")
    await agent.remove_stale()
    assert set(engine.by_id) == {a}  # web-1 placed elsewhere, gone-3 has no record
    assert store.items_read == 0  # no range read: three gets


class SlowRejoin(Agent):
    """An agent whose making-safe-to-rejoin takes as long as the test says."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.may_finish = asyncio.Event()

    async def before_ready(self) -> None:
        await self.may_finish.wait()
        await super().before_ready()


async def test_renewals_go_on_while_the_agent_makes_its_host_safe_to_rejoin() -> None:
    """A rejoin slower than the TTL (a thousand agents rejoining at once, or one slow
    engine) must not starve the renewals: the new lease is kept, the self-fence never fires,
    and Ready is said once the host is safe (no later than the next tick)."""
    store = MemoryStore("/t")
    await store.put(store.keys.schema(), SchemaRecord(VERSION))
    ttl = 2
    agent = SlowRejoin(NodeConfig(name="h1", engine="fake://h1", heartbeat_ttl=ttl,
                                  etcd=EtcdConfig(prefix="/t")), store, overlay=False)
    engine = agent.engine = FakeEngine("fake://h1", "/t")  # type: ignore[assignment]
    await store.put(store.keys.instance("default", "web", 0),
                    Instance("default", "web", 0, 1, node="h1"))
    (cid,) = await run_containers(engine, "default/web-0")
    renewals = 0
    keepalive = store.keepalive

    async def counted(lease: int) -> bool:
        nonlocal renewals
        renewals += 1
        return await keepalive(lease)

    store.keepalive = counted  # type: ignore[method-assign]
    beating = asyncio.create_task(agent.heartbeat())
    try:
        await asyncio.sleep(ttl * 1.5)  # past the self-fence's moment (ttl - margin)
        assert renewals >= 3 and not agent.fence.fired_at
        assert await beat_of(store, "h1") is None  # not Ready while not safe
        agent.may_finish.set()
        released = time.monotonic()
        while (beat := await beat_of(store, "h1")) is None:
            assert time.monotonic() - released < ttl / 3, "Ready waited for the next tick"
            await asyncio.sleep(0.01)
        assert beat.engine and engine.by_id[cid].status == "running"
    finally:
        beating.cancel()
        await asyncio.gather(beating, return_exceptions=True)


class CountingEngine(FakeEngine):
    """A fake engine counting the fence calls (a list of one instance's containers) in
    flight over every engine of the class."""

    live = 0
    peak = 0

    async def containers(self, labels: dict[str, str] | None = None) -> Any:
        fence = bool((labels or {}).get(LABEL_INSTANCE))
        if fence:
            CountingEngine.live += 1
            CountingEngine.peak = max(CountingEngine.peak, CountingEngine.live)
        try:
            return await super().containers(labels)
        finally:
            if fence:
                CountingEngine.live -= 1


async def test_a_mass_lease_lapse_fences_through_a_bounded_number_of_calls() -> None:
    """Every node lost at once, their engines answering but slowly (a host coming back
    under load): never more than the bound of fence calls in flight over all engines, and
    every instance is fenced through its engine and Running elsewhere."""
    async with Leader(workers=32, fence_grace=0.1) as lead:
        lead.controller.fence_slots = asyncio.Semaphore(3)
        names = [f"n{i}" for i in range(8)]
        for name in names:
            lead.engines[f"fake://{name}"] = CountingEngine(f"fake://{name}", "/t")
            await lead.add_node(name)
        await lead.apply(spec(replicas=16))
        await lead.running("web", 16)
        await lead.add_node("spare", cpu_m=64000, memory=64 * GI, ports=100)
        for name in names:
            lead.engine(name).slow = 0.2
        CountingEngine.peak = 0
        for name in names:
            await lead.lose_node(name)
        after = await lead.until(
            lambda: len(lead.instances()) == 16 and all(
                i.node == "spare" and i.state == "Running" for i in lead.instances())
            and lead.instances(), timeout=30, what="all 16 Running on spare")
        assert all(t.reason == "KilledBySigma(fenced)" for i in after for t in i.terminations)
        assert 1 <= CountingEngine.peak <= 3
