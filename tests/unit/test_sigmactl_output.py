"""sigmactl rendering: tables, ages, JSON/YAML and descriptions."""

from __future__ import annotations

import io
import json
from typing import Any

import yaml

from sigmactl import output

NOW = 1_764_265_000.0

NODE: dict[str, Any] = {
    "name": "h1", "engine": "unix:///var/run/docker.sock", "address": "", "labels": {"zone": "a"},
    "status": "Ready", "capacity": {"cpu_m": 2000, "memory": 2 * 2**30},
    "allocatable": {"cpu_m": 2000, "memory": 2 * 2**30},
    "requested": {"cpu_m": 200, "memory": 128 * 2**20}, "instances": 2,
    "overcommit": {"cpu": 1.5, "memory": 1.0}, "port_range": [31000, 32767],
    "draining": False, "engine_version": "20.10.24", "updated": NOW - 5,
}
APP: dict[str, Any] = {
    "namespace": "default", "app": "web", "generation": 3, "replicas": 2, "running": 1,
    "spec": {"app": "web", "namespace": "default", "replicas": 2, "restart": "always",
             "placement": {"labels": {}},
             "containers": [{"name": "main", "image": "sigma/busybox:latest",
                             "command": ["httpd", "-f", "-p", "8080"], "env": {},
                             "resources": {"request": {"cpu_m": 100, "memory": 64 * 2**20},
                                           "limit": {"cpu_m": 1500, "memory": 2**30}}}]},
    "created": NOW - 3 * 3600, "updated": NOW - 60,
}
INSTANCE: dict[str, Any] = {
    "namespace": "default", "app": "web", "index": 0, "name": "web-0", "generation": 3,
    "state": "Running", "reason": "", "node": "h1", "ip": "10.244.0.2",
    "host_ports": {"http": 31007, "admin": 31008},
    "request": {"cpu_m": 100, "memory": 64 * 2**20},
    "containers": [{"name": "main", "id": "3f2a9b8c7d6e5f4a3b2c", "state": "running",
                    "exit_code": None, "started_at": "2026-11-27T18:00:00Z", "finished_at": "",
                    "ready": True},
                   {"name": "log", "id": "", "state": "created", "exit_code": None,
                    "started_at": "", "finished_at": "", "ready": False}],
    "restarts": 1, "next_start": 0,
    "terminations": [{"container": "main", "reason": f"Exited({n})", "at": NOW - 100 + n,
                      "container_id": f"{n:02d}aabbccddeeff0011"} for n in range(7)],
    "created": NOW - 2 * 86400, "updated": NOW,
}


def test_age_units() -> None:
    assert output.age(NOW - 5, NOW) == "5s"
    assert output.age(NOW - 59.9, NOW) == "59s"
    assert output.age(NOW - 180, NOW) == "3m"
    assert output.age(NOW - 2 * 3600 - 10, NOW) == "2h"
    assert output.age(NOW - 4 * 86400, NOW) == "4d"
    assert output.age(NOW + 10, NOW) == "0s"
    assert output.age(0, NOW) == "-"
    assert output.age(None, NOW) == "-"


def test_ratio_and_host_ports() -> None:
    assert [output.ratio(x) for x in (1, 1.0, 1.5, 1.25, 2.345, 10)] == [
        "1.0x", "1.0x", "1.5x", "1.25x", "2.35x", "10.0x"]
    assert output.host_ports({"http": 31007, "admin": 31008}, ":") == "http:31007,admin:31008"
    assert output.host_ports({}, "=") == output.host_ports(None, "=") == "-"


def test_short_id_and_plural() -> None:
    assert output.short_id("3f2a9b8c7d6e5f4a3b2c") == "3f2a9b8c7d6e"
    assert output.short_id("") == "-"
    assert output.plural(1, "instance") == "1 instance"
    assert output.plural(2, "instance") == "2 instances"


def test_table_aligns_uppercases_and_strips() -> None:
    rows = [["a", "Ready", ""], ["long-name", "NotReady", "1"]]
    text = output.table(["name", "Status", "x"], rows)
    assert text.splitlines() == [
        "NAME       STATUS    X",
        "a          Ready     -",
        "long-name  NotReady  1",
    ]
    assert all(line == line.rstrip() for line in text.splitlines())


