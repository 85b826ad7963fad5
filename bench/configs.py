"""Config benchmark: the time from `sigmactl config create` (a new version) to the new
content being served by every instance of a 30-instance app on the lab.

    python bench/configs.py [--instances 30] [--hosts 3] [--runs 3] [--keep]

Root: it builds a lab of its own (name `cfgb`, subnet 10.81.13.0/24, free ports), applies an
httpd app of --instances replicas that serves its config `bench-conf` (mounted at /etc/web,
on_change none), then per run: writes a new version with `sigmactl config create` and polls
every instance's index.html over the overlay (one `docker exec` per host running a wget loop
from a container on that host, every 50 ms) until all answer the new content; reported is
the time from the start of `sigmactl config create` to the first sample round in which every
instance answers it, and when the last instance recorded the version (`configs_have`). Writes
the "Configs" section of docs/benchmarks.md and prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.docs import measured, write_section  # noqa: E402
from bench.labctl import LabCtl  # noqa: E402
from sigmad.lab import Lab, LabConfig  # noqa: E402

SERVE = "httpd -f -p 8080 -h /etc/web"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Bench(LabCtl):
    def __init__(self, lab: Lab) -> None:
        super().__init__(lab, timeout=300)

    def version(self, text: str) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".html") as f:
            f.write(text)
            f.flush()
            self.ctl("config", "create", "bench-conf", "--from-file", f"index.html={f.name}")


    def served(self, pollers: dict[str, dict[str, Any]], ips: list[str]) -> list[str]:
        """One round: what every instance answers (from a poller on each host, in turn)."""
        inst = next(iter(pollers.values()))
        loop = ("for ip in " + " ".join(ips) + "; do "
                "timeout 2 wget -qO- http://$ip:8080/index.html; echo; done")
        out = subprocess.run(["docker", "-H", self.lab.engines[inst["node"]], "exec",
                              inst["containers"][0]["id"], "sh", "-c", loop],
                             capture_output=True, text=True, timeout=60).stdout
        return out.splitlines()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=30)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    opts = parser.parse_args()
    root = Path("/var/lib/sigma-lab/cfgb-bench")
    lab = Lab(LabConfig(hosts=opts.hosts, name="cfgb", dir=root, subnet="10.81.13.0/24",
                        etcd_port=free_port(), registry_port=free_port(),
                        listen=f"127.0.0.1:{free_port()}"))
    try:
        lab.up()
        bench = Bench(lab)
        bench.version("v0")
        spec = {"app": "cfgbench", "replicas": opts.instances, "containers": [{
            "name": "main", "image": lab.image, "command": ["sh", "-c", SERVE],
            "ready": {"tcp": 8080, "timeout": 30},
            "resources": {"request": {"cpu": "10m", "memory": "8Mi"},
                          "limit": {"memory": "32Mi"}}}],
            "configs": [{"name": "bench-conf", "mount": "/etc/web"}],
            "update": {"max_parallel": "100%"}}  # all at once, as measured before batches
        bench.ctl("apply", "-f", "-", "--wait", "--timeout", "300", stdin=json.dumps(spec))
        found = bench.instances("cfgbench")
        ips = [i["ip"] for i in found]
        pollers = {i["node"]: i for i in found}
        rows = []
        for n in range(1, opts.runs + 1):
            text = f"v{n}"
            start = time.monotonic()
            bench.version(text)
            sent = time.monotonic() - start
            while True:
                answers = bench.served(pollers, ips)
                if len(answers) == len(ips) and all(a == text for a in answers):
                    break
                if time.monotonic() - start > 120:
                    raise SystemExit(f"run {n}: not every instance serves {text} after 120 s")
                time.sleep(0.05)
            served = time.monotonic() - start
            while not all(i.get("configs_have", {}).get("bench-conf") == n + 1
                          for i in bench.instances("cfgbench")):
                time.sleep(0.1)
            recorded = time.monotonic() - start
            rows.append({"run": n, "create_s": sent, "served_s": served,
                         "recorded_s": recorded})
            print(f"run {n}: sigmactl {sent:.2f}s, all {len(ips)} serve it after "
                  f"{served:.2f}s, all recorded after {recorded:.2f}s", flush=True)
        result = {"instances": len(ips), "hosts": opts.hosts, "runs": rows,
                  "served_s": statistics.median(r["served_s"] for r in rows),
                  "recorded_s": statistics.median(r["recorded_s"] for r in rows)}
        write_section(opts.out, "Configs", section(result))
        print(json.dumps(result))
    finally:
        if not opts.keep:
            lab.down()


def section(result: dict[str, Any]) -> str:
    return "\n".join([
        "## Configs", "",
        *measured(f"python bench/configs.py --instances {result['instances']} --hosts "
        f"{result['hosts']} --runs {len(result['runs'])}"),
        f"A new version of a config mounted by all {result['instances']} instances of an httpd "
        f"app on a {result['hosts']}-host lab (TLS on), from the start of `sigmactl config "
        "create` to the first poll round in which every instance serves the new file over the "
        "overlay (every instance re-pinned at once: the batched rollout is the release "
        "controller's, see issue 12).", "",
        "| Measure | median |", "| --- | --- |",
        f"| create → served by all | {result['served_s']:.2f} s |",
        f"| create → recorded by all (`configs_have`) | {result['recorded_s']:.2f} s |", "",
        "| run | sigmactl | served by all | recorded by all |", "| --- | --- | --- | --- |",
        *(f"| {r['run']} | {r['create_s']:.2f} s | {r['served_s']:.2f} s | "
          f"{r['recorded_s']:.2f} s |" for r in result["runs"]),
        "",
    ])


if __name__ == "__main__":
    main()
