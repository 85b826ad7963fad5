"""Events: what happened and why, kept in etcd under leased keys (they expire on their own).

`EventLog.emit` never blocks and never fails the caller: events are written by a background
task, many to a transaction, and those that cannot be written are logged and dropped (as are
events beyond QUEUE_MAX waiting: a burst never grows memory without bound).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass

from sigmad.errors import SigmaError
from sigmad.store import MAX_TXN_OPS, Op, Store

log = logging.getLogger(__name__)
EVENT_TTL = 3600  # seconds an event is kept
LEASE_ROTATE = 600  # a new lease every 10 min: events live between 50 and 60 min
QUEUE_MAX = 50_000


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
                    Op(f"{prefix}{int(e.time * 1e6):017d}-{next(self.seq)}", e, lease=self.lease)
                    for e in batch
                ])
            except SigmaError as exc:
                log.warning("%d events dropped (%s), e.g. %s", len(batch), exc.message,
                            batch[0].message)
                self.lease = 0