def test_node_table_and_wide() -> None:
    lines = output.list_table("nodes", [NODE], False, NOW).splitlines()
    assert lines[0].split() == ["NAME", "STATUS", "CPU(REQ/ALLOC)", "MEMORY(REQ/ALLOC)",
                                "INSTANCES", "LABELS"]
    assert lines[1].split() == ["h1", "Ready", "200m/2", "128Mi/2Gi", "2", "zone=a"]
    wide = output.list_table("nodes", [NODE], True, NOW).splitlines()
    assert wide[0].split()[-6:] == ["OVERCOMMIT", "PORTS", "ENGINE", "ADDRESS", "VERSION", "AGE"]
    assert wide[1].split()[-9:] == ["cpu", "1.5x", "mem", "1.0x", "31000-32767",
                                    "unix:///var/run/docker.sock", "-", "20.10.24", "5s"]
    assert "  zone=a  0/0              cpu 1.5x mem 1.0x  31000-32767  unix://" in wide[1]
    assert wide[0].split()[6] == "SSD(FREE/TOTAL)" and wide[1].split()[6] == "0/0"
    bare = {k: v for k, v in NODE.items() if k not in ("overcommit", "port_range")}
    wide = output.list_table("nodes", [{**bare, "ssd": {"free": 1, "total": 2}}], True,
                             NOW).splitlines()
    assert wide[1].split()[6:13] == ["1/2", "cpu", "1.0x", "mem", "1.0x", "-",
                                     "unix:///var/run/docker.sock"]


def test_ssd_table_and_wide() -> None:
    disk = {"node": "h1", "id": "loop3", "state": "bound", "size": 10 << 30,
            "claimed_by": "default/db-0", "path": "/dev/loop3", "rotational": False,
            "mount": "/var/lib/sigma/ssds/loop3", "error": "", "updated": NOW - 5}
    free = {**disk, "id": "loop4", "state": "ready", "claimed_by": ""}
    lines = output.list_table("ssds", [disk, free], False, NOW).splitlines()
    assert lines[0].split() == ["NODE", "ID", "STATE", "SIZE", "CLAIMED", "BY"]
    assert lines[1].split() == ["h1", "loop3", "bound", "10Gi", "default/db-0"]
    assert lines[2].split() == ["h1", "loop4", "ready", "10Gi", "-"]
    wide = output.list_table("ssds", [disk], True, NOW).splitlines()
    assert wide[1].split()[-5:] == ["/dev/loop3", "no", "/var/lib/sigma/ssds/loop3", "-", "5s"]


def test_app_table_and_wide() -> None:
    lines = output.list_table("apps", [APP], False, NOW).splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "GENERATION", "READY", "AGE"]
    assert lines[1].split() == ["default", "web", "3", "1/2", "3h"]
    wide = output.list_table("apps", [APP], True, NOW).splitlines()
    assert wide[1].split()[-2:] == ["sigma/busybox:latest", "always"]


def test_instance_table_and_wide() -> None:
    pending = {**INSTANCE, "name": "web-1", "state": "Pending", "node": "", "ip": "",
               "containers": [], "host_ports": {}, "reason": "no node has 100m cpu free"}
    lines = output.list_table("instances", [INSTANCE, pending], False, NOW).splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "STATE", "NODE", "IP", "RESTARTS", "AGE"]
    assert lines[1].split() == ["default", "web-0", "Running", "h1", "10.244.0.2", "1", "2d"]
    assert lines[2].split() == ["default", "web-1", "Pending", "-", "-", "1", "2d"]
    wide = output.list_table("instances", [INSTANCE, pending], True, NOW).splitlines()
    assert wide[0].split()[-5:] == ["GENERATION", "CONTAINERS", "PORTS", "CONFIGS", "REASON"]
    assert wide[1].split()[-5:] == ["3", "3f2a9b8c7d6e,-", "http:31007,admin:31008", "-", "-"]
    assert wide[2].split()[-10:-6] == ["3", "-", "-", "-"]
    configured = {**INSTANCE, "configs": {"web-conf": 4}, "configs_have": {"web-conf": 3}}
    row = output.list_table("instances", [configured], True, NOW).splitlines()[1]
    assert "web-conf:v3→v4" in row.split()
    assert wide[2].endswith("no node has 100m cpu free")


def test_dump_json_and_yaml_keep_api_order() -> None:
    assert json.loads(output.dump([APP], "json")) == [APP]
    assert output.dump({"b": 1, "a": 2}, "json") == '{\n  "b": 1,\n  "a": 2\n}'
    text = output.dump(APP, "yaml")
    assert yaml.safe_load(text) == APP
    assert text.splitlines()[0] == "namespace: default"


