"""Rendering of API objects for people (tables, descriptions) and machines (JSON, YAML)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import yaml

from sigmad.units import format_cpu, format_size

Item = Mapping[str, Any]
Cell = tuple[str, str, bool]  # header, value, shown only in wide mode

NONE = "-"
SHORT_ID = 12
TERMINATIONS_SHOWN = 5
LOG_LINES_SHOWN = 10  # of the last lines kept with a termination (all: logs --previous)


def dump(data: Any, fmt: str) -> str:
    """`data` as indented JSON or as YAML (keys in API order)."""
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip("\n")


def age(ts: float | None, now: float) -> str:
    """`5s`, `3m`, `2h`, `4d` since epoch seconds `ts`; `-` if unset."""
    if not ts:
        return NONE
    seconds = int(max(0.0, now - ts))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def short_id(container_id: str) -> str:
    """A container id cut to 12 characters, as Docker shows it."""
    return container_id[:SHORT_ID] or NONE


def plural(count: int, word: str) -> str:
    """`1 instance`, `2 instances`."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def _text(value: Any) -> str:
    return NONE if value is None or value == "" else str(value)


def _labels(labels: Mapping[str, str] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in (labels or {}).items()) or NONE


def ratio(value: float) -> str:
    """`1.0x`, `1.25x`: a ratio to two decimals at most."""
    text = f"{round(value, 2):g}"
    return f"{text}x" if "." in text else f"{text}.0x"


def host_ports(ports: Mapping[str, int] | None, sep: str) -> str:
    """`http:31007,admin:31008` (sep `:`), or `-` without host ports."""
    return ",".join(f"{name}{sep}{port}" for name, port in (ports or {}).items()) or NONE


