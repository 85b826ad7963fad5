"""The API's read views, answered from the state cache (never from etcd).

Invariants:
- they may run on a thread other than the cache's: every dict or set of the cache is copied
  in one C call (list(), sorted(), dict()) before Python code walks it, and records are
  never changed in place, so a view never sees a table change under it;
- every view is computed from one moment of the cache (no await inside), and says the
  revision it reflects (`X-Sigma-Revision`);
- capacity arithmetic is the scheduler's: what a node has booked is the cache's per-node
  usage (a moving instance books both of its nodes), what it can take is allocatable times
  overcommit, and `free` is the difference (sigmad.scheduler.fit);
- instance lists are streamed in chunks, from each record's JSON bytes kept while its
  mod_revision holds (`Encoded`): a list of every instance joins bytes instead of encoding
  100,000 records again, and never holds the event loop for long.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

import orjson

from sigmad import records
from sigmad.leader import masters_view
from sigmad.models import (
    DRAINING,
    NOT_READY,
    READY,
    AppRecord,
    Instance,
    Node,
    Ssd,
    UsageRecord,
)
from sigmad.reasons import State
from sigmad.scheduler.fit import NodeUsage
from sigmad.scheduler.snapshot import FreeSsd, free_ssds, node_info
from sigmad.spec import Resources
from sigmad.state.cache import LEADER, MASTERS, SSD_CLAIMS, SSDS, USAGE, Cache
from sigmad.store import Versioned

CHUNK = 200  # instances per write of a streamed list


def resources(r: Resources) -> dict[str, int]:
    return {"cpu_m": r.cpu_m, "memory": r.memory}


def used(cache: Cache, name: str) -> UsageRecord | None:
    """The node's latest usage sample (sigmad.node.usage), if its agent wrote one."""
    v = cache.table(USAGE).get(cache.keys.usage(name))
    return v.value if v is not None else None


def used_resources(sample: UsageRecord | None) -> dict[str, int] | None:
    """A sample's host figures in the API's units (millicores, bytes)."""
    if sample is None:
        return None
    return {"cpu_m": round(sample.host.cpu * 1000), "memory": sample.host.memory}


def usage(cache: Cache) -> list[dict[str, Any]]:
    """Every node's latest usage sample, by node name (the agreed record: node, at, host,
    instances, ssds, scope)."""
    found: list[Versioned[UsageRecord]] = list(cache.table(USAGE).values())
    return [records.to_dict(v.value) for v in sorted(found, key=lambda v: v.value.node)]


def node_status(node: Node, ready: bool) -> str:
    return DRAINING if node.draining else READY if ready else NOT_READY


def heartbeat(cache: Cache, name: str) -> str:
    """What the node's heartbeat says: its agent and engine answer, or its agent is alive
    but its engine does not (its instances stay: nothing can stop them), or it lapsed."""
    if name in cache.ready:
        return "ok"
    return "engine not answering" if name in cache.alive else "lapsed"


def _claims(cache: Cache) -> dict[tuple[str, str], str]:
    """(node, disk id) → owner instance of every SSD claim."""
    prefix = cache.keys.ssd_claims()
    out: dict[tuple[str, str], str] = {}
    for key, v in list(cache.table(SSD_CLAIMS).items()):
        node, _, disk = key.removeprefix(prefix).partition("/")
        out[(node, disk)] = v.value.owner
    return out


def _free_ssds(cache: Cache) -> dict[str, list[FreeSsd]]:
    return free_ssds(list(cache.table(SSDS).values()), set(_claims(cache)))


def ssd_counts(cache: Cache, free: dict[str, list[FreeSsd]], node: Node) -> dict[str, int]:
    """The node's disks that may be claimed now, and all it lists."""
    return {"free": len(free.get(node.name, [])), "total": node.ssds}


def ssds(cache: Cache) -> list[dict[str, Any]]:
    """Every node's disks, with the instance each is claimed for ("" none)."""
    claims = _claims(cache)
    found: list[Versioned[Ssd]] = list(cache.table(SSDS).values())
    out = []
    for v in sorted(found, key=lambda v: (v.value.node, v.value.id)):
        view: dict[str, Any] = records.to_dict(v.value)
        view["claimed_by"] = claims.get((v.value.node, v.value.id), "")
        out.append(view)
    return out


def node_view(cache: Cache, node: Node, free: dict[str, list[FreeSsd]] | None = None
              ) -> dict[str, Any]:
    """A node with its status, what it has booked, its capacity for requests and what is
    free of it (SSDs too)."""
    usage = cache.usage.get(node.name) or NodeUsage()
    info = node_info(node, node.name in cache.ready, usage)
    view: dict[str, Any] = records.to_dict(node)
    view["status"] = node_status(node, info.ready)
    view["heartbeat"] = heartbeat(cache, node.name)
    view["requested"] = resources(info.requested)
    view["schedulable"] = resources(info.capacity())
    view["free"] = resources(info.free())
    view["instances"] = usage.instances
    view["ssd"] = ssd_counts(cache, _free_ssds(cache) if free is None else free, node)
    sample = used(cache, node.name)
    view["used"] = used_resources(sample)  # None: no sample (yet)
    view["used_scope"] = sample.scope if sample else ""
    return view


def nodes(cache: Cache) -> list[dict[str, Any]]:
    free = _free_ssds(cache)
    return [node_view(cache, v.value, free)
            for v in sorted(list(cache.nodes().values()), key=lambda v: v.value.name)]


