"""IP claims on a real etcd: two controllers racing to create 200 instances never give one IP
to two of them; a fixed IP held by another instance waits; deletion releases the IP."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

from sigmad.controller import Controller
from sigmad.models import AppRecord, Instance, Owner
from sigmad.procs import EtcdProcess
from sigmad.spec import validate
from sigmad.store import Store

CIDR = "10.250.0.0/24"  # 253 usable addresses for 200 instances: random picks collide often


def spec(app: str, replicas: int, ip: object = None) -> AppRecord:
    doc: dict[str, object] = {"app": app, "replicas": replicas,
                              "containers": [{"name": "main", "image": "busybox"}]}
    if ip is not None:
        doc["network"] = {"ip": ip}
    return AppRecord(validate(doc))


async def claims(s: Store) -> tuple[list[Instance], dict[str, str]]:
    instances = [v.value for v in (await s.scan(s.keys.instances(), Instance))[0]]
    owners = {v.key.rsplit("/", 1)[-1]: v.value.owner
              for v in (await s.scan(s.keys.ips(), Owner))[0]}
    return instances, owners


async def test_two_racing_controllers_give_200_instances_200_distinct_ips(
    etcd: EtcdProcess,
) -> None:
    s = Store([etcd.endpoint], f"/ipam-{uuid.uuid4().hex[:8]}")
    controllers = [Controller(s, overlay_cidr=CIDR) for _ in range(2)]
    try:
        await s.put(s.keys.app("default", "many"), spec("many", 200))
        for _ in range(10):
            await asyncio.gather(*(c.reconcile() for c in controllers))
            instances, _ = await claims(s)
            if len(instances) == 200 and all(i.ip for i in instances):
                break
        instances, owners = await claims(s)
        assert len(instances) == 200
        ips = Counter(i.ip for i in instances)
        assert len(ips) == 200 and "" not in ips, ips.most_common(3)
        assert owners == {i.ip: i.key for i in instances}  # no claim without its instance
    finally:
        await s.close()


async def test_a_held_fixed_ip_waits_and_deletion_releases_it(etcd: EtcdProcess) -> None:
    s = Store([etcd.endpoint], f"/ipam-{uuid.uuid4().hex[:8]}")
    c = Controller(s, overlay_cidr=CIDR)
    try:
        await s.put(s.keys.app("default", "a"), spec("a", 1, "10.250.0.9"))
        await c.reconcile()
        await s.put(s.keys.app("default", "b"), spec("b", 1, "10.250.0.9"))
        await c.reconcile()
        instances, owners = await claims(s)
        by_app = {i.app: i for i in instances}
        assert by_app["a"].ip == "10.250.0.9" and owners == {"10.250.0.9": "default/a-0"}
        assert by_app["b"].ip == "" and by_app["b"].state == "Pending"
        assert by_app["b"].reason == \
            "waiting for an overlay IP: network.ip: 10.250.0.9 is held by another instance"
        await s.delete(s.keys.app("default", "a"))
        for _ in range(5):  # a is retired (its node is gone: released at once), b claims
            await c.reconcile()
            await asyncio.gather(*c.workers.values())
            instances, owners = await claims(s)
            if owners == {"10.250.0.9": "default/b-0"}:
                break
        assert owners == {"10.250.0.9": "default/b-0"}
        assert [(i.app, i.ip) for i in instances] == [("b", "10.250.0.9")]
        assert "overlay IP" not in instances[0].reason  # now it waits for a node
    finally:
        await s.close()