def _pair(req: Item | None, other: Item | None, key: str) -> str:
    fmt = format_cpu if key == "cpu_m" else format_size
    return f"{fmt((req or {}).get(key, 0))}/{fmt((other or {}).get(key, 0))}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns aligned and two spaces apart, headers uppercase, no trailing spaces."""
    lines = [[h.upper() for h in headers], *[[_text(c) for c in row] for row in rows]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _node_cells(n: Item, now: float) -> list[Cell]:
    return [
        ("NAME", n["name"], False),
        ("STATUS", n.get("status", ""), False),
        ("CPU(req/alloc)", _pair(n.get("requested"), n.get("allocatable"), "cpu_m"), False),
        ("MEMORY(req/alloc)", _pair(n.get("requested"), n.get("allocatable"), "memory"), False),
        ("INSTANCES", str(n.get("instances", 0)), False),
        ("LABELS", _labels(n.get("labels")), False),
        ("SSD(free/total)", _ssd(n.get("ssd")), True),
        ("OVERCOMMIT", _overcommit(n.get("overcommit")), True),
        ("PORTS", "-".join(str(p) for p in n.get("port_range") or []), True),
        ("ENGINE", n.get("engine", ""), True),
        ("ADDRESS", n.get("address", ""), True),
        ("VERSION", n.get("engine_version", ""), True),
        ("AGE", age(n.get("updated"), now), True),
    ]


def _ssd(counts: Item | None) -> str:
    counts = counts or {}
    return f"{counts.get('free', 0)}/{counts.get('total', 0)}"


def _ssd_cells(d: Item, now: float) -> list[Cell]:
    return [
        ("NODE", d.get("node", ""), False),
        ("ID", d.get("id", ""), False),
        ("STATE", d.get("state", ""), False),
        ("SIZE", format_size(int(d.get("size", 0))), False),
        ("CLAIMED BY", d.get("claimed_by", "") or NONE, False),
        ("PATH", d.get("path", ""), True),
        ("ROTATIONAL", "yes" if d.get("rotational") else "no", True),
        ("MOUNT", d.get("mount", "") or NONE, True),
        ("ERROR", d.get("error", ""), True),
        ("AGE", age(d.get("updated"), now), True),
    ]


def _overcommit(over: Item | None) -> str:
    over = over or {}
    return f"cpu {ratio(over.get('cpu', 1.0))} mem {ratio(over.get('memory', 1.0))}"


def _app_cells(a: Item, now: float) -> list[Cell]:
    spec = a.get("spec") or {}
    images = ",".join(c.get("image", "") for c in spec.get("containers", []))
    return [
        ("NAMESPACE", a["namespace"], False),
        ("NAME", a["app"], False),
        ("GENERATION", str(a.get("generation", "")), False),
        ("READY", f"{a.get('running', 0)}/{a.get('replicas', 0)}", False),
        ("AGE", age(a.get("created"), now), False),
        ("IMAGES", images, True),
        ("RESTART", spec.get("restart", ""), True),
    ]


def _instance_cells(i: Item, now: float) -> list[Cell]:
    ids = ",".join(short_id(c.get("id", "")) for c in i.get("containers", []))
    return [
        ("NAMESPACE", i["namespace"], False),
        ("NAME", i["name"], False),
        ("STATE", i.get("state", ""), False),
        ("NODE", i.get("node", ""), False),
        ("IP", i.get("ip", ""), False),
        ("RESTARTS", str(i.get("restarts", 0)), False),
        ("AGE", age(i.get("created"), now), False),
        ("GENERATION", str(i.get("generation", "")), True),
        ("CONTAINERS", ids, True),
        ("PORTS", host_ports(i.get("host_ports"), ":"), True),
        ("CONFIGS", _configs(i), True),
        ("REASON", i.get("reason", ""), True),
    ]


def _configs(i: Item) -> str:
    """`name:vN` of each config the instance has (`vN→vM` while a pinned one is on its
    way)."""
    pinned, has = i.get("configs") or {}, i.get("configs_have") or {}
    return ",".join(f"{n}:v{has[n]}" + (f"→v{pinned[n]}" if pinned.get(n, has[n]) != has[n]
                                        else "") if n in has else f"{n}:→v{pinned[n]}"
                    for n in sorted(set(pinned) | set(has))) or "-"


def _master_cells(m: Item, now: float) -> list[Cell]:
    since = m.get("since")
    return [
        ("ID", m["id"], False),
        ("API", m.get("api", ""), False),
        ("ROLE", m.get("role", ""), False),
        ("AGE", age(since, now), False),  # how long it has had its role
        ("SINCE", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else NONE,
         True),
    ]


CELLS = {"nodes": _node_cells, "apps": _app_cells, "instances": _instance_cells,
         "masters": _master_cells, "ssds": _ssd_cells}


def list_table(kind: str, items: Sequence[Item], wide: bool, now: float) -> str:
    """The table of `get KIND` (`nodes`, `apps`, `instances`, `masters`) for non-empty
    `items`."""
    rows = [[c for c in CELLS[kind](item, now) if wide or not c[2]] for item in items]
    return table([c[0] for c in rows[0]], [[c[1] for c in row] for row in rows])


def fields(pairs: Sequence[tuple[str, Any]]) -> str:
    """`Key:  value` lines with the values aligned."""
    width = max(len(k) for k, _ in pairs) + 3
    return "\n".join(f"{k + ':':<{width}}{_text(v)}".rstrip() for k, v in pairs)


def _section(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    if not rows:
        return f"{title}  {NONE}"
    body = table(headers, rows)
    return f"{title}\n" + "\n".join(f"  {line}" for line in body.splitlines())


def _when(ts: float | None, now: float) -> str:
    if not ts:
        return NONE
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ts))} ({age(ts, now)} ago)"


def describe_app(a: Item, now: float) -> str:
    """A multi-line description of an app and its containers."""
    spec = a.get("spec") or {}
    head = fields([
        ("Name", a["app"]),
        ("Namespace", a["namespace"]),
        ("Generation", a.get("generation")),
        ("Replicas", f"{a.get('replicas', 0)} desired, {a.get('running', 0)} running"),
        ("Restart", spec.get("restart")),
        ("Placement", _labels((spec.get("placement") or {}).get("labels"))),
        ("Configs", ", ".join(f"{n} v{v}" for n, v in sorted((a.get("configs") or {}).items()))
         or NONE),
        *([("Config rollout", a["configs_halt"])] if a.get("configs_halt") else []),
        ("Created", _when(a.get("created"), now)),
        ("Updated", _when(a.get("updated"), now)),
    ])
    rows = []
    for c in spec.get("containers", []):
        res = c.get("resources") or {}
        rows.append([
            c.get("name", ""), c.get("image", ""), " ".join(c.get("command") or []),
            _pair(res.get("request"), res.get("limit"), "cpu_m"),
            _pair(res.get("request"), res.get("limit"), "memory"),
        ])
    headers = ["NAME", "IMAGE", "COMMAND", "CPU(req/limit)", "MEMORY(req/limit)"]
    return head + "\n" + _section("Containers:", headers, rows)


