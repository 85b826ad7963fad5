"""Rendering of events, the pool summary and `why` answers for people and scripts."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sigmactl.output import NONE, plural, table
from sigmad.units import format_cpu, format_size

Item = Mapping[str, Any]

EVENT_HEADERS = ["TIME", "TYPE", "KIND", "OBJECT", "MESSAGE"]
EVENT_WIDTHS = (8, 7, 8, 24)  # the fixed columns of streamed rows; MESSAGE takes the rest
RESOURCES: tuple[tuple[str, str, Callable[[int], str]], ...] = (
    ("CPU", "cpu_m", format_cpu), ("MEM", "memory", format_size),
)
PARTS = (("ALLOC", "allocatable"), ("REQ", "requested"), ("FREE", "free"), ("LIMITS", "limits"))
USED = ("USED", "used")  # shown when some node reported usage
STARTING_STATES = ("Starting", "FailedToStart")


# events


def clock(ts: float | None) -> str:
    """Local `HH:MM:SS` of epoch seconds `ts`; `-` if unset."""
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else NONE


def event_object(e: Item) -> str:
    """The node name for node events, else `namespace/name`."""
    if e.get("kind") == "node":
        return str(e.get("name", ""))
    return f"{e.get('namespace', '')}/{e.get('name', '')}"


def event_cells(e: Item) -> list[str]:
    """TIME, TYPE, KIND, OBJECT and MESSAGE of one event."""
    return [clock(e.get("time")), str(e.get("type", "")), str(e.get("kind", "")),
            event_object(e), str(e.get("message", ""))]


def events_table(events: Sequence[Item]) -> str:
    """An aligned table of a list of events."""
    return table(EVENT_HEADERS, [event_cells(e) for e in events])


def event_line(cells: Sequence[str]) -> str:
    """One row of a streamed table: fixed-width columns, so rows align without knowing
    what comes next (a longer value pushes the rest of its row right)."""
    head = [c.ljust(w) for c, w in zip(cells, EVENT_WIDTHS, strict=False)]
    return "  ".join([*head, *cells[len(EVENT_WIDTHS):]]).rstrip()


def event_json(e: Item) -> str:
    """One event as one line of JSON."""
    return json.dumps(e, ensure_ascii=False)


# pool


def _quantity(value: int, fmt: Callable[[int], str]) -> str:
    return f"-{fmt(-value)}" if value < 0 else fmt(value)


def _parts(used: bool) -> tuple[tuple[str, str], ...]:
    return (*PARTS, USED) if used else PARTS


def _pool_row(name: str, group: Item, ssds: bool, used: bool = False) -> list[str]:
    cells = [name, str(group.get("nodes", 0)), str(group.get("instances", 0))]
    for _, key, fmt in RESOURCES:
        cells += [_quantity((group.get(part) or {}).get(key, 0), fmt)
                  for _, part in _parts(used)]
    ssd = group.get("ssd") or {}
    return [*cells, f"{ssd.get('free', 0)}/{ssd.get('total', 0)}"] if ssds else cells


def _pool_table(first: str, rows: Sequence[tuple[str, Item]], ssds: bool,
                used: bool = False) -> str:
    """One row per group; SSDs free/total when the pool has any; used (the nodes' latest
    usage samples) when some node reported usage."""
    headers = [first, "NODES", "INSTANCES",
               *[f"{res}({part})" for res, _, _ in RESOURCES for part, _ in _parts(used)]]
    headers += ["SSD(FREE/TOTAL)"] if ssds else []
    return table(headers, [_pool_row(name, group, ssds, used) for name, group in rows])


def overcommit_line(pool: Item) -> str:
    """`overcommit in use: cpu 1.8x, memory 1.2x (limits / allocatable); …` and how many
    placed instances have no cap (a missing cap counts as 0 in the limits)."""
    ratios = []
    for word, key in (("cpu", "cpu_m"), ("memory", "memory")):
        alloc = (pool.get("allocatable") or {}).get(key, 0)
        used = (pool.get("limits") or {}).get(key, 0)
        ratios.append(f"{word} {used / alloc:.1f}x" if alloc else f"{word} {NONE}")
    uncapped = pool.get("uncapped") or {}
    return (f"overcommit in use: {', '.join(ratios)} (limits / allocatable); "
            f"{plural(uncapped.get('cpu', 0), 'instance')} without a cpu cap, "
            f"{uncapped.get('memory', 0)} without a memory cap")


def pool_text(pool: Item) -> str:
    """The pool as one server, its overcommit in use, then one table per node label key
    (with SSDs free/total when the pool has any)."""
    ssds = bool((pool.get("ssd") or {}).get("total"))
    used = bool(pool.get("used_nodes"))
    parts = [_pool_table("POOL", [("pool", pool)], ssds, used), overcommit_line(pool)]
    for key, values in (pool.get("by_label") or {}).items():
        rows = [(f"{key}={value}", group) for value, group in values.items()]
        parts += ["", _pool_table("LABEL", rows, ssds, used)]
    return "\n".join(parts)


# why


def _rejections(i: Item) -> list[tuple[str, int]]:
    counts = (i.get("unschedulable") or {}).items()
    return sorted(counts, key=lambda kv: (-kv[1], kv[0]))


def _not_ready(i: Item) -> list[Item]:
    if i.get("state") not in STARTING_STATES:
        return []
    return [c for c in i.get("containers") or [] if not c.get("ready")]


def why_text(i: Item) -> str:
    """Why an instance is in its state: for Pending, the scheduler's reason and how many
    nodes each filter rejected; else where it is, its reason, and containers not ready."""
    name, state, reason = i.get("name", ""), i.get("state", ""), i.get("reason", "")
    if state == "Pending":
        lines = [f"{name} is Pending: {reason or 'waiting for the scheduler'}"]
        if rejections := _rejections(i):
            lines.append(table(["FILTER", "NODES"], [[f, str(n)] for f, n in rejections]))
        return "\n".join(lines)
    where = f" on {i['node']}" if i.get("node") else ""
    lines = [f"{name} is {state}{where}" + (f": {reason}" if reason else "")]
    if waiting := _not_ready(i):
        lines.append("not ready yet: " + ", ".join(
            f"{c.get('name', '')} ({c.get('state') or 'not created'})" for c in waiting))
    return "\n".join(lines)


def why_data(i: Item) -> dict[str, Any]:
    """The answer of `why` for scripts."""
    return {
        "instance": f"{i.get('namespace', '')}/{i.get('name', '')}",
        "state": i.get("state", ""), "node": i.get("node", ""), "reason": i.get("reason", ""),
        "unschedulable": dict(_rejections(i)),
        "not_ready": [c.get("name", "") for c in _not_ready(i)],
    }
