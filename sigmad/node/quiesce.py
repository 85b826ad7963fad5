"""The agent's side of a live move's quiesce (sigmad.control.moves): the old copy of an
instance that moves away from this node is drained before the flip.

Invariants:
- an instance whose record places it here, moving (`next_node`) and quiescing (`quiesce`),
  has its copy's veth gated (sigmad.network.gate: new TCP connections are dropped, never
  reset); once that copy has no connection left in use, or DRAIN_WAIT has passed (a
  longer-lived connection is then cut by the flip, as by any restart), this node says so
  in `drained` of its `overlay-applied/{node}` record (key → the record's `quiesce` stamp);
- a record that stops quiescing while it still places the copy here (the move called off)
  lifts the gate; one that places it elsewhere (the flip) or is gone leaves it: the gate
  goes with the copy's veth when the copy stops;
- nothing is only in memory: after a restart the agent gates again what the records say
  (a gate already there is kept) and, at each full sync, lifts every gate of the bridge
  (found by its priority) that no quiescing instance owns;
- a copy whose veth cannot be found or gated is said drained at once (the flip then goes
  as without a quiesce) and the reason is logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sigmad.engine import Engine
from sigmad.errors import SigmaError
from sigmad.models import Instance, now
from sigmad.network import gate
from sigmad.network.ipam import mac_for
from sigmad.network.overlay import OverlayError

log = logging.getLogger(__name__)
DRAIN_WAIT = 3.0  # seconds a gated copy's open connections have to end before the flip
DRAIN_LOOK = 0.1  # seconds between two counts of its connections


@dataclass
class GatePlan:
    """What to change: the instances to gate (or gate again for a new mark), the keys whose
    gate to lift (the move called off), and the keys to forget (moved away or gone)."""

    close: list[Instance] = field(default_factory=list)
    open: list[str] = field(default_factory=list)
    forget: list[str] = field(default_factory=list)


def plan(me: str, instances: dict[str, Instance], gated: dict[str, float]) -> GatePlan:
    """The gates node `me` must change, from the instance records (by key) and what it has
    gated (key → the `quiesce` mark it gated for)."""
    wanted = {k: i for k, i in instances.items()
              if i.node == me and i.next_node and i.quiesce and i.ip}
    out = GatePlan(close=[i for k, i in sorted(wanted.items()) if gated.get(k) != i.quiesce])
    for key in sorted(set(gated) - set(wanted)):
        inst = instances.get(key)
        (out.open if inst is not None and inst.node == me else out.forget).append(key)
    return out


class Quiescer:
    """Gates and drains this node's old copies of moving instances (see the module doc);
    `said` is called when `drained` changes (the overlay-applied record is put again)."""

    def __init__(self, me: str, engine: Engine, bridge: str, said: Callable[[], None]) -> None:
        self.me = me
        self.engine = engine
        self.bridge = bridge
        self.said = said
        self.gated: dict[str, float] = {}  # key → the mark it was gated for
        self.ports: dict[str, int] = {}  # key → the host-side veth gated
        self.leaving: set[int] = set()  # gated veths of copies that moved away (until gone)
        self.drained: dict[str, float] = {}  # key → mark: what overlay-applied says
        self.waits: dict[str, asyncio.Task[None]] = {}

    async def refresh(self, instances: dict[str, Instance], full: bool) -> None:
        """Bring the gates in line with the records; with `full`, also lift the bridge's
        gates that no quiescing instance owns (left by a crash or a restart)."""
        p = plan(self.me, instances, self.gated)
        for inst in p.close:
            await self._close(inst)
        for key in p.open:
            port = self.ports.pop(key, None)
            self._drop(key)
            if port is not None:
                await asyncio.to_thread(gate.open_, port)
                log.info("%s: move called off: new connections reach its copy again", key)
        for key in p.forget:
            port = self.ports.pop(key, None)
            if port is not None:
                self.leaving.add(port)
            self._drop(key)
        if full:
            closed = await asyncio.to_thread(gate.closed_ports, self.bridge)
            self.leaving &= closed  # (a stopped copy's veth is gone, and its gate with it)
            for port in closed - set(self.ports.values()) - self.leaving:
                await asyncio.to_thread(gate.open_, port)
                log.info("lifted a SYN gate no quiescing instance owns (port %d)", port)

    def stop(self) -> None:
        """Cancel the drains under way (the gates stay: a restarted agent reads them back)."""
        for task in self.waits.values():
            task.cancel()
        self.waits.clear()

    def _drop(self, key: str) -> None:
        self.gated.pop(key, None)
        task = self.waits.pop(key, None)
        if task is not None:
            task.cancel()
        if self.drained.pop(key, None) is not None:
            self.said()

    def _done(self, key: str, mark: float) -> None:
        self.drained[key] = mark
        self.said()

    async def _close(self, inst: Instance) -> None:
        key, mark = inst.key, inst.quiesce
        self._drop(key)
        self.gated[key] = mark
        pid, port = 0, None
        holder = next((c.id for c in inst.containers if c.id), "")
        try:
            state = await self.engine.inspect(holder) if holder else None
            pid = state.pid if state is not None else 0
            port = await asyncio.to_thread(gate.host_port, pid, mac_for(inst.ip)) if pid \
                else None
            if port is None:
                log.warning("%s: its copy's veth was not found (pid %d): not drained before "
                            "the flip", key, pid)
                self._done(key, mark)
                return
            await asyncio.to_thread(gate.close, port, inst.ip)
        except (SigmaError, OverlayError) as exc:
            log.warning("%s: could not gate its copy (%s): not drained before the flip", key,
                        exc)
            self._done(key, mark)
            return
        self.ports[key] = port
        log.info("%s: new connections to its copy dropped (port %d) %.2fs after the mark; "
                 "draining", key, port, now() - mark)
        self.waits[key] = asyncio.create_task(self._drain(key, mark, pid, inst.ip))

    async def _drain(self, key: str, mark: float, pid: int, ip: str) -> None:
        deadline = time.monotonic() + DRAIN_WAIT
        while (left := await asyncio.to_thread(gate.busy, pid, ip)) \
                and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_LOOK)
        if left:
            log.info("%s: %d connection(s) still open after %gs: the flip cuts them", key,
                     left, DRAIN_WAIT)
        self.waits.pop(key, None)
        log.info("%s: drained %.2fs after the mark", key, now() - mark)
        self._done(key, mark)