def describe_instance(i: Item, now: float) -> str:
    """A multi-line description of an instance, its containers and last terminations."""
    request = i.get("request") or {}
    next_start = i.get("next_start") or 0
    disks = ", ".join(f"{d.get('volume')}={i.get('node')}/{d.get('disk')}"
                      for d in i.get("ssds") or [])
    head = fields([
        ("Name", i["name"]),
        ("Namespace", i["namespace"]),
        ("App", i.get("app")),
        ("Generation", i.get("generation")),
        ("State", i.get("state")),
        ("Reason", i.get("reason")),
        ("Node", i.get("node")),
        ("IP", i.get("ip")),
        ("Host ports", host_ports(i.get("host_ports"), "=")),
        *([("Disks", disks)] if disks else []),
        ("Request", f"cpu {format_cpu(request.get('cpu_m', 0))}, "
                    f"memory {format_size(request.get('memory', 0))}"),
        ("Restarts", i.get("restarts", 0)),
        ("Next start", f"in {age(now, next_start)}" if next_start > now else None),
        ("Created", _when(i.get("created"), now)),
        ("Updated", _when(i.get("updated"), now)),
    ])
    containers = [
        [c.get("name", ""), short_id(c.get("id", "")), c.get("state", ""),
         "yes" if c.get("ready") else "no", _text(c.get("exit_code")),
         c.get("started_at", ""), c.get("finished_at", "")]
        for c in i.get("containers", [])
    ]
    terminations = [
        [_when(t.get("at"), now), t.get("container", ""), t.get("reason", ""),
         short_id(t.get("container_id", ""))]
        for t in (i.get("terminations") or [])[-TERMINATIONS_SHOWN:]
    ]
    parts = [
        head,
        _section("Containers:",
                 ["NAME", "ID", "STATE", "READY", "EXIT", "STARTED", "FINISHED"], containers),
        _section("Terminations:", ["TIME", "CONTAINER", "REASON", "CONTAINER ID"],
                 terminations),
    ]
    last = next((t for t in reversed(i.get("terminations") or []) if t.get("logs")), None)
    if last is not None:
        shown = last["logs"][-LOG_LINES_SHOWN:]
        parts.append(f"Last lines of {last.get('container')} "
                     f"({short_id(last.get('container_id', ''))}, {last.get('reason')}):\n"
                     + "\n".join(f"  {line}" for line in shown))
    return "\n".join(parts)


def describe_ssd(d: Item, now: float) -> str:
    """A multi-line description of one SSD."""
    return fields([
        ("Node", d.get("node")),
        ("ID", d.get("id")),
        ("Path", d.get("path")),
        ("State", d.get("state")),
        ("Error", d.get("error") or None),
        ("Size", format_size(int(d.get("size", 0)))),
        ("Rotational", "yes" if d.get("rotational") else "no"),
        ("Claimed by", d.get("claimed_by") or NONE),
        ("Mount", d.get("mount") or NONE),
        ("Filesystem", d.get("fs_uuid") or NONE),
        ("Updated", _when(d.get("updated"), now)),
    ])


class Progress:
    """One status line on a stream: rewritten in place on a terminal, else printed on change."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last = ""

    def show(self, text: str) -> None:
        """Show `text` unless it is already shown."""
        if text == self.last:
            return
        self.last = text
        self.stream.write(f"\r\033[K{text}" if self.tty else f"{text}\n")
        self.stream.flush()

    def clear(self) -> None:
        """Remove the status line from a terminal."""
        if self.tty and self.last:
            self.stream.write("\r\033[K")
            self.stream.flush()
        self.last = ""
