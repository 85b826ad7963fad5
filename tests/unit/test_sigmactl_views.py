"""sigmactl rendering of events, the pool summary and `why`."""

from __future__ import annotations

import json
import time
from typing import Any

from sigmactl import views

GI = 2**30
EVENT: dict[str, Any] = {"time": 1_764_265_000.5, "kind": "instance", "namespace": "default",
                         "name": "web-0", "app": "web", "type": "Normal",
                         "message": "started container main (3f2a9c1b7d4e)"}
NODE_EVENT: dict[str, Any] = {**EVENT, "kind": "node", "namespace": "", "name": "h1", "app": "",
                              "type": "Warning", "message": "node h1 lost its heartbeat"}


def _group(nodes: int, instances: int, alloc: tuple[int, int], req: tuple[int, int],
           limits: tuple[int, int], uncapped: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    def res(pair: tuple[int, int]) -> dict[str, int]:
        return {"cpu_m": pair[0], "memory": pair[1]}

    return {"nodes": nodes, "instances": instances, "allocatable": res(alloc),
            "requested": res(req), "free": res((alloc[0] - req[0], alloc[1] - req[1])),
            "limits": res(limits), "uncapped": {"cpu": uncapped[0], "memory": uncapped[1]}}


POOL: dict[str, Any] = {
    **_group(3, 5, (6000, 12 * GI), (1500, 3 * GI), (10800, 14 * GI + GI // 2), (3, 1)),
    "by_label": {
        "zone": {"room-a": _group(2, 4, (4000, 8 * GI), (1000, 2 * GI), (9000, 12 * GI)),
                 "room-b": _group(1, 1, (2000, 4 * GI), (500, GI), (1800, 2 * GI + GI // 2))},
        "disk": {"ssd": _group(1, 0, (2000, 4 * GI), (0, 0), (0, 0))},
    },
}


def test_event_cells_and_objects() -> None:
    clock = time.strftime("%H:%M:%S", time.localtime(EVENT["time"]))
    assert views.event_cells(EVENT) == [clock, "Normal", "instance", "default/web-0",
                                        "started container main (3f2a9c1b7d4e)"]
    assert views.event_object(NODE_EVENT) == "h1"
    assert views.clock(0) == "-"


def test_events_table_aligns_and_stream_lines_use_fixed_widths() -> None:
    lines = views.events_table([EVENT, NODE_EVENT]).splitlines()
    assert lines[0].split() == ["TIME", "TYPE", "KIND", "OBJECT", "MESSAGE"]
    assert lines[2].split()[1:] == ["Warning", "node", "h1", "node", "h1", "lost", "its",
                                    "heartbeat"]
    assert lines[1].index("default/web-0") == lines[2].index("h1") == lines[0].index("OBJECT")
    header = views.event_line(views.EVENT_HEADERS)
    row = views.event_line(views.event_cells(NODE_EVENT))
    assert header.index("OBJECT") == row.index("h1") == 8 + 2 + 7 + 2 + 8 + 2
    assert header.index("MESSAGE") == row.index("node h1") == header.index("OBJECT") + 24 + 2
    long = views.event_line(["12:00:00", "Normal", "instance", "x" * 30, "msg"])
    assert long.endswith("x" * 30 + "  msg")


def test_event_json_is_one_line() -> None:
    line = views.event_json({**EVENT, "message": "naïve\nsecond"})
    assert "\n" not in line and "naïve" in line
    assert json.loads(line)["message"] == "naïve\nsecond"


def test_pool_text() -> None:
    assert views.pool_text(POOL).splitlines() == [
        "POOL  NODES  INSTANCES  CPU(ALLOC)  CPU(REQ)  CPU(FREE)  CPU(LIMITS)  MEM(ALLOC)"
        "  MEM(REQ)  MEM(FREE)  MEM(LIMITS)",
        "pool  3      5          6           1.5       4.5        10.8         12Gi        "
        "3Gi       9Gi        14.5Gi",
        "overcommit in use: cpu 1.8x, memory 1.2x (limits / allocatable); "
        "3 instances without a cpu cap, 1 without a memory cap",
        "",
        "LABEL        NODES  INSTANCES  CPU(ALLOC)  CPU(REQ)  CPU(FREE)  CPU(LIMITS)  MEM(ALLOC)"
        "  MEM(REQ)  MEM(FREE)  MEM(LIMITS)",
        "zone=room-a  2      4          4           1         3          9            8Gi"
        "         2Gi       6Gi        12Gi",
        "zone=room-b  1      1          2           500m      1.5        1.8          4Gi"
        "         1Gi       3Gi        2.5Gi",
        "",
        "LABEL     NODES  INSTANCES  CPU(ALLOC)  CPU(REQ)  CPU(FREE)  CPU(LIMITS)  MEM(ALLOC)"
        "  MEM(REQ)  MEM(FREE)  MEM(LIMITS)",
        "disk=ssd  1      0          2           0         2          0            4Gi"
        "         0         4Gi        0",
    ]


def test_pool_text_shows_ssds_when_the_pool_has_some() -> None:
    with_ssds = {**POOL, "ssd": {"free": 3, "total": 4}, "by_label": {"zone": {
        "room-a": {**POOL["by_label"]["zone"]["room-a"], "ssd": {"free": 1, "total": 2}}}}}
    lines = views.pool_text(with_ssds).splitlines()
    assert lines[0].endswith("MEM(LIMITS)  SSD(FREE/TOTAL)") and lines[1].endswith("  3/4")
    assert lines[4].endswith("SSD(FREE/TOTAL)") and lines[5].endswith("  1/2")


def test_pool_empty_and_overbooked() -> None:
    empty = _group(0, 0, (0, 0), (0, 0), (0, 0), (1, 0))
    text = views.pool_text({**empty, "by_label": {}})
    assert text.splitlines()[2] == ("overcommit in use: cpu -, memory - (limits / allocatable); "
                                    "1 instance without a cpu cap, 0 without a memory cap")
    assert len(text.splitlines()) == 3
    over = _group(1, 3, (1000, GI), (1500, GI + GI // 2), (3000, 2 * GI))
    row = views.pool_text(over).splitlines()[1].split()
    assert row[5] == "-500m" and row[9] == "-512Mi"


def test_why_pending_sorts_filters_by_count() -> None:
    pending = {"namespace": "default", "name": "web-3", "state": "Pending", "node": "",
               "reason": "no node fits", "containers": [],
               "unschedulable": {"labels mismatch": 3, "host ports": 1,
                                 "insufficient memory": 3, "insufficient cpu": 5}}
    assert views.why_text(pending).splitlines() == [
        "web-3 is Pending: no node fits",
        "FILTER               NODES",
        "insufficient cpu     5",
        "insufficient memory  3",
        "labels mismatch      3",
        "host ports           1",
    ]
    data = views.why_data(pending)
    assert list(data["unschedulable"]) == ["insufficient cpu", "insufficient memory",
                                           "labels mismatch", "host ports"]
    assert data["instance"] == "default/web-3" and data["not_ready"] == []
    fresh = {**pending, "reason": "", "unschedulable": {}}
    assert views.why_text(fresh) == "web-3 is Pending: waiting for the scheduler"


def test_why_placed_instances() -> None:
    starting = {"namespace": "default", "name": "web-3", "state": "Starting", "node": "h1",
                "reason": "", "containers": [
                    {"name": "main", "state": "running", "ready": True},
                    {"name": "sidecar", "state": "running", "ready": False},
                    {"name": "log", "state": "", "ready": False}]}
    assert views.why_text(starting).splitlines() == [
        "web-3 is Starting on h1",
        "not ready yet: sidecar (running), log (not created)",
    ]
    assert views.why_data(starting)["not_ready"] == ["sidecar", "log"]
    failed = {**starting, "state": "FailedToStart", "reason": "FailedToStart(no such image)"}
    assert views.why_text(failed).splitlines()[0] == (
        "web-3 is FailedToStart on h1: FailedToStart(no such image)")
    running = {**starting, "state": "Running"}
    assert views.why_text(running) == "web-3 is Running on h1"
    assert views.why_data(running)["not_ready"] == []
    gone = {**starting, "state": "Exited", "node": "", "reason": "Exited(3)"}
    assert views.why_text(gone) == "web-3 is Exited: Exited(3)"
