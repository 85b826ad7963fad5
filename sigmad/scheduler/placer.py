"""First-fit placement with per-filter rejection counts. Pure: no I/O, the snapshot is copied."""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass

from sigmad.scheduler.snapshot import NodeInfo, Snapshot
from sigmad.spec import Resources
from sigmad.units import format_cpu, format_size


@dataclass
class Request:
    """One instance to place: its key, summed request and required node labels."""

    key: str
    request: Resources
    labels: dict[str, str]


def _eligible(node: NodeInfo, req: Request) -> str | None:
    """None if `node` may run `req` at all (capacity aside), else the filter's reason."""
    if not node.ready:
        return "node not ready"
    if node.draining:
        return "node draining"
    if any(node.labels.get(k) != v for k, v in req.labels.items()):
        return "labels mismatch"
    return None


def _reject(node: NodeInfo, req: Request) -> str | None:
    """None if `node` can take `req`, else the filter's reason. A request of 0 (best
    effort) always fits, even on an over-booked node."""
    reason = _eligible(node, req)
    if reason:
        return reason
    free = node.free()
    if req.request.cpu_m and req.request.cpu_m > free.cpu_m:
        return "insufficient cpu"
    if req.request.memory and req.request.memory > free.memory:
        return "insufficient memory"
    return None


def _explain(nodes: list[NodeInfo], req: Request, counts: Counter[str]) -> str:
    if not nodes:
        return "no nodes registered"
    # "best free" counts only nodes that passed every other filter.
    eligible = [node.free() for node in nodes if _eligible(node, req) is None]
    parts = []
    for reason, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        text = f"{n} node{'s' if n > 1 else ''}: {reason}"
        if reason == "insufficient cpu":
            best = max(0, *(free.cpu_m for free in eligible))
            text += f" (need {format_cpu(req.request.cpu_m)}, best free {format_cpu(best)})"
        elif reason == "insufficient memory":
            best = max(0, *(free.memory for free in eligible))
            text += f" (need {format_size(req.request.memory)}, best free {format_size(best)})"
        parts.append(text)
    return "; ".join(parts)


def place(snapshot: Snapshot, requests: list[Request]) -> tuple[dict[str, str], dict[str, str]]:
    """Place `requests` in order on the first node that fits, by node name.

    Returns (key → node) for placed instances and (key → reason) for the rest."""
    nodes = sorted(copy.deepcopy(list(snapshot.nodes.values())), key=lambda n: n.name)
    placed: dict[str, str] = {}
    unplaced: dict[str, str] = {}
    for req in requests:
        counts: Counter[str] = Counter()
        for node in nodes:
            reason = _reject(node, req)
            if reason is None:
                node.requested.cpu_m += req.request.cpu_m
                node.requested.memory += req.request.memory
                placed[req.key] = node.name
                break
            counts[reason] += 1
        else:
            unplaced[req.key] = _explain(nodes, req, counts)
    return placed, unplaced
