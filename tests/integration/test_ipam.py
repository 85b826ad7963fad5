"""IP claims on a real etcd: two controllers racing to create 200 instances never give one IP
to two of them; a fixed IP held by another instance waits; deletion releases the IP."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from types import TracebackType
from typing import Any

from sigmad.control.reconcile import sync_app
from sigmad.models import AppRecord, Instance, Owner
from sigmad.network.ipam import OverlayNet
from sigmad.procs import EtcdProcess
from sigmad.spec import validate
from sigmad.state.cache import IPS, Cache
from sigmad.state.writes import Writer, Writes
from sigmad.store import EtcdStore, Store

NET = OverlayNet("10.250.0.0/24")  # 253 usable addresses for 200 instances: picks collide


def spec(app: str, replicas: int, ip: object = None) -> AppRecord:
    doc: dict[str, object] = {"app": app, "replicas": replicas,
                              "containers": [{"name": "main", "image": "busybox"}]}
    if ip is not None:
        doc["network"] = {"ip": ip}
    return AppRecord(validate(doc))


class AppSyncer:
    """The app side of a controller: its own cache and Writer, syncing apps from it."""

    def __init__(self, s: Store) -> None:
        self.store, self.cache, self.writes = s, Cache(s), Writes(s.keys)
        self.writer = Writer(s, self.cache)
        self.tasks: list[asyncio.Task[Any]] = []

    async def __aenter__(self) -> AppSyncer:
        self.tasks = [asyncio.create_task(self.cache.run()),
                      asyncio.create_task(self.writer.run())]
        await self.cache.synced.wait()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def sync(self, app: str) -> int:
        """One sync of `default/app` from the cache; the changes that lost a race. The
        cache has what the sync wrote when it returns (a read of it right after sees it)."""
        await self.cache.wait_for(await self.store.ping())
        rec = self.cache.app(f"default/{app}")
        taken = {k.rsplit("/", 1)[-1] for k in self.cache.table(IPS)}
        plan = sync_app(self.writes, rec.value if rec else None,
                        self.cache.instances_of(f"default/{app}"), NET, taken, time.time())
        results = await asyncio.gather(*(self.writer.write(c) for c in plan.changes))
        await self.cache.wait_for(await self.store.ping())
        return results.count(0)


async def claims(s: Store) -> tuple[list[Instance], dict[str, str]]:
    instances = [v.value for v in (await s.scan(s.keys.instances(), Instance))[0]]
    owners = {v.key.rsplit("/", 1)[-1]: v.value.owner
              for v in (await s.scan(s.keys.ips(), Owner))[0]}
    return instances, owners


async def test_two_racing_controllers_give_200_instances_200_distinct_ips(
    etcd: EtcdProcess,
) -> None:
    prefix = f"/ipam-{uuid.uuid4().hex[:8]}"
    s, t = EtcdStore([etcd.endpoint], prefix), EtcdStore([etcd.endpoint], prefix)
    try:
        await s.put(s.keys.app("default", "many"), spec("many", 200))
        lost = 0
        async with AppSyncer(s) as one, AppSyncer(t) as two:
            for _ in range(10):
                lost += sum(await asyncio.gather(one.sync("many"), two.sync("many")))
                instances, _ = await claims(s)
                if len(instances) == 200 and all(i.ip for i in instances):
                    break
        instances, owners = await claims(s)
        assert len(instances) == 200
        ips = Counter(i.ip for i in instances)
        assert len(ips) == 200 and "" not in ips, ips.most_common(3)
        assert owners == {i.ip: i.key for i in instances}  # no claim without its instance
        assert lost > 0  # they did race: the guards turned the losers away
    finally:
        await s.close()
        await t.close()


async def test_a_held_fixed_ip_waits_and_deletion_releases_it(etcd: EtcdProcess) -> None:
    s = EtcdStore([etcd.endpoint], f"/ipam-{uuid.uuid4().hex[:8]}")
    try:
        async with AppSyncer(s) as c:
            await s.put(s.keys.app("default", "a"), spec("a", 1, "10.250.0.9"))
            await c.sync("a")
            await s.put(s.keys.app("default", "b"), spec("b", 1, "10.250.0.9"))
            await c.sync("b")
            instances, owners = await claims(s)
            by_app = {i.app: i for i in instances}
            assert by_app["a"].ip == "10.250.0.9" and owners == {"10.250.0.9": "default/a-0"}
            assert by_app["b"].ip == "" and by_app["b"].state == "Pending"
            assert by_app["b"].reason == \
                "waiting for an overlay IP: network.ip: 10.250.0.9 is held by another instance"
            await s.delete(s.keys.app("default", "a"))
            await c.sync("a")  # a is Terminating: the controller deletes it and its claim
            (a,) = c.cache.instances_of("default/a").values()
            assert a.value.state == "Terminating"
            owner = c.cache.get(IPS, s.keys.ip("10.250.0.9"))
            assert await c.writer.write(c.writes.delete_instance(a, owner))
            await c.sync("b")
        instances, owners = await claims(s)
        assert owners == {"10.250.0.9": "default/b-0"}
        assert [(i.app, i.ip) for i in instances] == [("b", "10.250.0.9")]
        assert "overlay IP" not in instances[0].reason  # now it waits for a node
    finally:
        await s.close()
