"""Scheduler benchmark: pure decisions/s, placements/s committed to a real etcd, etcd's raw
transaction ceiling, batch latency, peak RSS and packing quality (spread vs binpack).

    python bench/scheduler.py [--nodes 5000] [--instances 100000] [--etcd-instances N]

Prints the results and writes them to the "Scheduler" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import datetime
import os
import platform
import pstats
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.docs import write_section  # noqa: E402
from sigmad.models import Instance, Node, Overcommit  # noqa: E402
from sigmad.procs import EtcdProcess  # noqa: E402
from sigmad.scheduler import (  # noqa: E402
    Request,
    Snapshot,
    build_snapshot,
    place,
)
from sigmad.scheduler.binder import schedule  # noqa: E402
from sigmad.spec import (  # noqa: E402
    AppSpec,
    ContainerSpec,
    Expression,
    NetworkSpec,
    Placement,
    Port,
    Resources,
    ResourceSpec,
)
from sigmad.state.cache import Cache  # noqa: E402
from sigmad.state.writes import IN_FLIGHT as CONCURRENCY  # noqa: E402
from sigmad.state.writes import Writer, Writes  # noqa: E402
from sigmad.store import MAX_TXN_OPS, EtcdStore, Guard, Op, Store  # noqa: E402

GI, MI = 2**30, 2**20
T = TypeVar("T")
ZONES = ["bj-1", "bj-2", "sh-1", "sh-2", "gz-1", "gz-2"]
ISPS = ["ct", "cu", "cm", "bgp"]
SHAPES = [((8, 32), 20), ((16, 64), 35), ((32, 128), 30), ((64, 256), 15)]  # (cores, GiB), %
CPUS = [(0, 5), (100, 15), (250, 20), (500, 20), (1000, 20), (2000, 12), (4000, 8)]
MEMORY = [(128 * MI, 15), (256 * MI, 20), (512 * MI, 20), (GI, 20), (2 * GI, 15),
          (4 * GI, 7), (8 * GI, 3)]
REPLICAS = [(1, 25), (2, 15), (3, 15), (5, 12), (10, 10), (20, 8), (50, 7), (100, 5),
            (300, 2), (1000, 1)]
PORTS = [(0, 6), (1, 3), (2, 1)]  # host ports per instance


def weighted(rng: random.Random, table: list[tuple[T, int]]) -> T:
    """A value of `table`, drawn by its weight."""
    return rng.choices([v for v, _ in table], [w for _, w in table])[0]


# --- workload -----------------------------------------------------------------------------------


def make_nodes(n: int, rng: random.Random) -> list[Node]:
    """`n` nodes with mixed labels (zone, room, isp, ssd), shapes and cpu overcommit."""
    nodes = []
    for i in range(n):
        zone = rng.choice(ZONES)
        cores, gib = weighted(rng, SHAPES)
        labels = {"zone": zone, "room": f"{zone}-r{rng.randrange(4)}", "isp": rng.choice(ISPS)}
        if rng.random() < 0.3:
            labels["ssd"] = "true"
        alloc = Resources(cores * 1000 - 500, (gib - 2) * GI)
        nodes.append(Node(
            f"node-{i:05d}", "tcp://10.0.0.1:2375", labels=labels,
            capacity=Resources(cores * 1000, gib * GI), allocatable=alloc,
            overcommit=Overcommit(rng.choice([1.0, 1.5, 2.0]), rng.choice([1.0, 1.0, 1.2])),
        ))
    return nodes


def make_placement(rng: random.Random) -> Placement:
    """A selector mix: half none, the rest zone / ssd / isp / room / expressions."""
    roll = rng.random()
    p = Placement()
    if roll < 0.15:
        p.labels = {"zone": rng.choice(ZONES)}
    elif roll < 0.25:
        p.labels = {"ssd": "true"}
    elif roll < 0.35:
        p.expressions = [Expression("isp", "In", rng.sample(ISPS, 2))]
    elif roll < 0.40:
        zone = rng.choice(ZONES)
        p.labels = {"room": f"{zone}-r{rng.randrange(4)}"}
    elif roll < 0.50:
        p.expressions = [Expression("isp", "NotIn", ["bgp"]), Expression("ssd", "DoesNotExist")]
    if not p.labels.get("zone") and not p.labels.get("room") and rng.random() < 0.3:
        p.spread = "zone"
    if rng.random() < 0.2:
        p.strategy = "binpack"
    return p


def make_apps(total: int, rng: random.Random) -> list[tuple[AppSpec, int]]:
    """Apps of varied sizes, requests, selectors and host ports, `total` instances in all."""
    apps: list[tuple[AppSpec, int]] = []
    left = total
    while left > 0:
        replicas = min(left, weighted(rng, REPLICAS))
        cpu, memory = weighted(rng, CPUS), weighted(rng, MEMORY)
        if cpu == 0 and rng.random() < 0.5:
            memory = 0  # fully best effort
        ports = [Port(f"p{i}", 8000 + i) for i in range(weighted(rng, PORTS))]
        spec = AppSpec(
            app=f"app-{len(apps)}", namespace="bench",
            containers=[ContainerSpec("main", "img", resources=ResourceSpec(
                Resources(cpu, memory), Resources(cpu * 2, memory * 2)))],
            placement=make_placement(rng), network=NetworkSpec(ports=ports),
        )
        apps.append((spec, replicas))
        left -= replicas
    return apps


def requests_of(apps: list[tuple[AppSpec, int]]) -> list[Request]:
    return [
        Request(f"{spec.key}-{i}", spec.key, spec.request(), spec.placement,
                len(spec.network.ports))
        for spec, replicas in apps for i in range(replicas)
    ]


# --- pure ---------------------------------------------------------------------------------------


def pure(snapshot: Snapshot, requests: list[Request], profile: bool) -> dict[str, float]:
    """Decisions per second of one `place` call over every request."""
    profiler = cProfile.Profile() if profile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    decision = place(snapshot, requests, random.Random(1))
    if profiler:
        profiler.disable()
    elapsed = time.perf_counter() - start
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
    return {"decisions": len(requests), "seconds": elapsed, "rate": len(requests) / elapsed,
            "placed": len(decision.placed), "unplaced": len(decision.unplaced)}


def packing(nodes: list[Node], apps: list[tuple[AppSpec, int]], strategy: str,
            chunk: int = 20_000) -> dict[str, float]:
    """Share of the pool's capacity requested when the first instance no longer fits, placing
    the app mix (selectors off, all with `strategy`) in repeated rounds."""
    snapshot = build_snapshot(nodes, {n.name for n in nodes}, [], 1)
    stream = [
        Request(r.key, r.app, r.request, Placement(strategy=strategy))
        for r in requests_of(apps) if r.request.cpu_m or r.request.memory
    ]
    cap_cpu = sum(i.capacity().cpu_m for i in snapshot.nodes.values())
    cap_mem = sum(i.capacity().memory for i in snapshot.nodes.values())
    used_cpu = used_mem = placed = 0
    rng = random.Random(2)
    for lap in range(100):
        for start in range(0, len(stream), chunk):
            reqs = [replace(r, key=f"{lap}/{r.key}") for r in stream[start:start + chunk]]
            decision = place(snapshot, reqs, rng)
            for r in reqs:
                binding = decision.placed.get(r.key)
                if binding is None:
                    return {"cpu": used_cpu / cap_cpu, "memory": used_mem / cap_mem,
                            "placed": placed}
                info = snapshot.nodes[binding.node]
                info.requested.cpu_m += r.request.cpu_m
                info.requested.memory += r.request.memory
                used_cpu += r.request.cpu_m
                used_mem += r.request.memory
                placed += 1
    raise RuntimeError("the pool never filled up")


# --- etcd ---------------------------------------------------------------------------------------


class TimedStore(EtcdStore):
    """A Store that records when each transaction started and how long it took."""

    def __init__(self, endpoints: list[str], prefix: str) -> None:
        super().__init__(endpoints, prefix)
        self.txns: list[tuple[float, float, int]] = []  # start, seconds, guards + ops

    async def commit(self, guards: Sequence[Guard], ops: Sequence[Op]) -> int:
        start = time.perf_counter()
        revision = await super().commit(guards, ops)
        self.txns.append((start, time.perf_counter() - start, len(guards) + len(ops)))
        return revision


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def put_all(store: Store, items: Sequence[tuple[str, object]]) -> None:
    """Unguarded puts in full transactions, CONCURRENCY at a time."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def send(chunk: Sequence[tuple[str, object]]) -> None:
        async with gate:
            assert await store.commit([], [Op(k, v) for k, v in chunk])

    await asyncio.gather(*(send(items[i:i + MAX_TXN_OPS])
                           for i in range(0, len(items), MAX_TXN_OPS)))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def committed(endpoint: str, nodes: list[Node], apps: list[tuple[AppSpec, int]],
                    count: int) -> dict[str, float]:
    """Write the nodes (Ready) and `count` Pending instances, fill a state cache from etcd,
    run one `schedule` call (plan from the cache, commit through the Writer), then measure
    etcd's raw ceiling with transactions of the same sizes and concurrency."""
    store = TimedStore([endpoint], "/bench")
    keys = store.keys
    await put_all(store, [(keys.node(n.name), n) for n in nodes])
    await put_all(store, [(keys.heartbeat(n.name), {"node": n.name}) for n in nodes])
    instances: list[tuple[str, Instance]] = []
    for spec, replicas in apps:
        for i in range(replicas):
            if len(instances) < count:
                instances.append((keys.instance(spec.namespace, spec.app, i), Instance(
                    namespace=spec.namespace, app=spec.app, index=i, generation=1,
                    ip="10.244.0.2", request=spec.request())))  # IPAM is not benchmarked
    await put_all(store, instances)
    specs = {spec.key: spec for spec, _ in apps}
    start = time.perf_counter()
    cache = Cache(store)
    filling = asyncio.create_task(cache.run())
    await cache.synced.wait()
    read = time.perf_counter() - start
    writer = Writer(store, cache)
    writing = asyncio.create_task(writer.run())
    store.txns.clear()
    result = await schedule(cache, writer, Writes(keys), specs, list(cache.instances()),
                            random.Random(3))
    total = time.perf_counter() - start
    for task in (filling, writing):
        task.cancel()
    await asyncio.gather(filling, writing, return_exceptions=True)
    txns = [t for t in store.txns if t[2] > 0]
    commit_wall = max(s + d for s, d, _ in txns) - min(s for s, _, _ in txns)
    latencies = [d for _, d, _ in txns]
    mean_size = sum(n for _, _, n in txns) / len(txns)
    raw = await raw_ceiling(store, len(txns), round(mean_size))
    await store.close()
    return {
        "instances": count, "placed": result.placed, "unplaced": result.unplaced,
        "conflicts": result.conflicts, "rounds": result.rounds, "txns": len(txns),
        "txn_size": mean_size, "end_to_end": result.placed / total, "total_s": total,
        "read_s": read,
        "commit_rate": result.placed / commit_wall, "commit_s": commit_wall,
        "p50_ms": percentile(latencies, 0.50) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000,
        "raw_txns": raw["txns"], "raw_ops": raw["ops"],
        "ceiling": raw["txns"] * result.placed / len(txns),
        "raw_p50_ms": raw["p50_ms"], "raw_p99_ms": raw["p99_ms"],
    }


