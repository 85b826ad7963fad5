"""Events: what happened and why, kept in etcd under leased keys (they expire on their own).

`EventLog.emit` never blocks and never fails the caller: events are written by a background
task, many to a transaction, and those that cannot be written are logged and dropped (as are
events beyond QUEUE_MAX waiting: a burst never grows memory without bound).

Invariants:
- an event's key is `events/{time in microseconds, 17 digits}-{seq}`: key order is time
  order, so the newest events are read by range without reading the older ones;
- retention is bounded by age: every event is leased, and lives 50 to 60 minutes;
- a read (`recent`) makes at most MAX_READS range reads of at most PAGE keys each, however
  many events etcd holds and however few of them match.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sigmad import records
from sigmad.errors import SigmaError
from sigmad.store import MAX_TXN_OPS, Op, Store, prefix_end

log = logging.getLogger(__name__)
EVENT_TTL = 3600  # seconds an event is kept
LEASE_ROTATE = 600  # a new lease every 10 min: events live between 50 and 60 min
QUEUE_MAX = 50_000
MAX_LIMIT = 1000  # events one read answers at most
PAGE = 500  # keys one range read returns at most
MAX_READS = 64  # range reads one read of events makes at most
FIRST_WINDOW = 10.0  # seconds of the newest events read first; it grows while sparse


@dataclass(slots=True)
class Event:
    time: float
    kind: str  # "instance" | "node" | "app"
    namespace: str
    name: str  # instance APP-INDEX, node name or app name
    app: str
    type: str  # "Normal" | "Warning"
    message: str


class EventLog:
    """Buffers events and writes them to `events/{time}-{seq}` under a rotating lease."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.queue: asyncio.Queue[Event] = asyncio.Queue(QUEUE_MAX)
        self.seq = itertools.count()
        self.lease = 0
        self.lease_at = 0.0
        self.dropped = 0

    def emit(self, kind: str, namespace: str, name: str, app: str, message: str,
             warning: bool = False) -> None:
        event = Event(time.time(), kind, namespace, name, app,
                      "Warning" if warning else "Normal", message)
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1

    async def run(self) -> None:
        """Write queued events until cancelled."""
        while True:
            batch = [await self.queue.get()]
            while len(batch) < MAX_TXN_OPS and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                if not self.lease or time.monotonic() - self.lease_at > LEASE_ROTATE:
                    self.lease = await self.store.grant(EVENT_TTL)
                    self.lease_at = time.monotonic()
                prefix = self.store.keys.events()
                await self.store.commit([], [
                    Op(f"{_at(prefix, e.time)}-{next(self.seq)}", e, lease=self.lease)
                    for e in batch
                ])
            except SigmaError as exc:
                log.warning("%d events dropped (%s), e.g. %s", len(batch), exc.message,
                            batch[0].message)
                self.lease = 0


def _at(prefix: str, when: float) -> str:
    """The key bound of time `when` (seconds): every event at or after it sorts after it."""
    return f"{prefix}{max(0, int(when * 1e6)):017d}"


def decode(data: bytes) -> Event | None:
    """The event in `data`; None for anything else found under events/ (it is skipped)."""
    try:
        return records.loads(Event, data)
    except (TypeError, ValueError):
        return None


def _time(prefix: str, key: str) -> float:
    """The time (seconds) in an event's key (0 if it holds none)."""
    digits = key[len(prefix):len(prefix) + 17]
    return int(digits) / 1e6 if digits.isdigit() else 0.0


@dataclass
class Recent:
    """An answer of `recent`: the events oldest first, the store revision they were read at,
    and whether older matching events may exist that were not read (`more`)."""

    items: list[Event]
    revision: int
    more: bool


async def recent(store: Store, limit: int, match: Callable[[Event], bool],
                 since: int = 0, now: float | None = None) -> Recent:
    """The newest `limit` (at most MAX_LIMIT) events that `match` and were written after
    store revision `since`, oldest first.

    Read backwards in time windows, each one range read: a window that holds more than PAGE
    keys is narrowed (to half of what its first PAGE keys span, or less) and read again, one
    with few keys doubles the next. It stops at `limit` events, below the oldest time an
    event may live, at a window written entirely at or before `since`, or after MAX_READS
    reads (then `more` is set)."""
    limit = min(limit, MAX_LIMIT)
    prefix = store.keys.events()
    now = time.time() if now is None else now
    floor = now - 2 * EVENT_TTL  # older keys are long expired (a clock may be off: margin)
    found: list[Event] = []
    revision = 0
    high, width = prefix_end(prefix), FIRST_WINDOW  # `high`: the newest key not yet read
    start = now
    if limit <= 0:
        return Recent([], (await store.span(prefix, high, 1)).revision, False)
    for _ in range(MAX_READS):
        low = prefix if start - width < floor else _at(prefix, start - width)
        span = await store.span(low, high, PAGE, revision)
        revision = span.revision
        if span.more and width > 1e-6:  # too many: about half a page, as dense as this one
            covered = _time(prefix, span.items[-1].key) - _time(prefix, span.items[0].key)
            width = max(1e-6, min(width, covered if covered > 0 else width) / 2)
            continue
        newer = False
        for item in reversed(span.items):
            if item.mod_revision <= since:
                continue
            newer = True
            event = decode(item.value)
            if event is not None and match(event):
                found.append(event)
                if len(found) == limit:
                    return Recent(found[::-1], revision, True)
        if low == prefix or (since and not newer and span.items):
            return Recent(found[::-1], revision, False)
        high, start = low, start - width
        if len(span.items) < PAGE // 4:
            width *= 2
    return Recent(found[::-1], revision, True)
