"""Prometheus metrics of one sigmad process, served as text at GET /metrics (master and
agent) with prometheus-client.

Invariants:
- nothing on a hot path does more than an int add or a histogram observe: figures that need
  a walk over the cache (instances by state and app, nodes' capacity, requests and usage)
  are computed when scraped, by a collector, from the cache;
- no label takes per-instance values (the scale bench runs 100,000 instances): labels are
  apps, states, nodes, kinds of engine call and sync results;
- each int of `Metrics` has one writer thread (the API's thread for connections and
  streams, the main loop for watches and compaction), so a plain `+=` never loses an
  update; readers of other threads may see a value a moment old.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from sigmad.state.cache import Cache

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Process-wide instruments (one process serves one cluster): registered in every registry
# this process serves (`registry`).
ETCD_TXN_SECONDS = Histogram("sigma_etcd_txn_seconds", "etcd transactions, by how long "
                             "they took", buckets=_FAST, registry=None)
ETCD_CONFLICTS = Counter("sigma_etcd_txn_conflicts", "etcd transactions whose guards did "
                         "not hold (nothing written)", registry=None)
ENGINE_SECONDS = Histogram("sigma_engine_call_seconds", "Docker Engine API calls, by kind",
                           ["call"], buckets=_FAST, registry=None)
ENGINE_ERRORS = Counter("sigma_engine_call_errors", "Engine API calls that failed (unreachable "
                        "or an error status), by kind", ["call"], registry=None)
PLACEMENTS = Counter("sigma_placements", "instances placed on a node by the scheduler",
                     registry=None)
PLACEMENT_ROUNDS = Histogram("sigma_placement_round_seconds", "scheduler rounds (plan and "
                             "commit), by how long they took", buckets=_FAST, registry=None)
SYNCS = Counter("sigma_reconcile_syncs", "keys synced by the controller's workers, by result",
                ["result"], registry=None)
SYNC_SECONDS = Histogram("sigma_reconcile_sync_seconds", "one key's sync, by how long it "
                         "took", buckets=_FAST, registry=None)
USAGE_SAMPLES = Counter("sigma_usage_samples", "usage samples written by this agent",
                        registry=None)
PROCESS = (ETCD_TXN_SECONDS, ETCD_CONFLICTS, ENGINE_SECONDS, ENGINE_ERRORS, PLACEMENTS,
           PLACEMENT_ROUNDS, SYNCS, SYNC_SECONDS, USAGE_SAMPLES)


class Queue(Protocol):
    adds: int
    retries: int

    def __len__(self) -> int: ...

    @property
    def busy(self) -> int: ...


_queues: list[Queue] = []  # the controller's work queue while this master leads


def watch_queue(queue: Queue | None) -> None:
    """Report `queue` (the leader's work queue), or none (None: this master stopped
    leading)."""
    _queues[:] = [queue] if queue is not None else []


def engine_call(method: str, path: str) -> str:
    """The kind of an Engine API call, without ids: `GET containers/json`,
    `POST exec/start`, `DELETE containers/item` (a bounded set of label values)."""
    parts = path.partition("?")[0].strip("/").split("/")
    if parts and parts[0].startswith("v1."):
        parts = parts[1:]
    if len(parts) <= 1:
        return f"{method} {parts[0] if parts else ''}"
    last = parts[-1] if len(parts) > 2 or parts[-1] in ("create", "json", "prune") else "item"
    return f"{method} {parts[0]}/{last}"


def timed_engine_call(method: str, path: str, seconds: float, failed: bool) -> None:
    call = engine_call(method, path)
    ENGINE_SECONDS.labels(call).observe(seconds)
    if failed:
        ENGINE_ERRORS.labels(call).inc()


@dataclass
class Metrics:
    """What bounds the master's API, as numbers a test or a scraper can read."""

    api_connections_refused: int = 0  # connections over the cap, answered 503
    api_slow_bodies: int = 0  # requests whose body did not arrive in time (408)
    api_streams_open: int = 0  # event and log streams being served
    api_streams_closed: int = 0  # streams ended (client gone, or the server's end)
    api_watches_open: int = 0  # etcd watches behind event streams
    etcd_compacted_revision: int = 0  # the revision this master last compacted etcd at
    connections: Callable[[], int] = field(default=lambda: 0, repr=False)

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("sigma_api_connections_open", "API connections open",
                                value=self.connections())
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int):
                continue
            name = f"sigma_{f.name}"
            if f.name.endswith(("_refused", "_closed", "_bodies")):
                yield CounterMetricFamily(name, f.name.replace("_", " "), value=value)
            else:
                yield GaugeMetricFamily(name, f.name.replace("_", " "), value=value)


