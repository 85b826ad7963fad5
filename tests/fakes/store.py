"""An in-memory Store for unit tests: etcd's semantics where sigma relies on them.

- one revision counter; a transaction is all-or-nothing and gives every key it writes the
  new revision (mod_revision); guards compare mod_revision (0: absent) like etcd's;
- the fence (the leader key as won) is compared by every write, and a failed fence raises
  `Deposed` exactly as the etcd store does (sigmad.store.StoreOps.commit);
- at most MAX_TXN_OPS compares and ops per transaction, and no key twice in one (etcd's
  "duplicate key" refusal);
- watches get every change in revision order from their start revision; `compact(r)` makes
  older start revisions fail with WatchCompacted; `break_watches()` breaks live streams
  (they say so, then resume);
- leases: `expire(lease)` deletes the lease's keys (as a lapsed TTL would);
- `fail_next(n)` makes the next n calls raise StoreUnavailable (an outage);
- a range read at an older revision replays the history (as etcd's MVCC answers it), and
  fails once anything was compacted.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from sigmad import records
from sigmad.errors import StoreUnavailable
from sigmad.store import (
    MAX_TXN_OPS,
    Claim,
    Guard,
    Item,
    Keys,
    Op,
    Outcome,
    Span,
    StoreOps,
    WatchBatch,
    WatchCompacted,
    WatchEvent,
)


@dataclass
class _Entry:
    value: bytes
    mod_revision: int
    lease: int = 0


class MemoryStore(StoreOps):
    """See the module docstring."""

    def __init__(self, prefix: str = "/sigma/v1") -> None:
        self.keys = Keys(prefix)
        self.fence: Guard | None = None
        self.on_deposed = None
        self.revision = 1
        self.data: dict[str, _Entry] = {}
        self.history: list[tuple[int, WatchEvent]] = []
        self.compacted = 0
        self.leases: dict[int, int] = {}  # lease → ttl
        self._lease_ids = itertools.count(1000)
        self._changed = asyncio.Condition()
        self._breaks = 0
        self._failures = 0
        self.transactions = 0
        self.spans = 0  # range reads by `span`
        self.items_read = 0  # keys answered by range reads (range_raw and span)

    # -- test controls ------------------------------------------------------------------------

    def fail_next(self, n: int = 1) -> None:
        self._failures += n

    def _check(self) -> None:
        if self._failures:
            self._failures -= 1
            raise StoreUnavailable("etcd is unreachable (memory store told to fail)")

    async def compact(self, revision: int) -> int:
        """History up to `revision` goes: a watch from there on fails with WatchCompacted."""
        self._check()
        if revision <= self.compacted:
            return 0
        self.compacted = revision
        self.history = [(r, e) for r, e in self.history if r > revision]
        return revision

    async def break_watches(self) -> None:
        self._breaks += 1
        async with self._changed:
            self._changed.notify_all()

    async def expire(self, lease: int) -> None:
        """The lease lapsed: its keys go."""
        self.leases.pop(lease, None)
        gone = [k for k, e in self.data.items() if e.lease == lease]
        if gone:
            await self._apply([Op(k, delete=True) for k in gone])

    def value(self, key: str, cls: type) -> Any:
        """The record at `key` (None if absent)."""
        entry = self.data.get(key)
        return None if entry is None else records.loads(cls, entry.value)

    # -- primitives ---------------------------------------------------------------------------

    async def close(self) -> None:
        return None

    async def ping(self) -> int:
        self._check()
        return self.revision

    async def get_raw(self, key: str) -> Item | None:
        self._check()
        e = self.data.get(key)
        return None if e is None else Item(key, e.value, e.mod_revision, e.lease)

    async def range_raw(self, prefix: str, keys_only: bool = False, limit: int = 0,
                        revision: int = 0) -> tuple[list[Item], int]:
        self._check()
        data = self.data if not revision or revision >= self.revision else \
            self._as_of(revision)
        items = [Item(k, b"" if keys_only else e.value, e.mod_revision, e.lease)
                 for k, e in sorted(data.items()) if k.startswith(prefix)]
        items = items[:limit] if limit else items
        self.items_read += len(items)
        return items, revision or self.revision

    def _as_of(self, revision: int) -> dict[str, _Entry]:
        """Every key as it was at `revision`, replayed from the history (leases not kept)."""
        if self.compacted:
            raise StoreUnavailable("etcd refused range: etcdserver: mvcc: required revision "
                                   "has been compacted")
        data: dict[str, _Entry] = {}
        for r, e in self.history:
            if r > revision:
                break
            if e.value is None:
                data.pop(e.key, None)
            else:
                data[e.key] = _Entry(e.value, e.mod_revision)
        return data

    async def span(self, start: str, end: str, limit: int, revision: int = 0) -> Span:
        self._check()
        self.spans += 1
        keys = [k for k in sorted(self.data) if start <= k < end]
        self.items_read += min(limit, len(keys))
        return Span([Item(k, self.data[k].value, self.data[k].mod_revision, self.data[k].lease)
                     for k in keys[:limit]], self.revision, len(keys) > limit)

    def _holds(self, g: Guard) -> bool:
        e = self.data.get(g.key)
        if g.mod_revision < 0:
            return False
        if g.mod_revision == 0:
            return e is None
        return e is not None and e.mod_revision == g.mod_revision

    async def txn(self, guards: Sequence[Guard], ops: Sequence[Op]) -> Outcome:
        self._check()
        compares = [*guards, *([self.fence] if self.fence else [])]
        if len(compares) > MAX_TXN_OPS or len(ops) > MAX_TXN_OPS:
            raise StoreUnavailable("etcd refused transaction: etcdserver: too many operations "
                                   "in txn request")
        keys = [op.key for op in ops]
        if len(keys) != len(set(keys)):
            raise StoreUnavailable("etcd refused transaction: etcdserver: duplicate key given "
                                   "in txn request")
        self.transactions += 1
        if not all(self._holds(g) for g in compares):
            return Outcome(0, self.fence is None or self._holds(self.fence))
        return Outcome(await self._apply(ops))

    async def _apply(self, ops: Sequence[Op]) -> int:
        self.revision += 1
        for op in ops:
            if op.delete:
                if self.data.pop(op.key, None) is not None:
                    self.history.append((self.revision,
                                         WatchEvent(op.key, None, self.revision)))
            else:
                self.data[op.key] = _Entry(op.encoded(), self.revision, op.lease)
                self.history.append((self.revision,
                                     WatchEvent(op.key, op.encoded(), self.revision)))
        async with self._changed:
            self._changed.notify_all()
        return self.revision

    async def claim(self, key: str, record: Any, lease: int) -> Claim:
        self._check()
        e = self.data.get(key)
        if e is None:
            revision = await self._apply([Op(key, record, lease=lease)])
            return Claim(revision, revision)
        return Claim(e.mod_revision if e.lease == lease else 0, self.revision)

    async def watch_batches(self, prefix: str, start_revision: int,
                            end: str | None = None) -> AsyncIterator[WatchBatch]:
        if start_revision <= self.compacted:
            raise WatchCompacted(prefix, self.compacted)
        seen = start_revision - 1
        breaks = self._breaks
        yield WatchBatch(self.revision, [])

        def wanted(key: str) -> bool:
            if end == "":
                return key == prefix
            return key.startswith(prefix)

        while True:
            events = [e for r, e in self.history if r > seen and wanted(e.key)]
            if events:
                seen = events[-1].mod_revision
                yield WatchBatch(self.revision, events)
                continue
            async with self._changed:
                await self._changed.wait()
            if self._breaks != breaks:
                breaks = self._breaks
                yield WatchBatch(0, [], broken=True)
                if seen < self.compacted:  # resuming from a revision that is gone
                    raise WatchCompacted(prefix, self.compacted)

    async def grant(self, ttl: int) -> int:
        self._check()
        lease = next(self._lease_ids)
        self.leases[lease] = ttl
        return lease

    async def keepalive(self, lease_id: int) -> bool:
        self._check()
        return lease_id in self.leases

    async def revoke(self, lease_id: int) -> None:
        self._check()
        await self.expire(lease_id)
