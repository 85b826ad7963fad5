"""The controller on fakes (tests/unit/harness.py): instances created, placed, started,
restarted, resized, retired and moved, with the engine calls and etcd writes it takes."""

from __future__ import annotations

import asyncio

from sigmad.engine import UNCAPPED_MEMORY
from sigmad.models import AppRecord, Instance
from sigmad.spec import Resources
from sigmad.state.cache import IPS, PORTS
from sigmad.store import Guard
from tests.unit.harness import GI, Leader, spec


async def test_apply_runs_every_replica_with_two_engine_calls_each() -> None:
    async with Leader() as lead:
        await lead.add_node("a")
        await lead.apply(spec(replicas=3))
        found = await lead.running("web", 3)
        engine = lead.engine("a")
        assert len(engine.running()) == 3
        assert {i.ip for i in found} == {k.rsplit("/", 1)[-1] for k in lead.cache.table(IPS)}
        assert all(i.containers[0].id in engine.by_id for i in found)
        assert all(i.containers[0].limit == Resources(500, 128 << 20) for i in found)
        per_instance = [name for name, _ in engine.calls
                        if name not in ("events", "containers", "ensure_image")]
        assert sorted(per_instance) == ["create"] * 3 + ["start"] * 3  # no list, no inspect


async def test_scale_down_and_delete_stop_containers_and_release_claims() -> None:
    async with Leader() as lead:
        await lead.add_node("a")
        await lead.apply(spec(replicas=3, network="{ports: [{name: http, container: 80}]}"))
        await lead.running("web", 3)
        assert len(lead.cache.table(PORTS)) == 3
        await lead.apply(spec(replicas=1, network="{ports: [{name: http, container: 80}]}"))
        await lead.running("web", 1)
        assert [i.name for i in lead.instances("web")] == ["web-0"]
        assert len(lead.engine("a").by_id) == 1
        await lead.api.delete("default", "web")
        await lead.until(lambda: not lead.instances(), what="every instance gone")
        assert not lead.engine("a").by_id
        assert not lead.cache.table(IPS) and not lead.cache.table(PORTS)


async def test_an_ended_container_is_restarted_with_its_reason() -> None:
    async with Leader() as lead:
        await lead.add_node("a")
        await lead.apply(spec(replicas=1))
        (inst,) = await lead.running("web", 1)
        lead.engine("a").exit(inst.containers[0].id, 3)

        def restarted() -> Instance | None:
            (i,) = lead.instances("web")
            return i if i.restarts == 1 and i.state == "Running" else None

        after = await lead.until(restarted, timeout=5, what="a restart")
        assert [t.reason for t in after.terminations] == ["Exited(3)"]
        assert after.containers[0].id != inst.containers[0].id


async def test_oom_and_signals_are_told_apart() -> None:
    async with Leader() as lead:
        await lead.add_node("a")
        await lead.apply(spec(app="oom", replicas=1, restart="never"))
        await lead.apply(spec(app="sig", replicas=1, restart="never"))
        (oom,) = await lead.running("oom", 1)
        (sig,) = await lead.running("sig", 1)
        lead.engine("a").exit(oom.containers[0].id, 137, oom=True)
        lead.engine("a").exit(sig.containers[0].id, 137)
        await lead.until(lambda: [i.reason for i in lead.instances()] ==
                         ["OOMKilled", "Signaled(SIGKILL)"], what="both ended")
        assert [i.state for i in lead.instances()] == ["Failed", "Failed"]


async def test_caps_are_desired_state_none_then_a_cap_then_none_again() -> None:
    async with Leader() as lead:
        await lead.add_node("a", cpu_m=4000)
        await lead.apply(spec(replicas=1).replace("limit: {cpu: 500m, memory: 128Mi}",
                                                  "limit: {cpu: 0, memory: 0}"))
        (inst,) = await lead.running("web", 1)
        cid = inst.containers[0].id
        c = lead.engine("a").by_id[cid]
        assert c.caps == {}
        (r,) = await lead.apply(spec(replicas=1).replace("128Mi", "256Mi"))
        assert r.action == "resized in place"
        await lead.until(lambda: c.caps.get("Memory") == 256 << 20, what="the cap set")
        assert c.caps["NanoCpus"] == 500_000_000 and c.caps["MemorySwap"] == 256 << 20
        await lead.apply(spec(replicas=1).replace("limit: {cpu: 500m, memory: 128Mi}",
                                                  "limit: {cpu: 0, memory: 0}"))
        await lead.until(lambda: c.caps.get("Memory") == UNCAPPED_MEMORY, what="the cap lifted")
        assert c.caps["NanoCpus"] == 4_000_000_000  # all of the host's cpus
        (after,) = await lead.until(lambda: [i for i in lead.instances("web")
                                             if i.containers[0].limit == Resources()],
                                    what="the record saying so")
        assert after.containers[0].id == cid


