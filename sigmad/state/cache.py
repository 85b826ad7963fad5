"""The state cache (an informer): every record under the prefix, listed at one revision R,
then kept current by a watch from R+1; relisted when the watch's history is compacted away.

Invariants:
- a cached record is shared and never changed in place (sigmad.models): readers may keep
  what they got, and a `View` is an immutable snapshot (its tables are copied on the next
  write, not on every read);
- a key's entry only moves forward: a change at or below the revision the cache holds for
  the key is dropped. So this process's own writes (`written`, with the revision the
  transaction answered) are seen at once, and their echo from the watch is a no-op; a delete
  leaves a tombstone until the watch has passed it;
- the indexes (instances by app and by node, what each node has booked, Ready nodes, nodes
  whose agent holds its heartbeat lease) are kept in step with the tables, change by change;
  a node is Ready while its heartbeat is there and says its engine answers (sigmad.models.Beat);
- subscribers are called after each change is applied, in revision order, never for events
  (events/ is not cached);
- a value that does not decode is logged and ignored: the key keeps its last good record
  (or stays absent), and the rest of the cluster loads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from sigmad import records
from sigmad.configs import ConfigHead, ConfigsHeld, ConfigVersion
from sigmad.control.rollout import Revision, Rollout
from sigmad.errors import SigmaError
from sigmad.leader import LeaderRecord, MasterRecord
from sigmad.models import (
    AppRecord,
    Beat,
    Instance,
    Node,
    NodeLock,
    OverlayApplied,
    Owner,
    Ssd,
    SsdClaim,
    UsageRecord,
)
from sigmad.scheduler.fit import NodeUsage
from sigmad.store import Op, Store, Versioned, WatchBatch, WatchCompacted
from sigmad.tokens import TokenRecord

log = logging.getLogger(__name__)
T = TypeVar("T")

NODES, BEATS, APPS, INSTANCES = "nodes", "heartbeats", "apps", "instances"
IPS, PORTS, LOCKS, LEADER, MASTERS = "ips", "ports", "locks", "leader", "masters"
SSDS, SSD_CLAIMS = "ssds", "ssd_claims"
TOKENS = "tokens"
USAGE = "usage"
CONFIGS, CONFIG_HEADS, CONFIGS_HELD = "configs", "config_heads", "configs_held"
REVISIONS, ROLLOUTS, APPLIED = "revisions", "rollouts", "overlay_applied"
# kind → (its key prefix under the cluster prefix, its record class; None: presence only)
KINDS: dict[str, tuple[str, type | None]] = {
    NODES: ("nodes/", Node), BEATS: ("heartbeats/", Beat), APPS: ("apps/", AppRecord),
    INSTANCES: ("instances/", Instance), IPS: ("alloc/ip/", Owner),
    PORTS: ("alloc/port/", Owner), LOCKS: ("alloc/node/", NodeLock),
    LEADER: ("leader", LeaderRecord), MASTERS: ("masters/", MasterRecord),
    SSDS: ("ssds/", Ssd), SSD_CLAIMS: ("alloc/ssd/", SsdClaim),
    TOKENS: ("tokens/", TokenRecord), USAGE: ("usage/", UsageRecord),
    CONFIGS: ("configs/", ConfigVersion), CONFIG_HEADS: ("config-heads/", ConfigHead),
    CONFIGS_HELD: ("config-held/", ConfigsHeld),
    REVISIONS: ("revisions/", Revision), ROLLOUTS: ("rollouts/", Rollout),
    APPLIED: ("overlay-applied/", OverlayApplied),
}
RELIST_DELAY = 1.0
MALFORMED = object()  # what `_decode` returns for a value that is not a record
LIST_CHUNK = 2000  # records decoded between two turns of the loop

Change = tuple[str, str, "Versioned[Any] | None", "Versioned[Any] | None"]  # kind, key, old, new
Subscriber = Callable[[str, str, "Versioned[Any] | None", "Versioned[Any] | None"], None]


@dataclass(frozen=True)
class View:
    """The cluster at one revision: read-only tables (key → Versioned record)."""

    revision: int
    tables: Mapping[str, Mapping[str, Versioned[Any]]]
    ready: frozenset[str]

    def table(self, kind: str) -> Mapping[str, Versioned[Any]]:
        return self.tables[kind]


class Cache:
    """Every record of one cluster, kept current from etcd (see the module docstring)."""

    def __init__(self, store: Store, ignore: Iterable[str] = ()) -> None:
        """`ignore`: kinds this cache neither lists nor decodes (their tables stay empty),
        e.g. the agents' caches leave out every node's usage samples."""
        self.store = store
        self.keys = store.keys
        self.base = self.keys.prefix + "/"
        self.revision = 0
        self.synced = asyncio.Event()
        self.broken_since = 0.0  # monotonic time the watch broke (0: it is live)
        self._tables: dict[str, dict[str, Versioned[Any]]] = {k: {} for k in KINDS}
        self._shared: set[str] = set()  # tables a View holds: copied before the next write
        self._tombstones: dict[str, int] = {}  # key → revision it was deleted at (locally)
        self.ready: set[str] = set()  # nodes whose heartbeat says their engine answers
        self.alive: set[str] = set()  # nodes whose agent holds its heartbeat lease
        self.by_app: dict[str, dict[str, Versioned[Instance]]] = {}  # `ns/app` → key → inst
        self.by_node: dict[str, set[str]] = {}  # node → keys of instances on it or moving there
        self.usage: dict[str, NodeUsage] = {}
        self._subscribers: list[Subscriber] = []
        self._advanced = asyncio.Condition()
        self._kinds = {k: v for k, v in KINDS.items() if k not in set(ignore)}
        self._prefixes = sorted(((self.base + p, kind, cls)
                                 for kind, (p, cls) in self._kinds.items()),
                                key=lambda t: -len(t[0]))

    # -- reading ----------------------------------------------------------------------------

    def table(self, kind: str) -> Mapping[str, Versioned[Any]]:
        """The current records of `kind` (read-only; it changes as the cache does)."""
        return self._tables[kind]

    def get(self, kind: str, key: str) -> Versioned[Any] | None:
        return self._tables[kind].get(key)

    def nodes(self) -> Mapping[str, Versioned[Node]]:
        return self._tables[NODES]

    def node(self, name: str) -> Node | None:
        v = self._tables[NODES].get(self.keys.node(name))
        return v.value if v else None

    def apps(self) -> Mapping[str, Versioned[AppRecord]]:
        return self._tables[APPS]

    def app(self, app_key: str) -> Versioned[AppRecord] | None:
        ns, _, name = app_key.partition("/")
        v: Versioned[AppRecord] | None = self._tables[APPS].get(self.keys.app(ns, name))
        return v

    def instances(self) -> Mapping[str, Versioned[Instance]]:
        return self._tables[INSTANCES]

    def instance(self, key: str) -> Versioned[Instance] | None:
        v: Versioned[Instance] | None = self._tables[INSTANCES].get(key)
        return v

    def instances_of(self, app_key: str) -> Mapping[str, Versioned[Instance]]:
        """The instances of `ns/app` by record key (read-only)."""
        return self.by_app.get(app_key, {})

    def ordered(self, app_key: str) -> list[Versioned[Instance]]:
        """The instances of `ns/app` by index. (Safe from another thread, as every reader
        here: dicts and sets are copied in one C call before Python code walks them.)"""
        found = list(self.by_app.get(app_key, {}).values())
        found.sort(key=lambda v: v.value.index)
        return found

    def instances_on(self, node: str) -> list[Versioned[Instance]]:
        """The instances bound to `node` or moving to it."""
        table = self._tables[INSTANCES]
        found = (table.get(k) for k in list(self.by_node.get(node, ())))
        return [v for v in found if v is not None]

    def view(self) -> View:
        """An immutable snapshot of every table at the current revision."""
        self._shared.update(KINDS)
        return View(self.revision, dict(self._tables), frozenset(self.ready))

    def stale_for(self) -> float:
        """Seconds since the watch broke (0 while it is live)."""
        return time.monotonic() - self.broken_since if self.broken_since else 0.0

    def subscribe(self, fn: Subscriber) -> None:
        """Call `fn(kind, key, old, new)` after every change (new None: deleted). Safe from
        another thread: the list is replaced, never changed under a loop that walks it."""
        self._subscribers = [*self._subscribers, fn]

    def unsubscribe(self, fn: Subscriber) -> None:
        self._subscribers = [f for f in self._subscribers if f is not fn]

    async def wait_for(self, revision: int, timeout: float = 10.0) -> bool:
        """Until the cache has seen `revision` (False after `timeout` seconds)."""
        async def seen() -> None:
            async with self._advanced:
                await self._advanced.wait_for(lambda: self.revision >= revision)

        try:
            await asyncio.wait_for(seen(), timeout)
        except TimeoutError:
            return False
        return True

    # -- filling ----------------------------------------------------------------------------

    async def run(self) -> None:
        """List, then watch, until cancelled; relist when the watch cannot resume."""
        while True:
            try:
                await self._list()
                self.broken_since = 0.0
                async for batch in self.store.watch_batches(self.base, self.revision + 1):
                    if batch.broken:
                        self.broken_since = self.broken_since or time.monotonic()
                        continue
                    self.broken_since = 0.0
                    self._apply_batch(batch)
                    async with self._advanced:
                        self._advanced.notify_all()
            except WatchCompacted as exc:
                log.warning("cache: watch history compacted (%s): relisting", exc)
            except SigmaError as exc:
                log.warning("cache: %s; relisting in %gs", exc.message, RELIST_DELAY)
                self.broken_since = self.broken_since or time.monotonic()
                await asyncio.sleep(RELIST_DELAY)
            except Exception:
                log.exception("cache: the watch failed; relisting in %gs", RELIST_DELAY)
                self.broken_since = self.broken_since or time.monotonic()
                await asyncio.sleep(RELIST_DELAY)

    async def _list(self) -> None:
        """Read every kind at one revision and replace the tables, telling subscribers what
        changed since the last list."""
        fresh: dict[str, dict[str, Versioned[Any]]] = {}
        revision = 0
        for kind, (part, cls) in self._kinds.items():
            if kind == LEADER:
                items, revision = await self.store.range_raw(self.base + part, limit=1,
                                                             revision=revision)
                items = [i for i in items if i.key == self.base + part]
            else:
                items, revision = await self.store.range_raw(self.base + part,
                                                             revision=revision)
            table = fresh[kind] = {}
            for n, i in enumerate(items, 1):
                record = _decode(cls, i.value, i.key)
                if record is not MALFORMED:
                    table[i.key] = Versioned(i.key, record, i.mod_revision)
                elif i.key in self._tables[kind]:
                    table[i.key] = self._tables[kind][i.key]  # keep what it was
                if n % LIST_CHUNK == 0:
                    await asyncio.sleep(0)  # a big list must not hold the loop
        changes: list[Change] = []
        for kind, table in fresh.items():
            # (what this process wrote while the list was read is newer: it stays)
            before = self._tables[kind]
            changes += [(kind, k, before.get(k), v) for k, v in table.items()
                        if k not in before or before[k].mod_revision < v.mod_revision]
            changes += [(kind, k, v, None) for k, v in before.items()
                        if k not in table and v.mod_revision <= revision]
        self._tombstones.clear()
        self.revision = revision
        for kind, key, old, new in changes:
            self._set(kind, key, old, new)
        self.synced.set()
        log.info("cache: %d records at revision %d", sum(map(len, fresh.values())), revision)
        async with self._advanced:
            self._advanced.notify_all()

    def _apply_batch(self, batch: WatchBatch) -> None:
        for event in batch.events:
            found = self._kind(event.key)
            if found is None:
                continue
            kind, cls = found
            if event.value is None:
                self._remove(kind, event.key, event.mod_revision)
            else:
                self._put(kind, event.key, event.mod_revision, cls, event.value)
        self.revision = max(self.revision, batch.revision)
        if self._tombstones:
            self._tombstones = {k: r for k, r in self._tombstones.items() if r > self.revision}

    def written(self, revision: int, ops: Iterable[Op]) -> None:
        """Apply this process's own committed write (a transaction at `revision`) at once."""
        for op in ops:
            found = self._kind(op.key)
            if found is None:
                continue
            kind, cls = found
            if op.delete:
                self._remove(kind, op.key, revision, local=True)
            else:
                self._put(kind, op.key, revision, cls, record=op.record if cls else None)

    def _kind(self, key: str) -> tuple[str, type | None] | None:
        for prefix, kind, cls in self._prefixes:
            if key.startswith(prefix) and (kind != LEADER or key == prefix):
                return kind, cls
        return None

    def _put(self, kind: str, key: str, revision: int, cls: type | None,
             data: bytes = b"", record: Any = None) -> None:
        """Store `record` (or, decoded, `data`) at `key` as of `revision`, unless the cache
        already holds that revision or a later one (or deleted it later)."""
        old = self._tables[kind].get(key)
        if (old is not None and old.mod_revision >= revision) or \
                self._tombstones.get(key, 0) >= revision:
            return
        if data:
            record = _decode(cls, data, key)
            if record is MALFORMED:
                return  # (logged) the last good record stays
        self._set(kind, key, old, Versioned(key, record, revision))

    def _remove(self, kind: str, key: str, revision: int, local: bool = False) -> None:
        old = self._tables[kind].get(key)
        if old is not None and old.mod_revision > revision:
            return
        if local:
            self._tombstones[key] = revision
        else:
            self._tombstones.pop(key, None)
        if old is not None:
            self._set(kind, key, old, None)

    def _set(self, kind: str, key: str, old: Versioned[Any] | None,
             new: Versioned[Any] | None) -> None:
        """Store one change, keep the indexes in step, tell the subscribers."""
        if kind in self._shared:
            self._tables[kind] = dict(self._tables[kind])
            self._shared.discard(kind)
        table = self._tables[kind]
        if new is None:
            table.pop(key, None)
        else:
            table[key] = new
        if kind == INSTANCES:
            self._index(key, old, new)
        elif kind == BEATS:
            name = key.rsplit("/", 1)[-1]
            if new is None:
                self.alive.discard(name)
            else:
                self.alive.add(name)
            if new is not None and new.value.engine:
                self.ready.add(name)
            else:
                self.ready.discard(name)
        for fn in self._subscribers:
            try:
                fn(kind, key, old, new)
            except Exception:
                log.exception("cache subscriber failed on %s", key)

    def _index(self, key: str, old: Versioned[Instance] | None,
               new: Versioned[Instance] | None) -> None:
        for v, sign in ((old, -1), (new, 1)):
            if v is None:
                continue
            inst = v.value
            app = self.by_app.setdefault(inst.app_key, {})
            if sign > 0:
                app[key] = v
            else:
                app.pop(key, None)
                if not app:
                    self.by_app.pop(inst.app_key, None)
            for node, ports in ((inst.node, inst.host_ports), (inst.next_node, inst.next_ports)):
                if not node:
                    continue
                keys = self.by_node.setdefault(node, set())
                if sign > 0:
                    keys.add(key)
                else:
                    keys.discard(key)
                self.usage.setdefault(node, NodeUsage()).add(inst.request, inst.app_key,
                                                            ports.values(), sign)


def _decode(cls: type | None, data: bytes, key: str) -> Any:
    """The record at `key`, or MALFORMED (logged) when it is not one of `cls`: one bad value
    written by hand must not stop the cache from loading everything else."""
    if cls is None:
        return None
    try:
        return records.loads(cls, data)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        log.error("cache: %s is not a valid %s record (%s): ignored; fix or delete the key",
                  key, cls.__name__, exc)
        return MALFORMED
