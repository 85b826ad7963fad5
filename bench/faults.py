"""Fault benchmark on a 3-host lab: how fast a broken host's instances come back elsewhere.

    python bench/faults.py [--runs 5] [--ttl 5]      (root: it builds its own lab)

For each fault (a killed host: agent, dockerd and containers; a cut underlay link) and each
run it measures, from the fault: detection (the instance leaves Running), Running on another
host with the same IP, and a peer on a third host reaching that IP again. It also measures
the master failover of an HA pair (SIGKILL of the leader until the standby leads). Prints the
median and worst of each and writes the "Failover" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.docs import write_section  # noqa: E402
from sigmad.lab import Lab, LabConfig  # noqa: E402
from sigmad.lab.services import master_url  # noqa: E402

T = TypeVar("T")
HTTPD = ("mkdir -p /www && echo hello from $SIGMA_INSTANCE > /www/index.html && "
         "exec httpd -f -p 8080 -h /www")
TARGET = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def until(check: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise SystemExit(f"timed out after {timeout}s waiting for {what}")


class Bench:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        # The lab's API is HTTPS with a CA of its own ("" for a lab made with --no-tls).
        self.context = ssl.create_default_context(cafile=lab.ca) if lab.ca else None

    def api(self, method: str, path: str, body: Any = None, server: str = "") -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"{server or self.lab.server}{path}", data=data, method=method,
            headers={"Authorization": f"Bearer {self.lab.token}",
                     "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10, context=self.context) as r:
            return json.loads(r.read())

    def apply(self, spec: dict[str, Any]) -> None:
        data = json.dumps(spec).encode()
        req = urllib.request.Request(f"{self.lab.server}/v1/apps", data=data, method="PUT",
                                     headers={"Authorization": f"Bearer {self.lab.token}"})
        urllib.request.urlopen(req, timeout=10, context=self.context).close()

    def web(self, app: str, replicas: int, placement: dict[str, Any]) -> None:
        self.apply({"app": app, "replicas": replicas, "placement": placement, "containers": [{
            "name": "main", "image": self.lab.image, "command": ["sh", "-c", HTTPD],
            "ready": {"tcp": 8080, "timeout": 20},
            "resources": {"request": {"cpu": "10m", "memory": "8Mi"}},
        }]})

    def instances(self, app: str) -> list[dict[str, Any]]:
        return self.api("GET", f"/v1/instances?app={app}")["items"]  # type: ignore[no-any-return]

    def running(self, app: str, count: int) -> list[dict[str, Any]]:
        def check() -> list[dict[str, Any]] | None:
            items = self.instances(app)
            ok = len(items) == count and all(i["state"] == "Running" for i in items)
            return items if ok else None

        return until(check, 90, f"{count} Running instances of {app}")

    def delete(self, app: str) -> None:
        self.api("DELETE", f"/v1/apps/default/{app}")
        until(lambda: not self.instances(app), 60, f"{app} gone")

    def reaches(self, client: dict[str, Any], ip: str, name: str) -> bool:
        out = subprocess.run(
            ["docker", "-H", self.lab.engines[client["node"]], "exec",
             client["containers"][0]["id"], "timeout", "2", "wget", "-qO-",
             f"http://{ip}:8080"], capture_output=True, text=True, timeout=10,
        ).stdout
        return out.strip() == f"hello from {name}"

    def ready(self, node: str) -> bool:
        return any(n["name"] == node and n["status"] == "Ready"
                   for n in self.api("GET", "/v1/nodes")["items"])

    def fault_run(self, fault: str, host: str) -> dict[str, float]:
        """One run: svc spread one per host, a client on h1; break `host`; time the move."""
        self.web("svc", 3, {"spread": "host"})
        client = self.running("client", 1)[0]
        lost = next(i for i in self.running("svc", 3) if i["node"] == host)
        name = f"svc-{lost['index']}"
        start = time.monotonic()
        (self.lab.kill_host if fault == "kill" else self.lab.partition)(host)
        marks: dict[str, float] = {}

        def moved() -> bool:
            now = next(i for i in self.instances("svc") if i["index"] == lost["index"])
            t = time.monotonic() - start
            if "detected" not in marks and (now["state"] != "Running" or now["node"] != host):
                marks["detected"] = t
            if "running" not in marks and now["state"] == "Running" and now["node"] != host:
                assert now["ip"] == lost["ip"], (now, lost)
                marks["running"] = t
            if "running" in marks and self.reaches(client, lost["ip"], name):
                marks["reachable"] = time.monotonic() - start
                return True
            return False

        until(moved, 60, f"{name} moved off {host}")
        self.lab.heal(host)
        until(lambda: self.ready(host), 60, f"{host} Ready again")
        self.delete("svc")
        return marks

    def masters_view(self) -> list[dict[str, Any]] | None:
        """GET /v1/masters from the first master that answers."""
        for m in self.lab.masters:
            try:
                server = master_url(m.listen, self.lab.ca)
                return self.api("GET", "/v1/masters", server=server)["items"]
            except OSError:
                continue
        return None

    def failover_run(self) -> float | None:
        """SIGKILL the leading master; seconds until another one leads (None: no HA pair)."""
        masters = self.lab.masters
        if len(masters) < 2:
            return None
        view = until(lambda: (v := self.masters_view()) and len(v) == len(masters)
                     and any(m["role"] == "leader" for m in v) and v, 60, "both masters")
        leader = next(m for m in view if m["role"] == "leader")
        victim = next(m for m in masters if leader["api"].endswith(m.listen))
        start = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)

        def led() -> bool:
            now = self.masters_view() or []
            return any(m["role"] == "leader" and m["id"] != leader["id"] for m in now)

        until(led, 30, "a new leader")
        took = time.monotonic() - start
        self.lab.restart_master(victim.listen)
        return took


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} s | {max(values):.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ttl", type=int, default=5, help="heartbeat TTL of the agents")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/faults.py builds a lab: run it as root")
    root = Path(tempfile.mkdtemp(prefix="sigma-bench-"))
    os.environ["SIGMA_CREDENTIALS"] = str(root / "credentials.json")
    config = LabConfig(hosts=3, name="bf", dir=root / "lab", subnet="10.82.0.0/24",
                       etcd_port=22679, registry_port=free_port(), listen="127.0.0.1:7795",
                       heartbeat_ttl=args.ttl, masters=2)
    lab = Lab(config)
    results: dict[str, list[float]] = {}
    try:
        lab.up()
        bench = Bench(lab)
        bench.web("client", 1, {"labels": {"host": "h1"}})
        for fault, host in (("kill", "h3"), ("partition", "h2")):
            for n in range(args.runs):
                marks = bench.fault_run(fault, host)
                print(f"{fault} {host} run {n + 1}: " +
                      ", ".join(f"{k} {v:.2f}s" for k, v in marks.items()), flush=True)
                for k, v in marks.items():
                    results.setdefault(f"{fault}/{k}", []).append(v)
        for n in range(args.runs):
            took = bench.failover_run()
            if took is None:
                break
            print(f"master failover run {n + 1}: {took:.2f}s", flush=True)
            results.setdefault("failover", []).append(took)
    finally:
        lab.down()
    rows = [
        ("Killed host (agent, dockerd, containers): detected", "kill/detected"),
        ("Killed host: Running on another host, same IP", "kill/running"),
        ("Killed host: a peer reaches the moved IP", "kill/reachable"),
        ("Cut underlay link: detected", "partition/detected"),
        ("Cut underlay link: Running on another host, same IP", "partition/running"),
        ("Cut underlay link: a peer reaches the moved IP", "partition/reachable"),
        ("Master failover (SIGKILL of the leader until the standby leads)", "failover"),
    ]
    lines = [f"| {label} | {summary(results[key])} | {len(results[key])} |"
             for label, key in rows if key in results]
    worst = max(max(results[k]) for k in ("kill/reachable", "partition/reachable"))
    section = f"""## Failover

Measured {datetime.date.today()} on this machine (2 cores), on a 3-host lab (network
namespaces, one dockerd each, real VXLAN) with the agents' heartbeat TTL {args.ttl} s and
an HA pair of masters (leader lease TTL 5 s), {args.runs} runs of each, with:

```
python bench/faults.py --runs {args.runs} --ttl {args.ttl}
```

| From the fault until … | median | worst | runs |
| --- | --- | --- | --- |
{chr(10).join(lines)}

Target: a peer reaches the moved instance's IP within {TARGET:g} s of the fault; worst case
measured: {worst:.1f} s ({"met" if worst <= TARGET else "NOT met"}). Detection is bounded by
the heartbeat TTL (the lease must lapse); the rest is one reconcile pass, one placement,
starting the container and the peers' agents re-pointing their tunnel FDB entry.
"""
    print(section)
    write_section(args.out, "Failover", section)


if __name__ == "__main__":
    main()