class _Call(Collector):
    """A collector made of a function (prometheus-client's registry takes objects)."""

    def __init__(self, fn: Callable[[], Iterator[Metric]]) -> None:
        self.fn = fn

    def collect(self) -> Iterator[Metric]:
        return self.fn()


def queue_figures() -> Iterator[Metric]:
    depth = GaugeMetricFamily("sigma_queue_depth", "keys waiting in the controller's work "
                              "queue (0 on a standby)", value=sum(len(q) for q in _queues))
    busy = GaugeMetricFamily("sigma_queue_busy", "keys being synced now",
                             value=sum(q.busy for q in _queues))
    adds = CounterMetricFamily("sigma_queue_adds", "keys added to the work queue since this "
                               "master began to lead", value=sum(q.adds for q in _queues))
    retries = CounterMetricFamily("sigma_queue_retries", "keys queued again after an error",
                                  value=sum(q.retries for q in _queues))
    yield from (depth, busy, adds, retries)


def cluster_figures(cache: Cache, master_id: str = "") -> Iterator[Metric]:
    """Instances by app and state, and per node its status, capacity, allocatable,
    requested and used cpu and memory (from the cache, as the views read it)."""
    from sigmad.api import views  # (the views import the cache: no cycle at import)
    from sigmad.state.cache import LEADER, USAGE

    states = GaugeMetricFamily("sigma_instances", "instances by app and state",
                               labels=["app", "state"])
    for app_key, table in sorted(list(cache.by_app.items())):
        counts: dict[str, int] = {}
        for v in list(table.values()):
            state = str(v.value.state)
            counts[state] = counts.get(state, 0) + 1
        for state, count in sorted(counts.items()):
            states.add_metric([app_key, state], count)
    yield states
    nodes = GaugeMetricFamily("sigma_nodes", "nodes by status", labels=["status"])
    cpu = GaugeMetricFamily("sigma_node_cpu_cores", "a node's cpu: capacity, allocatable, "
                            "requested, used", labels=["node", "kind"])
    memory = GaugeMetricFamily("sigma_node_memory_bytes", "a node's memory: capacity, "
                               "allocatable, requested, used", labels=["node", "kind"])
    usage = cache.table(USAGE)
    by_status: dict[str, int] = {}
    for n in sorted(list(cache.nodes().values()), key=lambda n: n.value.name):
        node = n.value
        status = views.node_status(node, node.name in cache.ready)
        by_status[status] = by_status.get(status, 0) + 1
        booked = cache.usage.get(node.name)
        requested = booked.requested if booked else None
        figures = [("capacity", node.capacity.cpu_m / 1000, node.capacity.memory),
                   ("allocatable", node.allocatable.cpu_m / 1000, node.allocatable.memory),
                   ("requested", requested.cpu_m / 1000 if requested else 0.0,
                    requested.memory if requested else 0)]
        sample = usage.get(cache.keys.usage(node.name))
        if sample is not None:
            figures.append(("used", sample.value.host.cpu, sample.value.host.memory))
        for kind, cores, size in figures:
            cpu.add_metric([node.name, kind], cores)
            memory.add_metric([node.name, kind], size)
    for status, count in sorted(by_status.items()):
        nodes.add_metric([status], count)
    yield from (nodes, cpu, memory)
    yield GaugeMetricFamily("sigma_cache_revision", "the etcd revision this master's cache "
                            "reflects", value=cache.revision)
    if master_id:
        leader = next(iter(list(cache.table(LEADER).values())), None)
        leads = leader is not None and getattr(leader.value, "id", "") == master_id
        yield GaugeMetricFamily("sigma_leader", "1 if this master leads", value=int(leads))


def registry(*sources: Callable[[], Iterator[Metric]] | Any) -> CollectorRegistry:
    """A registry with the process-wide instruments and `sources` (collect functions, or
    objects with a `collect` method)."""
    reg = CollectorRegistry(auto_describe=False)
    for metric in PROCESS:
        reg.register(metric)
    for source in sources:
        reg.register(_Call(source.collect if hasattr(source, "collect") else source))
    return reg


def render(reg: CollectorRegistry) -> bytes:
    """The registry's metrics in Prometheus' text format."""
    return bytes(generate_latest(reg))

