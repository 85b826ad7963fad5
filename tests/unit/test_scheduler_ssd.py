"""SSDs as a schedulable resource: the fit, the filter's reason, the claims committed with the
placement, racing schedulers, the release on delete and the container's mount."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace

import pytest

from sigmad.api import views
from sigmad.control import migration
from sigmad.engine import container_config
from sigmad.errors import Conflict, NotFound, SpecError
from sigmad.models import (
    SSD_BOUND,
    SSD_READY,
    SSD_RETAINED,
    BoundSsd,
    Instance,
    Node,
    Ssd,
    SsdClaim,
)
from sigmad.scheduler import NodeInfo, Request, Snapshot, binder
from sigmad.scheduler import place as place_decision
from sigmad.scheduler.fit import match_ssds
from sigmad.scheduler.snapshot import FreeSsd, free_ssds
from sigmad.spec import Resources, parse
from sigmad.state.cache import SSD_CLAIMS, SSDS, Cache
from sigmad.state.writes import Writer, Writes
from sigmad.store import Versioned
from tests.fakes.store import MemoryStore
from tests.unit.harness import Leader, spec

GI = 2**30
SPEC = parse("""
app: db
containers: [{name: main, image: x, resources: {request: {cpu: 100m, memory: 64Mi}}}]
volumes: [{name: data, ssd: 1, min_size: 10Gi, mount: /data}]
""")[0]


def disk(name: str, size: int, rev: int = 7) -> FreeSsd:
    return FreeSsd(name, size, rev, f"/var/lib/sigma/ssds/{name}/data")


def info(name: str, *disks: FreeSsd) -> NodeInfo:
    return NodeInfo(name, {}, Resources(4000, 8 * GI),
                    ssds=sorted(disks, key=lambda d: (d.size, d.id)))


def request(key: str, *sizes: int) -> Request:
    return Request(key, "default/db", Resources(100, 64 << 20), ssds=sizes)


def test_match_serves_the_largest_need_with_the_smallest_disk_that_holds_it() -> None:
    assert match_ssds([10, 20], [15]) == [1]
    assert match_ssds([10, 20, 30], [5, 25]) == [0, 2]
    assert match_ssds([20, 10], [10, 15]) == [1, 0]  # greedy by need order would fail
    assert match_ssds([10, 20], [15, 15]) is None
    assert match_ssds([], [1]) is None


def test_each_instance_gets_its_own_disk_and_the_rest_say_why() -> None:
    snap = Snapshot(1, {"a": info("a", disk("d1", 20 * GI), disk("d2", 10 * GI),
                                  disk("d3", 5 * GI))})
    decision = place_decision(snap, [request(f"i{n}", 10 * GI) for n in range(3)])
    got = sorted(d.id for b in decision.placed.values() for d in b.ssds)
    assert got == ["d1", "d2"]  # the 5 GiB disk is too small; no disk is given twice
    assert decision.placed["i0"].ssds[0].id == "d2"  # the smallest that holds it first
    assert decision.unplaced["i2"].reason == \
        "1 node: insufficient ssd (need 1 \u2265 10Gi, best free 0)"
    assert decision.unplaced["i2"].counts == {"insufficient ssd": 1}


def test_a_node_without_free_disks_is_filtered_out() -> None:
    snap = Snapshot(1, {"a": info("a"), "b": info("b", disk("x", 10 * GI))})
    decision = place_decision(snap, [request("i0", 10 * GI)])
    assert decision.placed["i0"].node == "b"
    none = place_decision(Snapshot(1, {"a": info("a")}), [request("i0", GI)])
    assert none.unplaced["i0"].reason == "1 node: insufficient ssd (need 1 \u2265 1Gi, best free 0)"
    plain = place_decision(Snapshot(1, {"a": info("a")}), [request("i0")])
    assert plain.placed["i0"].ssds == []  # an app without volumes needs no disk


def test_only_ready_unclaimed_disks_are_free() -> None:
    def rec(node: str, name: str, state: str, rev: int) -> Versioned[Ssd]:
        return Versioned(f"/k/{node}/{name}", Ssd(node, name, f"/dev/{name}", 10 * GI,
                                                  state=state, mount=f"/m/{name}"), rev)

    disks = [rec("a", "l1", SSD_READY, 3), rec("a", "l2", SSD_BOUND, 4),
             rec("a", "l3", "formatting", 5), rec("b", "l1", SSD_READY, 6),
             rec("a", "l4", SSD_READY, 8)]
    free = free_ssds(disks, claimed={("a", "l4")})
    assert free == {"a": [FreeSsd("l1", 10 * GI, 3, "/m/l1/data")],
                    "b": [FreeSsd("l1", 10 * GI, 6, "/m/l1/data")]}


async def cluster(store: MemoryStore, nodes: dict[str, int]) -> list[str]:
    """Nodes with `n` ready 10 GiB disks each, and one Pending db instance per disk + 1."""
    total = 0
    for name, n in nodes.items():
        await store.put(store.keys.node(name), Node(name, "unix:///x",
                                                    allocatable=Resources(4000, 8 * GI)))
        await store.put(store.keys.heartbeat(name), {"node": name}, lease=await store.grant(5))
        for d in range(n):
            await store.put(store.keys.ssd(name, f"loop{d}"), Ssd(
                name, f"loop{d}", f"/dev/loop{d}", 10 * GI, state=SSD_READY,
                mount=f"/var/lib/sigma/ssds/loop{d}"))
        total += n
    keys = []
    for i in range(total + 1):
        key = store.keys.instance("default", "db", i)
        await store.put(key, Instance("default", "db", i, 1, ip=f"10.244.0.{i + 2}",
                                      request=SPEC.request()))
        keys.append(key)
    return keys


async def schedule(store: MemoryStore, keys: list[str], seed: int) -> binder.BindResult:
    cache = Cache(store)
    writer = Writer(store, cache)
    tasks = [asyncio.create_task(cache.run()), asyncio.create_task(writer.run())]
    try:
        await cache.synced.wait()
        return await binder.schedule(cache, writer, Writes(store.keys), {"default/db": SPEC},
                                     keys, random.Random(seed))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def claims(store: MemoryStore) -> dict[str, str]:
    found, _ = await store.scan(store.keys.ssd_claims(), SsdClaim)
    return {v.key.removeprefix(store.keys.ssd_claims()): v.value.owner for v in found}


async def test_the_claim_is_committed_with_the_placement() -> None:
    store = MemoryStore("/t")
    keys = await cluster(store, {"a": 2})
    result = await schedule(store, keys, 1)
    assert (result.placed, result.unplaced) == (2, 1)
    insts = {v.value.key: v.value for v in (await store.scan(store.keys.instances(),
                                                              Instance))[0]}
    bound = {k: i for k, i in insts.items() if i.node}
    assert await claims(store) == {f"a/{i.ssds[0].disk}": k for k, i in bound.items()}
    assert all(i.ssds[0].source == f"/var/lib/sigma/ssds/{i.ssds[0].disk}/data"
               for i in bound.values())
    (waiting,) = [i for i in insts.values() if not i.node]
    assert waiting.reason == "1 node: insufficient ssd (need 1 \u2265 10Gi, best free 0)"


async def test_racing_schedulers_never_claim_one_disk_twice() -> None:
    """Two masters' schedulers at once over the same instances and disks (each with its own
    cache and writer): every disk has one owner, every owner one disk."""
    for seed in range(20):
        store = MemoryStore("/t")
        keys = await cluster(store, {"a": 2, "b": 1})
        await asyncio.gather(schedule(store, keys, seed), schedule(store, keys[::-1], seed + 99))
        owners = await claims(store)
        insts = [v.value for v in (await store.scan(store.keys.instances(), Instance))[0]]
        bound = [i for i in insts if i.node]
        assert len(owners) == len(bound) == 3, seed
        assert sorted(owners.values()) == sorted(i.key for i in bound), seed
        assert {f"{i.node}/{i.ssds[0].disk}" for i in bound} == set(owners), seed


async def test_a_disk_changed_by_its_agent_is_not_claimed() -> None:
    """The claim guards the disk record's revision: a scheduler that saw it ready before
    its agent began wiping it loses."""
    store = MemoryStore("/t")
    change = Writes(store.keys).claim_ssds(Instance("default", "db", 0, 1), "a",
                                            [disk("loop0", 10 * GI, rev=1)])
    await store.put(store.keys.ssd("a", "loop0"), Ssd("a", "loop0", "/dev/loop0"))
    assert not await store.commit(change.guards, change.ops)
    assert await claims(store) == {}
    # at the record's revision, one claim wins and a second (another instance) loses
    seen = await store.get(store.keys.ssd("a", "loop0"), Ssd)
    assert seen is not None
    ready = disk("loop0", 10 * GI, rev=seen.mod_revision)
    for i, wins in ((0, True), (1, False)):
        claim = Writes(store.keys).claim_ssds(Instance("default", "db", i, 1), "a", [ready])
        assert bool(await store.commit(claim.guards, claim.ops)) is wins
    assert await claims(store) == {"a/loop0": "default/db-0"}


def test_delete_releases_the_disk_claims() -> None:
    writes = Writes(MemoryStore("/t").keys)
    inst = Instance("default", "db", 0, 1, node="a",
                    ssds=[BoundSsd("data", "loop3", "/x/loop3/data")])
    change = writes.delete_instance(Versioned("/t/instances/default/db/0", inst, 5), None)
    assert any(op.delete and op.key == "/t/alloc/ssd/a/loop3" for op in change.ops)


def test_the_disk_is_bind_mounted_at_the_volume() -> None:
    inst = Instance("default", "db", 0, 1, node="a", ip="10.244.0.2",
                    ssds=[BoundSsd("data", "loop3", "/var/lib/sigma/ssds/loop3/data")])
    config = container_config(inst, SPEC, SPEC.containers[0])
    assert config["HostConfig"]["Mounts"] == [{
        "Type": "bind", "Source": "/var/lib/sigma/ssds/loop3/data", "Target": "/data",
        "ReadOnly": False, "BindOptions": {"Propagation": "rprivate"}}]
    assert container_config(Instance("default", "db", 0, 1, ip="10.244.0.2"),
                            parse("app: x\ncontainers: [{name: m, image: x}]")[0],
                            SPEC.containers[0])["HostConfig"].get("Mounts") is None


def test_an_ssd_app_never_moves_live() -> None:
    moving = Instance("default", "db", 0, 1, state="Running", node="a", ip="10.244.0.2",
                      request=SPEC.request(), move="drain a",
                      ssds=[BoundSsd("data", "loop0", "/x")])
    snap = Snapshot(1, {"b": info("b", disk("loop0", 10 * GI))})
    result = binder.plan(snap, [Versioned("/i/0", moving, 3)], {"default/db": SPEC})
    assert not result.by_node and result.waiting == 1
    assert result.unplaced[0][1].reason.startswith("no live move")


DB = """
volumes: [{name: data, ssd: 1, min_size: 10Gi, mount: /data}]
"""


async def add_disks(lead: Leader, node: str, n: int) -> None:
    """`n` ready 10 GiB disks on `node`, as its agent reports them."""
    for d in range(n):
        await lead.store.put(lead.store.keys.ssd(node, f"loop{d}"), Ssd(
            node, f"loop{d}", f"/dev/loop{d}", 10 * GI, state=SSD_READY,
            mount=f"/srv/{node}/ssds/loop{d}"))


async def test_an_ssd_app_runs_keeps_its_disk_across_restarts_and_releases_it() -> None:
    """On the fake leader: each instance runs with its own disk mounted at /data; a restart
    keeps that disk; scale-down and delete release the claims; the volumes cannot change."""
    async with Leader() as lead:
        await lead.add_node("a", ssds=3)
        await add_disks(lead, "a", 3)
        await lead.apply(spec("db", 2) + DB.lstrip())
        found = await lead.running("db", 2)
        engine = lead.engine("a")
        sources = {}
        for inst in found:
            (c,) = [c for c in engine.by_id.values() if c.id == inst.containers[0].id]
            (mount,) = c.config["HostConfig"]["Mounts"]
            assert mount["Target"] == "/data" and mount["Source"] == inst.ssds[0].source
            sources[inst.name] = mount["Source"]
        assert len(set(sources.values())) == 2
        assert len(lead.cache.table(SSD_CLAIMS)) == 2
        listed = views.ssds(lead.cache)
        assert sorted(d["claimed_by"] for d in listed) == ["", "default/db-0", "default/db-1"]
        assert views.nodes(lead.cache)[0]["ssd"] == {"free": 1, "total": 3}
        assert views.pool(lead.cache)["ssd"] == {"free": 1, "total": 3}

        first = found[0]
        engine.exit(first.containers[0].id, 1)  # the container ends: restarted, same disk
        await lead.until(lambda: (i := lead.instances("db")[0]).restarts == 1
                         and i.state == "Running", what="db-0 restarted")
        again = lead.instances("db")[0]
        (c,) = [c for c in engine.by_id.values() if c.id == again.containers[0].id]
        assert c.config["HostConfig"]["Mounts"][0]["Source"] == sources["db-0"]

        with pytest.raises(SpecError) as refused:
            await lead.apply(spec("db", 2) + "volumes: []\n")
        assert refused.value.field == "volumes"

        await lead.apply(spec("db", 1) + DB.lstrip())
        await lead.running("db", 1)
        await lead.until(lambda: len(lead.cache.table(SSD_CLAIMS)) == 1, what="claim released")
        await lead.api.delete("default", "db")
        await lead.until(lambda: not lead.instances("db"), what="db deleted")
        assert len(lead.cache.table(SSD_CLAIMS)) == 0


async def break_disk(lead: Leader, node: str, disk: str) -> None:
    key = lead.store.keys.ssd(node, disk)
    v = await lead.store.get(key, Ssd)
    assert v is not None
    await lead.store.put(key, replace(v.value, state="broken", error="I/O on /dev/x failed"))


async def test_a_broken_disk_moves_its_instance_to_new_disks() -> None:
    """SSDLost: the containers on the broken disk are stopped first, then the instance is
    placed anew (migration: auto) with a disk of its own; the broken disk stays claimed."""
    async with Leader() as lead:
        await lead.add_node("a", ssds=2)
        await add_disks(lead, "a", 2)
        await lead.apply(spec("db", 1) + DB.lstrip())
        (first,) = await lead.running("db", 1)
        old = first.containers[0].id
        await break_disk(lead, "a", first.ssds[0].disk)

        def moved() -> Instance | None:
            (i,) = lead.instances("db")
            return i if i.state == "Running" and i.ssds[0].disk != first.ssds[0].disk else None

        now = await lead.until(moved, what="db-0 running on its new disk")
        assert old not in {c.id for c in lead.engine("a").running()}
        assert any(t.reason == "SSDLost" and t.container_id == old for t in now.terminations)
        claims = {k.rsplit("/", 1)[-1]: v.value.owner
                  for k, v in lead.cache.table(SSD_CLAIMS).items()}
        assert claims == {"loop0": "default/db-0", "loop1": "default/db-0"}


async def test_a_broken_disk_with_manual_migration_waits() -> None:
    async with Leader() as lead:
        await lead.add_node("a", ssds=2)
        await add_disks(lead, "a", 2)
        await lead.apply(spec("db", 1, migration="manual") + DB.lstrip())
        (first,) = await lead.running("db", 1)
        await break_disk(lead, "a", first.ssds[0].disk)
        waiting = await lead.until(lambda: (i := lead.instances("db")[0]).state ==
                                   "NeedMigration" and i, what="db-0 NeedMigration")
        assert waiting.reason.startswith(f"SSDLost: disk {first.ssds[0].disk} of volume data")
        assert not lead.engine("a").running()  # stopped
        # and not resumed on its node (as a NodeLost one is when its node is back)
        assert migration.node_change(waiting, {"a"}, "manual") is None


async def test_a_retained_disk_stays_claimed_until_released() -> None:
    async with Leader() as lead:
        await lead.add_node("a", ssds=2)
        await add_disks(lead, "a", 2)
        await lead.apply(spec("db", 1) + DB.lstrip().replace("/data}", "/data, reclaim: retain}"))
        (inst,) = await lead.running("db", 1)
        disk = inst.ssds[0].disk
        assert inst.ssds[0].reclaim == "retain"
        with pytest.raises(Conflict, match="in use by instance default/db-0"):
            await lead.api.release_ssd("a", disk)
        await lead.api.delete("default", "db")
        await lead.until(lambda: not lead.instances("db"), what="db deleted")
        assert [v.value.owner for v in lead.cache.table(SSD_CLAIMS).values()] == \
            ["default/db-0"]  # retained: the agent keeps its data
        assert await lead.api.release_ssd("a", disk) == "default/db-0"
        assert not lead.cache.table(SSD_CLAIMS)  # released: the agent wipes it
        with pytest.raises(NotFound):
            await lead.api.release_ssd("a", disk)


async def test_a_lost_node_leaves_the_disk_claimed_and_the_instance_runs_elsewhere() -> None:
    async with Leader() as lead:
        await lead.add_node("a", ssds=1)
        await add_disks(lead, "a", 1)
        await lead.apply(spec("db", 1) + DB.lstrip())
        await lead.running("db", 1)
        await lead.add_node("b", ssds=1)
        await add_disks(lead, "b", 1)
        await lead.lose_node("a")

        def elsewhere() -> Instance | None:
            (i,) = lead.instances("db")
            return i if i.node == "b" and i.state == "Running" else None

        moved = await lead.until(elsewhere, what="db-0 running on b")
        assert moved.ssds[0].source == "/srv/b/ssds/loop0/data"
        owners = {k.removeprefix(lead.store.keys.ssd_claims()): v.value.owner
                  for k, v in lead.cache.table(SSD_CLAIMS).items()}
        assert owners == {"a/loop0": "default/db-0", "b/loop0": "default/db-0"}


async def retain(lead: Leader, node: str, disk: str, owner: str) -> None:
    """The agent's part: a claimed disk whose owner is not placed on it is `retained`."""
    key = lead.store.keys.ssd(node, disk)
    v = await lead.store.get(key, Ssd)
    assert v is not None
    await lead.store.put(key, replace(v.value, state=SSD_RETAINED, owner=owner))


