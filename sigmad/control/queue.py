"""A work queue of keys (the shape of Kubernetes' client-go workqueue).

Invariants:
- a key is queued at most once, however often it is added;
- a key is processed by at most one worker at a time: added while it is being processed,
  it is queued again when that worker calls `done`;
- `add_rate_limited` retries a key after a delay that doubles with each failure in a row
  (per key, from BASE to MAX seconds) until `forget` resets it;
- low-priority adds (the periodic resync) are handed out only when no normal work waits.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
BASE_DELAY = 0.05
MAX_DELAY = 30.0


class WorkQueue(Generic[K]):
    """Keys to process, each once at a time, with per-key rate-limited retry."""

    def __init__(self, base_delay: float = BASE_DELAY, max_delay: float = MAX_DELAY) -> None:
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._high: collections.deque[K] = collections.deque()
        self._low: collections.deque[K] = collections.deque()
        self._queued: dict[K, bool] = {}  # key → queued at low priority only
        self._processing: set[K] = set()
        self._dirty: set[K] = set()  # added while processing: queue again on done
        self._failures: dict[K, int] = {}
        self._timers: dict[K, asyncio.TimerHandle] = {}
        self._ready = asyncio.Event()
        self.adds = 0
        self.retries = 0

    def __len__(self) -> int:
        return len(self._queued)

    @property
    def busy(self) -> int:
        return len(self._processing)

    @property
    def low(self) -> int:
        """Keys queued at low priority only."""
        return len(self._low)

    def add(self, key: K, low: bool = False) -> None:
        """Queue `key` (low: only when nothing else waits)."""
        self.adds += 1
        if key in self._processing:
            self._dirty.add(key)
            return
        if key in self._queued:
            if not low and self._queued[key]:  # promote: someone needs it now (the stale
                self._queued[key] = False      # low entry is skipped when it comes up)
                self._high.append(key)
            return
        self._queued[key] = low
        (self._low if low else self._high).append(key)
        self._ready.set()

    def add_after(self, key: K, delay: float) -> None:
        """Queue `key` in `delay` seconds (at once if `delay` <= 0); an earlier timer for
        the key wins."""
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        timer = self._timers.get(key)
        if timer is not None and not timer.cancelled() and timer.when() <= when:
            return
        if timer is not None:
            timer.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def add_rate_limited(self, key: K) -> None:
        """Queue `key` again after its back-off (it failed)."""
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        self.retries += 1
        self.add_after(key, min(self.base_delay * 2 ** n, self.max_delay))

    def forget(self, key: K) -> None:
        """`key` succeeded: its next failure starts the back-off afresh."""
        self._failures.pop(key, None)

    def failures(self, key: K) -> int:
        return self._failures.get(key, 0)

    async def get(self) -> K:
        """The next key to process (waits for one); call `done` with it afterwards."""
        while True:
            while not self._high and not self._low:
                self._ready.clear()
                await self._ready.wait()
            if self._high:
                key = self._high.popleft()
                break
            key = self._low.popleft()
            if self._queued.get(key):  # still low: not promoted since
                break
        del self._queued[key]
        self._processing.add(key)
        if self._high or self._low:
            self._ready.set()
        return key

    def done(self, key: K) -> None:
        """`key` is processed; queued again if it was added meanwhile."""
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