async def test_a_grown_request_is_booked_before_containers_are_replaced() -> None:
    async with Leader() as lead:
        await lead.add_node("a", cpu_m=700)
        await lead.apply(spec(replicas=2))
        await lead.running("web", 2)
        big = spec(replicas=2).replace("cpu: 100m", "cpu: 400m").replace("image: img",
                                                                          "image: img\n"
                                                                          "    env: {V: '2'}")
        await lead.apply(big)
        (one,) = await lead.until(
            lambda: [i for i in lead.instances() if i.reason.startswith("update waits")],
            what="an update that waits")
        assert "insufficient cpu" in one.reason and one.state == "Running"
        replaced = await lead.until(
            lambda: [i for i in lead.instances() if i.generation == 2 and i.state == "Running"],
            what="one instance replaced")
        assert replaced[0].request == Resources(400, 64 << 20)


async def test_a_lost_node_moves_its_instances_keeping_their_ips() -> None:
    async with Leader() as lead:
        await lead.add_node("a")
        await lead.apply(spec(replicas=2))
        before = {i.name: i.ip for i in await lead.running("web", 2)}
        await lead.add_node("b")
        await lead.lose_node("a")
        after = await lead.until(
            lambda: all(i.node == "b" and i.state == "Running" for i in lead.instances())
            and lead.instances(), what="both Running on b")
        assert {i.name: i.ip for i in after} == before
        assert all(t.reason == "KilledBySigma(fenced)" for i in after for t in i.terminations)


async def test_a_step_hung_on_a_lost_nodes_engine_is_abandoned() -> None:
    async with Leader() as lead:
        await lead.add_node("a")
        await lead.until(lambda: lead.controller.watches.get("a") and
                         lead.controller.watches["a"].synced.is_set(), what="a's engine listed")
        lead.engine("a").hang()
        await lead.apply(spec(replicas=1))
        await lead.until(lambda: any(c[0] == "ensure_image" for c in lead.engine("a").calls),
                         what="a step stuck on a")
        await lead.add_node("b")
        await lead.lose_node("a")
        (inst,) = await lead.running("web", 1)
        assert inst.node == "b"


async def test_a_drained_node_moves_live_one_at_a_time() -> None:
    async with Leader() as lead:
        await lead.add_node("a")
        await lead.apply(spec(replicas=2))
        before = {i.name: (i.ip, i.containers[0].id) for i in await lead.running("web", 2)}
        await lead.add_node("b")
        await lead.api.set_draining("a", True)
        after = await lead.until(
            lambda: all(i.node == "b" and i.state == "Running" and not i.move
                        for i in lead.instances()) and lead.instances(), timeout=10,
            what="both moved to b")
        assert {i.name: i.ip for i in after} == {n: ip for n, (ip, _) in before.items()}
        await lead.until(lambda: not lead.engine("a").by_id, timeout=5,
                         what="the old copies stopped")
        assert all(t.reason == "KilledBySigma(migrated)" for i in after for t in i.terminations)


async def test_depends_on_holds_until_every_replica_runs() -> None:
    async with Leader() as lead:
        await lead.add_node("a")
        lead.engine("a").probe["main"] = 10**6  # db never ready
        await lead.apply(spec(app="db", replicas=1).replace(
            "image: img", "image: img\n    ready: {tcp: 5432}"))
        await lead.apply(spec(app="api", replicas=1, depends_on="[db]"))
        (api,) = await lead.until(lambda: [i for i in lead.instances("api")
                                           if i.reason.startswith("waiting for depends_on")],
                                  what="api held")
        assert api.reason == "waiting for depends_on: db (0/1 running)" and not api.containers
        lead.engine("a").probe["main"] = 0
        await lead.running("api", 1)


async def test_a_conflicting_writer_is_outlived() -> None:
    async with Leader() as lead:
        await lead.add_node("a")
        lead.engine("a").slow = 0.05
        await lead.apply(spec(replicas=1))
        v = await lead.until(lambda: lead.cache.instance("/t/instances/default/web/0"))
        rec = v.value.copy()
        rec.reason = "touched by someone else"
        await lead.store.put(v.key, rec)  # every guard on the old revision now fails
        (inst,) = await lead.running("web", 1)
        assert inst.state == "Running"


async def test_a_deposed_leader_writes_nothing_and_says_so() -> None:
    async with Leader() as lead:
        await lead.add_node("a")
        await lead.apply(spec(replicas=1))
        await lead.running("web", 1)
        deposed = asyncio.Event()
        lead.store.fence = Guard("/t/leader", 99)  # the leader key is not as this one won it
        lead.store.on_deposed = deposed.set
        web = lead.store.value("/t/apps/default/web", AppRecord)
        lead.store.fence = None
        await lead.store.put("/t/apps/default/other", web)  # written by the API of a master
        lead.store.fence = Guard("/t/leader", 99)
        await asyncio.wait_for(deposed.wait(), 5)
        await asyncio.sleep(0.2)
        assert not lead.instances("other")  # nothing of it was written
        assert all(c.labels["sigma.app"] == "web" for c in lead.engine("a").by_id.values())


