"""etcd history compaction, run by the leader: etcd keeps every old version of every key
until it is compacted, so without it the database only grows.

Invariants:
- every `interval` seconds the leader samples etcd's revision, and compacts at the newest
  sampled revision that is at least `keep` seconds old: the last `keep` seconds of history
  always stay (a watch that falls further behind fails with WatchCompacted, and its cache
  relists: sigmad.state.cache);
- the compacted revision only moves forward, and at most `keep / interval + 1` samples are
  held; a compaction etcd already did (its own auto-compaction) is no error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from sigmad.errors import SigmaError
from sigmad.metrics import Metrics
from sigmad.store import Store

log = logging.getLogger(__name__)
Sample = tuple[float, int]  # (monotonic time, etcd revision then)


def target(samples: deque[Sample], now: float, keep: float) -> int:
    """The revision to compact at: the newest sample at least `keep` seconds old (0: none
    is). The samples up to it are dropped: later targets are newer."""
    found = 0
    while samples and now - samples[0][0] >= keep:
        found = samples.popleft()[1]
    return found


class Compactor:
    """Compacts the history of `store` while this master leads (see the module docstring)."""

    def __init__(self, store: Store, keep: float, interval: float, metrics: Metrics) -> None:
        self.store = store
        self.keep = keep
        self.interval = interval
        self.metrics = metrics
        self.samples: deque[Sample] = deque()
        self.compacted = 0

    async def step(self, now: float) -> None:
        """Sample the revision (at monotonic time `now`); compact what is `keep` seconds
        old."""
        self.samples.append((now, await self.store.ping()))
        revision = target(self.samples, now, self.keep)
        if revision <= self.compacted:
            return
        await self.store.compact(revision)
        self.compacted = self.metrics.etcd_compacted_revision = revision
        log.debug("etcd history compacted at revision %d (%gs kept)", revision, self.keep)

    async def run(self) -> None:
        """Step every `interval` seconds until cancelled; etcd trouble is logged and the next
        step tries again."""
        while True:
            try:
                await self.step(time.monotonic())
            except SigmaError as exc:
                log.warning("etcd compaction failed (%s); trying again in %gs", exc.message,
                            self.interval)
            await asyncio.sleep(self.interval)