async def test_an_app_applied_again_gets_its_retained_disk_back() -> None:
    """Deleted with `reclaim: retain`, applied again: db-0 is placed on its own disk (with its
    data), not on the free one beside it, and claims nothing new."""
    async with Leader() as lead:
        await lead.add_node("a", ssds=2)
        await add_disks(lead, "a", 2)
        retained = spec("db", 1) + DB.lstrip().replace("/data}", "/data, reclaim: retain}")
        await lead.apply(retained)
        (first,) = await lead.running("db", 1)
        await lead.api.delete("default", "db")
        await lead.until(lambda: not lead.instances("db"), what="db deleted")
        await retain(lead, "a", first.ssds[0].disk, "default/db-0")
        await lead.until(lambda: lead.cache.table(SSDS)[lead.store.keys.ssd(
            "a", first.ssds[0].disk)].value.state == SSD_RETAINED, what="the disk retained")
        await lead.apply(retained)
        (again,) = await lead.running("db", 1)
        assert again.ssds == first.ssds
        claims = {k.removeprefix(lead.store.keys.ssd_claims()): v.value
                  for k, v in lead.cache.table(SSD_CLAIMS).items()}
        assert claims == {f"a/{first.ssds[0].disk}": SsdClaim("default/db-0", "data")}


async def test_an_instance_whose_node_comes_back_goes_home_to_its_disk() -> None:
    """Moved off a lost node onto a new disk; when the node it now runs on is lost in turn
    and the first is back, it goes back to its first disk although that node has no free
    disk (its own is all it needs there)."""
    async with Leader() as lead:
        await lead.add_node("a", ssds=1)
        await add_disks(lead, "a", 1)
        await lead.apply(spec("db", 1) + DB.lstrip())
        (first,) = await lead.running("db", 1)
        await lead.add_node("b", ssds=1)
        await add_disks(lead, "b", 1)
        await lead.lose_node("a")
        await lead.until(lambda: (i := lead.instances("db")[0]).node == "b" and
                         i.state == "Running", what="db-0 running on b")
        await retain(lead, "a", "loop0", "default/db-0")
        await lead.add_node("a", ssds=1)  # back
        await lead.lose_node("b")

        def home() -> Instance | None:
            (i,) = lead.instances("db")
            return i if i.node == "a" and i.state == "Running" else None

        back = await lead.until(home, what="db-0 back on a")
        assert back.ssds == first.ssds