async def test_many_instances_over_many_nodes_in_one_burst() -> None:
    async with Leader(workers=16) as lead:
        for n in range(20):
            await lead.add_node(f"n{n}", cpu_m=2000, memory=4 * GI)
        for a in range(5):
            await lead.apply(spec(app=f"app{a}", replicas=40))
        await lead.until(lambda: len(lead.instances()) == 200 and
                         all(i.state == "Running" for i in lead.instances()),
                         timeout=30, what="200 Running")
        per_node = {n: len(lead.engine(f"n{n}").running()) for n in range(20)}
        assert sum(per_node.values()) == 200 and max(per_node.values()) <= 20  # 2000m/100m
        assert lead.controller.writer.transactions < 200 * 2  # packed, not one per write


async def test_a_new_leader_places_what_its_predecessor_left_pending() -> None:
    async with Leader() as lead:
        await lead.apply(spec(replicas=3))  # no node yet: they wait Pending
        await lead.until(lambda: len(lead.instances()) == 3 and
                         all(i.ip for i in lead.instances()), what="three with IPs")
    after = Leader()
    after.store = lead.store  # the same cluster, a new leader (a fresh cache and controller)
    after.cache = type(lead.cache)(lead.store)
    after.controller = type(lead.controller)(lead.store, after.cache, after.config, after.pool)
    after.api = type(lead.api)(lead.store, after.cache, after.pool)
    async with after:
        await after.add_node("a")
        await after.running("web", 3)


async def test_a_taken_name_is_freed_only_from_a_copy_of_the_same_instance() -> None:
    """A 409 on create removes the container holding the name only if it is labelled with
    this very instance (a leftover copy); this cluster's container of another instance stays."""
    from tests.fakes.engine import FakeContainer

    async with Leader() as lead:
        await lead.add_node("a")
        await lead.apply(spec(app="db", replicas=1))
        await lead.running("db", 1)
        engine = lead.engine("a")
        # db-0's name-twin: a container of this cluster, of instance db-0, holding the name
        # web-0 will want (planted behind the engine watch's back).
        other = FakeContainer("f" * 64, "sigma-default_web-0_main", {"Image": "img", "Labels": {
            "sigma.instance": "default/db-0", "sigma.cluster": "/t",
            "sigma.container": "main"}}, status="running")
        engine.by_id[other.id] = other
        await lead.apply(spec(replicas=1))
        (inst,) = await lead.until(lambda: [i for i in lead.instances("web")
                                            if i.state == "FailedToStart"], what="refused")
        assert "is taken by a container that is not a copy of default/web-0" in inst.reason
        assert engine.by_id.get(other.id) is other and other.status == "running"
        # A leftover copy of web-0 itself is replaced.
        del engine.by_id[other.id]
        leftover = FakeContainer("e" * 64, "sigma-default_web-0_main", {"Image": "img",
                                 "Labels": {"sigma.instance": "default/web-0",
                                            "sigma.cluster": "/t", "sigma.container": "main"}})
        engine.by_id[leftover.id] = leftover
        await lead.until(lambda: [i for i in lead.instances("web") if i.state == "Running"],
                         timeout=10, what="web-0 running after its backoff")
        assert leftover.id not in engine.by_id


async def test_a_resize_of_many_instances_on_one_node_is_applied_whole() -> None:
    """150 instances on one node: the new requests are booked in pieces that each fit one
    transaction (etcd's 128 ops), every container gets its new caps, and etcd agrees."""
    async with Leader(workers=16) as lead:
        await lead.add_node("a", cpu_m=64_000, memory=64 * GI)
        await lead.apply(spec(replicas=150))
        await lead.running("web", 150, timeout=30)
        bigger = spec(replicas=150).replace("cpu: 100m", "cpu: 200m").replace("128Mi", "256Mi")
        (r,) = await lead.apply(bigger)
        assert r.action == "resized in place" and r.containers == 150
        engine = lead.engine("a")
        await lead.until(lambda: all(c.caps.get("Memory") == 256 << 20
                                     for c in engine.running()), timeout=30, what="the caps")
        await lead.until(lambda: all(i.request == Resources(200, 64 << 20)
                                     and i.containers[0].limit == Resources(500, 256 << 20)
                                     for i in lead.instances("web")), timeout=30,
                         what="every record booked and saying so")
        assert len(engine.running()) == 150
        assert all(i.state == "Running" for i in lead.instances("web"))
