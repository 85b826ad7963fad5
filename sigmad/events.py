"""Events: what happened and why, kept in etcd under leased keys (they expire on their own).

`EventLog.emit` never blocks and never fails the caller: events are written by a background
task, and one that cannot be written is logged and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass

from sigmad.errors import SigmaError
from sigmad.store import Store

log = logging.getLogger(__name__)
EVENT_TTL = 3600  # seconds an event is kept
LEASE_ROTATE = 600  # a new lease every 10 min: events live between 50 and 60 min
QUEUE_MAX = 10_000


@dataclass
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

    def emit(self, kind: str, namespace: str, name: str, app: str, message: str,
             warning: bool = False) -> None:
        event = Event(time.time(), kind, namespace, name, app,
                      "Warning" if warning else "Normal", message)
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(event)

    async def run(self) -> None:
        """Write queued events until cancelled."""
        while True:
            event = await self.queue.get()
            try:
                if not self.lease or time.monotonic() - self.lease_at > LEASE_ROTATE:
                    self.lease = await self.store.grant(EVENT_TTL)
                    self.lease_at = time.monotonic()
                key = f"{self.store.keys.events()}{int(event.time * 1e6):017d}-{next(self.seq)}"
                await self.store.put(key, event, lease=self.lease)
            except SigmaError as exc:
                log.warning("event dropped (%s): %s", exc.message, event.message)
                self.lease = 0