async def test_cordon_keeps_a_disk_out_and_uncordon_gives_it_back() -> None:
    async with Leader() as lead:
        await lead.add_node("a", ssds=2)
        await add_disks(lead, "a", 2)
        await lead.until(lambda: len(lead.cache.table(SSDS)) == 2, what="the disks cached")
        await lead.api.cordon_ssd("a", "loop0")
        with pytest.raises(Conflict, match="is claimed"):
            await lead.api.cordon_ssd("a", "loop0")
        await lead.apply(spec("db", 2) + DB.lstrip())
        await lead.until(lambda: len([i for i in lead.instances("db") if i.node]) == 1,
                         what="one db placed")
        placed = [i for i in lead.instances("db") if i.node]
        assert [i.ssds[0].disk for i in placed] == ["loop1"]  # never the cordoned one
        with pytest.raises(Conflict, match="claimed by default/db-"):
            await lead.api.uncordon_ssd("a", "loop1")
        await lead.api.uncordon_ssd("a", "loop0")  # its claim goes: the agent wipes it
        assert lead.store.keys.ssd_claim("a", "loop0") not in lead.cache.table(SSD_CLAIMS)
        await break_disk(lead, "a", "loop0")
        key = lead.store.keys.ssd("a", "loop0")
        await lead.until(lambda: lead.cache.table(SSDS)[key].value.state == "broken",
                         what="the broken disk cached")
        await lead.api.uncordon_ssd("a", "loop0")  # broken → free: the agent reformats it
        again = await lead.store.get(lead.store.keys.ssd("a", "loop0"), Ssd)
        assert again is not None and (again.value.state, again.value.error) == ("free", "")
        with pytest.raises(Conflict, match="neither cordoned nor broken"):
            await lead.api.uncordon_ssd("a", "loop0")
