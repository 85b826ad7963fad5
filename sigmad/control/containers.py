"""The sigma containers of one node's engine, kept current (an informer for an engine): listed
once, then followed through the engine's event stream, relisted whenever the stream breaks.

Invariants:
- `of(instance)` answers from memory: driving an instance never lists its engine;
- a change is reported (`on_change(node, instance key)`) only when what is known of a
  container really changed, so the leader's own create/start (recorded at once with `put`)
  do not come back as work when their events arrive;
- a container that ended is inspected once, so its end reason is the engine's own
  (OOMKilled, the exit code, the signal), even when it ended while no master watched;
- events are replayed from one second before the list, so nothing between the list and the
  stream is missed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sigmad.engine import LABEL_INSTANCE, ContainerState, Engine
from sigmad.errors import EngineError

log = logging.getLogger(__name__)
RETRY_MAX = 30.0
SETTLE = 2.0  # seconds a create or start event waits for the call that caused it to return
ENDED = frozenset({"die", "oom", "stop", "kill"})


def rfc3339(at: float | None = None) -> str:
    """Docker's time format (nanoseconds), for a time sigma recorded itself."""
    stamp = datetime.fromtimestamp(time.time() if at is None else at, UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


class EngineWatch:
    """What runs on one node's engine (see the module docstring)."""

    def __init__(self, node: str, engine: Engine, on_change: Callable[[str, str], None]) -> None:
        self.node = node
        self.engine = engine
        self.on_change = on_change
        self.synced = asyncio.Event()
        self._by_id: dict[str, ContainerState] = {}
        self._by_instance: dict[str, dict[str, ContainerState]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def of(self, instance: str) -> list[ContainerState]:
        """The containers of `instance` (`ns/app-i`) on this engine."""
        return list(self._by_instance.get(instance, {}).values())

    def instances(self) -> list[str]:
        """Every instance with a container here."""
        return list(self._by_instance)

    def put(self, c: ContainerState) -> bool:
        """Record what is known of a container now; whether that changed anything."""
        old = self._by_id.get(c.id)
        if old == c:
            return False
        self._by_id[c.id] = c
        if old is not None:
            self._forget(old)
        self._by_instance.setdefault(c.labels.get(LABEL_INSTANCE, ""), {})[c.id] = c
        return True

    def drop(self, container_id: str) -> bool:
        """The container is gone; whether it was known."""
        c = self._by_id.pop(container_id, None)
        if c is None:
            return False
        self._forget(c)
        return True

    def _forget(self, c: ContainerState) -> None:
        owner = c.labels.get(LABEL_INSTANCE, "")
        mine = self._by_instance.get(owner)
        if mine is not None:
            mine.pop(c.id, None)
            if not mine:
                del self._by_instance[owner]

    async def run(self) -> None:
        """List and follow until cancelled; relist after the stream breaks (backing off
        while the engine cannot be reached)."""
        delay = 0.5
        try:
            while True:
                since = time.time() - 1.0
                try:
                    await self._list()
                    delay = 0.5
                    async for event in self.engine.events({LABEL_INSTANCE: ""}, since):
                        self._event(event)
                except EngineError as exc:
                    log.debug("node %s: engine watch: %s", self.node, exc.message)
                except Exception:
                    log.exception("node %s: the engine watch failed", self.node)
                self.synced.clear()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
        finally:
            for task in list(self._tasks):
                task.cancel()

    async def _list(self) -> None:
        found = {c.id: c for c in await self.engine.containers({LABEL_INSTANCE: ""})}
        for cid in [cid for cid in self._by_id if cid not in found]:
            c = self._by_id[cid]
            self.drop(cid)
            self._changed(c)
        for c in found.values():
            old = self._by_id.get(c.id)
            if old is not None and old.running == c.running and old.status == c.status:
                continue  # known as it is (with more detail than a list gives)
            if not c.running and c.status != "created":
                self._inspect(c.id)
            elif self.put(c):
                self._changed(c)
        self.synced.set()

    def _event(self, event: dict[str, Any]) -> None:
        action = str(event.get("status") or event.get("Action") or "")
        cid = str(event.get("id") or (event.get("Actor") or {}).get("ID") or "")
        if not cid:
            return
        known = self._by_id.get(cid)
        if action == "destroy":
            if self.drop(cid) and known is not None:
                self._changed(known)
        elif action in ENDED:
            if known is None or known.running or not known.full:
                self._inspect(cid)
        elif action == "start":
            if known is None or not known.running:
                self._inspect(cid, lambda c: c is not None and c.running)
        elif action == "create" and known is None:
            self._inspect(cid, lambda c: c is not None)

    def _inspect(self, cid: str, said: Callable[[ContainerState | None], bool] | None = None
                 ) -> None:
        """Inspect `cid` in the background and record what it says. With `said`: a moment
        later, and only if what is known of it by then does not already say what the event
        did (the leader's own create and start are recorded when their calls return, which
        is often just after their events arrive)."""
        async def inspect() -> None:
            if said is not None:
                await asyncio.sleep(SETTLE)
                if said(self._by_id.get(cid)):
                    return
            try:
                c = await self.engine.inspect(cid)
            except EngineError as exc:
                log.debug("node %s: inspect %s: %s", self.node, cid[:12], exc.message)
                return
            if c is None:
                known = self._by_id.get(cid)
                if self.drop(cid) and known is not None:
                    self._changed(known)
            elif self.put(c):
                self._changed(c)

        task = asyncio.create_task(inspect())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _changed(self, c: ContainerState) -> None:
        owner = c.labels.get(LABEL_INSTANCE, "")
        if owner:
            self.on_change(self.node, owner)


def started(c: ContainerState, at: float | None = None) -> ContainerState:
    """`c` as just started by the leader (running, with the time it recorded)."""
    return dataclasses.replace(c, running=True, status="running", started_at=rfc3339(at),
                               finished_at="", exit_code=0)
