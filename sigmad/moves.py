"""Live moves (`sigmactl drain`): an instance's new copy starts on the node the scheduler
booked for it (`next_node`), with the instance's IP and MAC, while the old copy keeps
serving; once every container of the new copy is ready the record flips to the new node (the
agents re-point the tunnel FDB at once) and, a moment later, the old copy stops with
`KilledBySigma(migrated)`. A copy that fails to start cancels the move and frees the booking.

While both copies run, each host reaches exactly one of them: peers follow the record (the
old node until the flip), so the overlay still has one holder of the IP per path.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

from sigmad.engine import LABEL_INSTANCE, Engine
from sigmad.migration import port_releases
from sigmad.models import FAILED_TO_START, RUNNING, SCHEDULED, AppRecord, Instance, now
from sigmad.runtime import Runner
from sigmad.store import Guard, Op, Store, Versioned

FLIP_GRACE = 1.0  # seconds the old copy keeps answering after the flip


async def move_step(
    store: Store, rec: Versioned[Instance], app: AppRecord, old: Engine | None, new: Engine,
    new_address: str, report: Runner.Report, again: Callable[[], None],
) -> None:
    """One step of a live move: start the new copy; flip when it is ready; cancel if it
    failed; else ask for another step (`again`)."""
    inst = rec.value
    copy = dataclasses.replace(
        inst, node=inst.next_node, host_ports=dict(inst.next_ports), state=SCHEDULED,
        reason="", containers=[], terminations=[], next_start=0.0, streak=0,
    )
    await Runner(new, copy, app, new_address, report).step()
    if copy.state == FAILED_TO_START:  # the runner removed what it had made
        ops = port_releases(store.keys, inst.next_node, inst.next_ports)
        inst.reason = f"move to {inst.next_node} failed: {copy.reason}"
        inst.move, inst.next_node, inst.next_ports, inst.updated = "", "", {}, now()
        if await store.commit([Guard(rec.key, rec.mod_revision)], [Op(rec.key, inst), *ops]):
            report(inst.reason, True)
        return
    if copy.state != RUNNING:
        again()
        return
    flipped = dataclasses.replace(
        inst, node=inst.next_node, host_ports=dict(inst.next_ports), containers=copy.containers,
        state=RUNNING, reason="", move="", next_node="", next_ports={}, updated=now(),
    )
    for c in inst.containers:
        flipped.terminated(c.name, "KilledBySigma(migrated)", c.id)
    ops = [Op(rec.key, flipped), *port_releases(store.keys, inst.node, inst.host_ports)]
    if not await store.commit([Guard(rec.key, rec.mod_revision)], ops):
        again()
        return
    report(f"moved from {inst.node} to {flipped.node} ({inst.move}); the old copy stops in "
           f"{FLIP_GRACE:g}s", False)
    if old is not None:
        await asyncio.sleep(FLIP_GRACE)
        leftovers = await old.find({LABEL_INSTANCE: inst.key})
        await Runner(old, dataclasses.replace(inst), app, "", report).remove_all(
            leftovers, "KilledBySigma(migrated)")
