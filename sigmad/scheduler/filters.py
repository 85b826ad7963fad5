"""Filters: each says None (the node passes) or the reason it cannot take an instance.

Static filters (readiness, draining, labels) depend only on the node; room filters (cpu,
memory, host ports) on what is left of it. A request of 0 is best effort and always fits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from sigmad.scheduler.snapshot import NodeInfo, Room
from sigmad.spec import Placement, Resources
from sigmad.units import format_cpu, format_size

NOT_READY = "node not ready"
DRAINING = "node draining"
LABELS = "labels mismatch"
CPU = "insufficient cpu"
MEMORY = "insufficient memory"
PORTS = "host ports exhausted"


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


def cpu(room: Room, need: int) -> str | None:
    return CPU if need and need > room.cpu else None


def memory(room: Room, need: int) -> str | None:
    return MEMORY if need and need > room.memory else None


def ports(room: Room, need: int) -> str | None:
    return PORTS if need > room.ports else None


def fits(room: Room, cpu: int, memory: int, nports: int) -> bool:
    """Whether every room filter passes (the placer's hot path: no reason needed)."""
    return (not cpu or cpu <= room.cpu) and (not memory or memory <= room.memory) and (
        nports <= room.ports
    )


def room_reason(room: Room, need: Resources, nports: int) -> str | None:
    """The first room filter `room` fails, if any."""
    return cpu(room, need.cpu_m) or memory(room, need.memory) or ports(room, nports)


def explain(
    nodes: Iterable[tuple[NodeInfo, Room]], placement: Placement, need: Resources, nports: int
) -> tuple[str, dict[str, int]]:
    """Why a request fits on none of `nodes`: a sentence and the count per filter reason.

    Each node counts once, under the first filter it fails. "best free" is the most that a
    node rejected for that very reason has left (so it passed every filter before it)."""
    counts: Counter[str] = Counter()
    best = {CPU: 0, MEMORY: 0}
    for node, room in nodes:
        reason = static_reason(node, placement) or room_reason(room, need, nports)
        if reason is None:
            continue
        counts[reason] += 1
        if reason == CPU:
            best[CPU] = max(best[CPU], room.cpu)
        elif reason == MEMORY:
            best[MEMORY] = max(best[MEMORY], room.memory)
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
        parts.append(text)
    return "; ".join(parts), dict(counts)
