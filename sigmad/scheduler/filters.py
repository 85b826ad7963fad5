"""Filters: each says None (the node passes) or the reason it cannot take an instance.

Static filters (readiness, draining, labels) depend only on the node; room filters (cpu,
memory, host ports, SSDs) on what is left of it. A request of 0 is best effort and always
fits; an SSD volume needs a free whole disk of at least its min_size.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from sigmad.scheduler.fit import CPU as FIT_CPU
from sigmad.scheduler.fit import MEMORY as FIT_MEMORY
from sigmad.scheduler.fit import PORTS as FIT_PORTS
from sigmad.scheduler.fit import SSD as FIT_SSD
from sigmad.scheduler.fit import fit
from sigmad.scheduler.snapshot import NodeInfo, Room
from sigmad.spec import Placement, Resources
from sigmad.units import format_cpu, format_size

NOT_READY = "node not ready"
DRAINING = "node draining"
LABELS = "labels mismatch"
CPU = "insufficient cpu"
MEMORY = "insufficient memory"
PORTS = "host ports exhausted"
SSD = "insufficient ssd"
ROOM_REASONS = {FIT_CPU: CPU, FIT_MEMORY: MEMORY, FIT_PORTS: PORTS, FIT_SSD: SSD}


def ready(node: NodeInfo) -> str | None:
    return None if node.ready else NOT_READY


def not_draining(node: NodeInfo) -> str | None:
    return DRAINING if node.draining else None


def labels(node: NodeInfo, placement: Placement) -> str | None:
    """The node carries every required label and satisfies every expression."""
    return None if placement.matches(node.labels) else LABELS


def static_reason(node: NodeInfo, placement: Placement) -> str | None:
    """The first static filter `node` fails, if any."""
    return ready(node) or not_draining(node) or labels(node, placement)


def room_reason(room: Room, need: Resources, nports: int,
                ssds: Sequence[int] = ()) -> str | None:
    """The first room filter `room` fails, if any (sigmad.scheduler.fit)."""
    short = fit(room.cpu, room.memory, room.ports, need.cpu_m, need.memory, nports,
                room.ssd_sizes, ssds)
    return ROOM_REASONS[short] if short else None


def explain(
    nodes: Iterable[tuple[NodeInfo, Room]], placement: Placement, need: Resources, nports: int,
    ssds: Sequence[int] = (),
) -> tuple[str, dict[str, int]]:
    """Why a request fits on none of `nodes`: a sentence and the count per filter reason.

    Each node counts once, under the first filter it fails. "best free" is the most that a
    node rejected for that very reason has left (so it passed every filter before it)."""
    counts: Counter[str] = Counter()
    best = {CPU: 0, MEMORY: 0, SSD: 0}
    smallest = min(ssds, default=0)
    for node, room in nodes:
        reason = static_reason(node, placement) or room_reason(room, need, nports, ssds)
        if reason is None:
            continue
        counts[reason] += 1
        if reason == CPU:
            best[CPU] = max(best[CPU], room.cpu)
        elif reason == MEMORY:
            best[MEMORY] = max(best[MEMORY], room.memory)
        elif reason == SSD:
            best[SSD] = max(best[SSD], sum(1 for size in room.ssd_sizes if size >= smallest))
    if not counts:
        return "no nodes registered", {}
    parts = []
    for reason, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        text = f"{n} node{'s' if n > 1 else ''}: {reason}"
        if reason == CPU:
            text += f" (need {format_cpu(need.cpu_m)}, best free {format_cpu(best[CPU])})"
        elif reason == MEMORY:
            text += f" (need {format_size(need.memory)}, best free {format_size(best[MEMORY])})"
        elif reason == PORTS:
            text += f" (need {nports})"
        elif reason == SSD:
            text += (f" (need {len(ssds)} \u2265 {format_size(max(ssds))}, "
                     f"best free {best[SSD]})")
        parts.append(text)
    return "; ".join(parts), dict(counts)