def app_view(cache: Cache, rec: AppRecord) -> dict[str, Any]:
    s = rec.spec
    mine = list(cache.instances_of(s.key).values())
    return {
        "namespace": s.namespace, "app": s.app, "generation": rec.generation,
        "template_generation": rec.template_generation,
        "replicas": s.replicas, "running": sum(v.value.state == State.RUNNING for v in mine),
        "spec": records.to_dict(s), "created": rec.created, "updated": rec.updated,
        "configs": rec.configs, "configs_halt": rec.configs_halt,
    }


def apps(cache: Cache, namespace: str = "") -> list[dict[str, Any]]:
    found = [v.value for v in list(cache.apps().values())
             if not namespace or v.value.spec.namespace == namespace]
    return [app_view(cache, r) for r in sorted(found, key=lambda r: r.spec.key)]


def instance_json(v: Versioned[Instance]) -> bytes:
    """The record's JSON with its name added (orjson: ~1 µs an instance)."""
    return b'{"name":' + orjson.dumps(v.value.name) + b"," + records.dumps(v.value)[1:]


def instance_view(inst: Instance) -> dict[str, Any]:
    view: dict[str, Any] = records.to_dict(inst)
    view["name"] = inst.name
    return view


def instances(cache: Cache, namespace: str = "", app: str = "") -> list[Versioned[Instance]]:
    """The instances of `namespace` (and `app`), by namespace, app and index."""
    apps = [k for k in sorted(cache.by_app)
            if (not namespace or k.split("/", 1)[0] == namespace)
            and (not app or k.split("/", 1)[1] == app)]
    return [v for k in apps for v in cache.ordered(k)]


class Encoded:
    """Each instance's JSON bytes, kept while its record's mod_revision holds. Encoding is
    ~7 µs an instance: 0.7 s of CPU for a list of 100,000, of which a few percent change
    between two lists even in a burst. Used from one thread (the API's); entries of deleted
    instances are dropped once they outnumber the live ones."""

    def __init__(self) -> None:
        self._memo: dict[str, tuple[int, bytes]] = {}

    def __call__(self, v: Versioned[Instance]) -> bytes:
        hit = self._memo.get(v.key)
        if hit is not None and hit[0] == v.mod_revision:
            return hit[1]
        data = instance_json(v)
        self._memo[v.key] = (v.mod_revision, data)
        return data

    def prune(self, cache: Cache) -> None:
        """Forget deleted instances when the memo holds twice as many entries as live ones."""
        live = cache.instances()
        if len(self._memo) > 2 * len(live) + CHUNK:
            self._memo = {k: e for k, e in list(self._memo.items()) if k in live}


async def stream_items(items: list[Versioned[Instance]],
                       encoded: Encoded) -> AsyncIterator[bytes]:
    """`{"items": [...]}` of `items`, in chunks; other requests are served between two
    chunks (a list of 100,000 instances is ~60 MB)."""
    yield b'{"items":['
    for start in range(0, len(items), CHUNK):
        part = b",".join([encoded(v) for v in items[start:start + CHUNK]])
        yield (b"," if start else b"") + part
        await asyncio.sleep(0)
    yield b"]}"


def pool(cache: Cache) -> dict[str, Any]:
    """The pool as one server: allocatable, schedulable (times overcommit), requested, free,
    limits committed and used (the nodes' latest usage samples), overall and per node label
    value (Ready nodes only)."""
    ready = [v.value for v in list(cache.nodes().values())
             if node_status(v.value, v.value.name in cache.ready) == READY]
    limits = {v.value.spec.key: v.value.spec.limit() for v in list(cache.apps().values())}
    free = _free_ssds(cache)

    def summary(group: list[Node]) -> dict[str, Any]:
        infos = [node_info(n, True, cache.usage.get(n.name)) for n in group]
        mine = [v.value for n in group for v in cache.instances_on(n.name)
                if v.value.node == n.name or v.value.next_node == n.name]
        lims = [limits.get(i.app_key, Resources()) for i in mine]
        allocatable = _sum(i.allocatable for i in infos)
        schedulable = _sum(i.capacity() for i in infos)
        requested = _sum(i.requested for i in infos)
        samples = [s for n in group if (s := used(cache, n.name)) is not None]
        return {
            "nodes": len(group), "instances": len(mine),
            "allocatable": resources(allocatable), "schedulable": resources(schedulable),
            "requested": resources(requested),
            "free": resources(Resources(schedulable.cpu_m - requested.cpu_m,
                                        schedulable.memory - requested.memory)),
            "limits": resources(_sum(lims)),
            "used": {"cpu_m": round(sum(s.host.cpu for s in samples) * 1000),
                     "memory": sum(s.host.memory for s in samples)},
            "used_nodes": len(samples),  # nodes whose agent reported usage
            "uncapped": {"cpu": sum(1 for r in lims if not r.cpu_m),
                         "memory": sum(1 for r in lims if not r.memory)},
            "ssd": {"free": sum(len(free.get(n.name, [])) for n in group),
                    "total": sum(n.ssds for n in group)},
        }

    by_label: dict[str, dict[str, Any]] = {}
    for key in sorted({k for n in ready for k in n.labels}):
        values = sorted({n.labels[key] for n in ready if key in n.labels})
        by_label[key] = {value: summary([n for n in ready if n.labels.get(key) == value])
                         for value in values}
    return {**summary(ready), "by_label": by_label}


def masters(cache: Cache) -> dict[str, Any]:
    leader = next(iter(cache.table(LEADER).values()), None)
    return masters_view(leader.value if leader else None,
                        [v.value for v in list(cache.table(MASTERS).values())])


def _sum(items: Iterable[Resources]) -> Resources:
    cpu = memory = 0
    for r in items:
        cpu += r.cpu_m
        memory += r.memory
    return Resources(cpu, memory)
