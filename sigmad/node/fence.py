"""Self-fencing (DESIGN.md §6): an agent that cannot renew its heartbeat lease stops its
own instances' containers before the lease can lapse, so that when the master sees the
lease lapse (and waits its `fence_grace` more) no copy of them runs here any more.

Invariants:
- the deadline counts from when the last renewal that etcd answered was *sent*: etcd counts
  the lease's TTL from when it received it, which is later, so the lease outlives the
  deadline;
- the fence fires `margin(ttl)` seconds before that TTL is up and kills at once (a fence
  does not wait for a graceful stop), so it is done before the lease can lapse;
- it is armed by the first lease and fires once per lapse: a renewal (or a new lease)
  re-arms it. (A fence that fired although the lease was renewed in time after all leaves
  the node Ready: the master sees its containers end and applies their restart policy.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from sigmad.engine import LABEL_INSTANCE, Engine
from sigmad.errors import EngineError

log = logging.getLogger(__name__)
Clock = Callable[[], float]


def margin(ttl: float) -> float:
    """Seconds before the lease's TTL is up at which the fence fires: a quarter of the TTL,
    at least half a second (the time to kill the containers)."""
    return max(0.5, ttl / 4)


class SelfFence:
    """Watches the lease's renewals and stops this engine's sigma containers when they
    stop (see the module docstring). `engine` gives the agent's current engine client."""

    def __init__(self, engine: Callable[[], Engine], ttl: float,
                 clock: Clock = time.monotonic) -> None:
        self.engine = engine
        self.ttl = ttl
        self.clock = clock
        self.renewed_at: float | None = None  # when the last renewal etcd answered was sent
        self.fired = False  # fired since the last renewal
        self.fired_at = 0.0  # when the last fence began, and when it was done
        self.done_at = 0.0
        self.stopped: list[str] = []  # the containers the last fence stopped
        self._renewed = asyncio.Event()

    def renewed(self, sent: float) -> None:
        """A renewal sent at `sent` (clock time) was answered: the lease lives until at
        least `sent + ttl`."""
        self.renewed_at = max(self.renewed_at or sent, sent)
        self.fired = False
        self._renewed.set()

    def deadline(self) -> float:
        """When the fence fires unless a renewal comes first (never before a lease)."""
        if self.renewed_at is None:
            return float("inf")
        return self.renewed_at + self.ttl - margin(self.ttl)

    async def run(self) -> None:
        """Fire at each deadline that no renewal moved (until cancelled)."""
        while True:
            self._renewed.clear()
            wait = self.deadline() - self.clock()
            if wait > 0 or self.fired:
                # a renewal re-arms it early; else look again at the deadline
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._renewed.wait(),
                                           wait if 0 < wait < float("inf") else None)
                continue
            await self.fire()

    async def fire(self) -> None:
        """Stop every running sigma container of this engine, at once."""
        renewed = self.renewed_at
        assert renewed is not None
        self.fired, self.fired_at = True, self.clock()
        lapsed = self.fired_at - renewed
        log.warning("self-fence: no heartbeat renewal for %.1fs (lease TTL %gs): stopping "
                    "this host's instances before the lease lapses", lapsed, self.ttl)
        engine = self.engine()
        budget = max(renewed + self.ttl - self.clock(), 0.1)
        try:
            async with asyncio.timeout(budget):
                found = await engine.containers({LABEL_INSTANCE: ""})
                running = [c.id for c in found if c.running]
                await asyncio.gather(*(engine.stop(cid, timeout=0) for cid in running))
        except (EngineError, TimeoutError) as exc:
            why = exc.message if isinstance(exc, EngineError) else f"no answer in {budget:.1f}s"
            log.error("self-fence failed: the engine did not stop this host's containers "
                      "(%s); they may still run when the lease lapses", why)
            return
        self.stopped, self.done_at = running, self.clock()
        log.warning("self-fence: stopped %d container(s) %.2fs before the lease can lapse",
                    len(running), renewed + self.ttl - self.done_at)