async def raw_ceiling(store: TimedStore, txns: int, size: int) -> dict[str, float]:
    """`txns` transactions of `size` guards + ops (half absence guards, half tiny puts), with
    the binder's concurrency: what etcd itself sustains here."""
    half = max(1, size // 2)
    gate = asyncio.Semaphore(CONCURRENCY)
    store.txns.clear()

    async def send(n: int) -> None:
        keys = [f"/bench-raw/{n}/{j}" for j in range(half)]
        async with gate:
            assert await store.commit([Guard(k, 0) for k in keys], [Op(k, 1) for k in keys])

    start = time.perf_counter()
    await asyncio.gather(*(send(n) for n in range(txns)))
    elapsed = time.perf_counter() - start
    latencies = [d for _, d, _ in store.txns]
    return {"txns": txns / elapsed, "ops": txns * 2 * half / elapsed,
            "p50_ms": percentile(latencies, 0.5) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000}


def with_etcd(nodes: list[Node], apps: list[tuple[AppSpec, int]], count: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="sigma-bench-") as tmp:
        etcd = EtcdProcess(Path(tmp), free_port(), free_port(), name="bench")
        etcd.start()
        try:
            asyncio.run(etcd.wait_ready())
            return asyncio.run(committed(etcd.endpoint, nodes, apps, count))
        finally:
            etcd.stop()


# --- report -------------------------------------------------------------------------------------


@dataclass
class Report:
    args: argparse.Namespace
    pure: dict[str, float]
    spread: dict[str, float]
    binpack: dict[str, float]
    etcd: dict[str, float]
    rss_mb: float

    def markdown(self) -> str:
        a, p, e = self.args, self.pure, self.etcd
        etcd_version = subprocess.run(["etcd", "--version"], capture_output=True,
                                      text=True).stdout.splitlines()[0]
        yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
        rows = [
            ("Decisions per second (pure `place`, one call)", f"{p['rate']:,.0f}",
             "≥ 20,000", yes(p["rate"] >= 20_000)),
            ("Placements committed per second (commit phase)", f"{e['commit_rate']:,.0f}",
             "≥ 5,000", yes(e["commit_rate"] >= 5_000)),
            ("Placements per second end to end (read + place + commit)",
             f"{e['end_to_end']:,.0f}", "", ""),
            ("etcd raw ceiling: transactions/s (same sizes and concurrency)",
             f"{e['raw_txns']:,.0f} ({e['raw_ops']:,.0f} guards+puts/s)", "", ""),
            ("etcd raw ceiling in placements/s (raw txns/s x placements per txn)",
             f"{e['ceiling']:,.0f}", "", ""),
            ("Placement transaction latency p50 / p99",
             f"{e['p50_ms']:.1f} ms / {e['p99_ms']:.1f} ms", "", ""),
            ("Raw transaction latency p50 / p99",
             f"{e['raw_p50_ms']:.1f} ms / {e['raw_p99_ms']:.1f} ms", "", ""),
            ("Peak RSS of the benchmark process", f"{self.rss_mb:,.0f} MB", "", ""),
            ("Packing, spread: cpu / memory requested at the first misfit",
             f"{self.spread['cpu']:.1%} / {self.spread['memory']:.1%}", "", ""),
            ("Packing, binpack: cpu / memory requested at the first misfit",
             f"{self.binpack['cpu']:.1%} / {self.binpack['memory']:.1%}", "", ""),
        ]
        table = "\n".join(f"| {m} | {v} | {t} | {ok} |" for m, v, t, ok in rows)
        return f"""## Scheduler

Measured {datetime.date.today().isoformat()} on this machine ({os.cpu_count()} cores,
Python {platform.python_version()}, {etcd_version}, one local etcd member on ext4), in one run of:

```
{self.command()}
```

| Metric | Result | Target | Met |
| --- | --- | --- | --- |
{table}

- Pure: {a.nodes:,} nodes with mixed labels (zone, room, isp, ssd), shapes (8-64 cores) and cpu
  overcommit (1-2x); {p['decisions']:,.0f} instances in apps of 1-1,000 replicas with mixed
  requests (5% best effort), selectors (labels, In/NotIn/DoesNotExist), zone spread (30%),
  binpack (20%) and 0-2 host ports: {p['placed']:,.0f} placed, {p['unplaced']:,.0f} unplaced
  in {p['seconds']:.2f} s.
- etcd: {e['instances']:,.0f} Pending instances of that mix on the same {a.nodes:,} Ready nodes,
  placed by one `schedule` call from a state cache (as the leader does): {e['placed']:,.0f}
  placed, {e['unplaced']:,.0f} unplaced, {e['conflicts']:.0f} conflicts, {e['rounds']:.0f}
  round(s), {e['txns']:,.0f} transactions of {e['txn_size']:.0f} guards+ops on average, at most
  {CONCURRENCY} in flight (the Writer packs one node's bookings with other nodes'). The commit
  phase took {e['commit_s']:.2f} s; end to end {e['total_s']:.2f} s, of which {e['read_s']:.2f} s
  filled the cache (one list of every record, as a master does once at start). The raw ceiling
  sends the same number of transactions of the same size (half absence guards, half tiny puts)
  with the same concurrency.
- Packing: the same app mix without selectors or host ports, all with one strategy, placed in
  rounds until the first instance fits nowhere; the share of the pool's capacity
  (allocatable x overcommit) requested at that moment. Cpu is this pool's scarce resource.
  Spread keeps every node's free room proportional, so it fills cpu almost completely before
  anything misfits. Binpack (most-requested share, as kube-scheduler's MostAllocated) fills
  nodes one after another and strands room in one dimension: nodes filled by memory-only
  (best-effort cpu) instances keep idle cpu, cpu-full nodes keep idle memory. Its gain, whole
  empty nodes kept for whole-host instances, does not show with requests of at most 4 cores.
- End to end includes filling the cache (reading and decoding every node and instance record,
  in pages of 2,000 keys at one revision); a running leader pays that once, not per round.
"""

    def command(self) -> str:
        a = self.args
        return (f"python bench/scheduler.py --nodes {a.nodes} --instances {a.instances} "
                f"--etcd-instances {a.etcd_instances} --seed {a.seed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--etcd-instances", type=int, default=100_000,
                        help="Pending instances committed to etcd (0: skip the etcd part)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="cProfile the pure run")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    nodes = make_nodes(args.nodes, rng)
    apps = make_apps(args.instances, rng)
    snapshot = build_snapshot(nodes, {n.name for n in nodes}, [], 1)
    result = pure(snapshot, requests_of(apps), args.profile)
    print(f"pure: {result['rate']:,.0f} decisions/s ({result})", flush=True)
    spread = packing(nodes, apps, "spread")
    binpack = packing(nodes, apps, "binpack")
    print(f"packing: spread {spread}, binpack {binpack}", flush=True)
    etcd = with_etcd(nodes, apps, args.etcd_instances)
    print(f"etcd: {etcd}", flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = Report(args, result, spread, binpack, etcd, rss)
    section = report.markdown()
    print(section)
    write_section(args.out, "Scheduler", section)


if __name__ == "__main__":
    main()