def test_fields_align() -> None:
    assert output.fields([("Name", "web"), ("Generation", 3), ("Reason", "")]).splitlines() == [
        "Name:        web",
        "Generation:  3",
        "Reason:      -",
    ]


def test_describe_app() -> None:
    text = output.describe_app(APP, NOW)
    assert "Replicas:    2 desired, 1 running" in text
    assert "Placement:   -" in text
    lines = text.splitlines()
    header = lines.index("Containers:")
    assert lines[header + 1].split() == ["NAME", "IMAGE", "COMMAND", "CPU(REQ/LIMIT)",
                                         "MEMORY(REQ/LIMIT)"]
    assert lines[header + 2].startswith("  main  sigma/busybox:latest  httpd -f -p 8080")
    assert lines[header + 2].split()[-2:] == ["100m/1.5", "64Mi/1Gi"]
    halted = output.describe_app({**APP, "configs": {"web-conf": 1}, "configs_halt":
                                  "configs web-conf v1 → v2 failed on instance web-0: x"}, NOW)
    assert "Configs:         web-conf v1\n" in halted
    assert "Config rollout:  configs web-conf v1 → v2 failed on instance web-0: x" in halted


def test_describe_instance_shows_last_terminations() -> None:
    text = output.describe_instance(INSTANCE, NOW)
    assert "Request:     cpu 100m, memory 64Mi" in text
    assert "3f2a9b8c7d6e " in text
    assert "Host ports:  http=31007,admin=31008" in text
    lines = text.splitlines()
    start = lines.index("Containers:")
    assert lines[start + 1].split() == ["NAME", "ID", "STATE", "READY", "EXIT", "STARTED",
                                        "FINISHED"]
    assert lines[start + 2].split()[:5] == ["main", "3f2a9b8c7d6e", "running", "yes", "-"]
    assert lines[start + 3].split() == ["log", "-", "created", "no", "-", "-", "-"]
    start = lines.index("Terminations:")
    rows = lines[start + 2:]
    assert [r.split()[-2] for r in rows] == [f"Exited({n})" for n in range(2, 7)]
    assert rows[-1].split()[-1] == "06aabbccddee"
    assert "(1m ago)" in rows[-1]


def test_describe_instance_without_terminations_or_containers() -> None:
    bare = {**INSTANCE, "containers": [], "terminations": [], "next_start": NOW + 30}
    del bare["host_ports"]
    text = output.describe_instance(bare, NOW)
    assert "Next start:  in 30s" in text
    assert "Host ports:  -" in text
    assert "Containers:  -" in text
    assert text.endswith("Terminations:  -")


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_prints_changes_only_off_a_terminal() -> None:
    stream = _Stream(tty=False)
    progress = output.Progress(stream)
    for text in ("waiting for 2", "waiting for 2", "waiting for 1"):
        progress.show(text)
    progress.clear()
    assert stream.getvalue() == "waiting for 2\nwaiting for 1\n"


def test_progress_rewrites_in_place_on_a_terminal() -> None:
    stream = _Stream(tty=True)
    progress = output.Progress(stream)
    progress.show("a")
    progress.show("b")
    progress.clear()
    assert stream.getvalue() == "\r\033[Ka\r\033[Kb\r\033[K"


def test_describe_instance_lists_its_disks() -> None:
    with_disks = {**INSTANCE, "ssds": [{"volume": "data", "disk": "loop3", "source": "/x"}]}
    assert "Disks:       data=h1/loop3" in output.describe_instance(with_disks, NOW)
    assert "Disks:" not in output.describe_instance(INSTANCE, NOW)


def test_describe_instance_shows_the_last_lines_of_its_last_end() -> None:
    ended = {**INSTANCE, "terminations": [
        *INSTANCE["terminations"],
        {"container": "main", "reason": "Exited(1)", "at": NOW - 1, "container_id": "77" * 32,
         "logs": [f"line {n}" for n in range(30)]}]}
    lines = output.describe_instance(ended, NOW).splitlines()
    start = lines.index("Last lines of main (777777777777, Exited(1)):")
    assert lines[start + 1:] == [f"  line {n}" for n in range(20, 30)]
    assert "Last lines" not in output.describe_instance(INSTANCE, NOW)
