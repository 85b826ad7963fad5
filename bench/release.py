"""Release benchmark: a rolling release of a 30-instance httpd app with `max_parallel: 25%` on
the lab, and the requests lost while it rolls out (goal: 0).

    python bench/release.py [--instances 30] [--hosts 3] [--runs 1] [--keep]

Root: it builds a lab of its own (name `rl`, subnet 10.81.0.0/24, etcd 13479, registry 5101,
API 127.0.0.1:18181, host ports 32100-32199), applies an httpd app of --instances replicas
(`update: {max_parallel: 25%, min_ready: 2s}`) and a client app with one instance per host.
Each client loops over every instance's overlay IP (one wget per request, a new TCP
connection each, 3 s timeout) for the whole run. Per run: a new revision (an env change) is
applied with `sigmactl apply --wait`, which follows the rollout; reported are the time from
the apply to the rollout's `done` and the requests answered and lost meanwhile (a request
lost: not answered, refused or reset). Writes the "Release" section of docs/benchmarks.md and
prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.docs import measured, write_section  # noqa: E402
from bench.labctl import LabCtl  # noqa: E402
from sigmad.lab import Lab, LabConfig  # noqa: E402

SERVE = "mkdir -p /www && echo hello > /www/index.html && exec httpd -f -p 8080 -h /www"


class Bench(LabCtl):
    def __init__(self, lab: Lab) -> None:
        super().__init__(lab, timeout=900)

    def clients(self, ips: list[str]) -> list[subprocess.Popen[str]]:
        """A request loop over every IP in each client instance (`ok` or `fail` a line),
        until /stop appears in it (`stop`: ending `docker exec` leaves its process)."""
        loop = (f"rm -f /stop; while [ ! -e /stop ]; do for ip in {' '.join(ips)}; "
                "do if e=$(timeout 3 wget -qO- http://$ip:8080/ 2>&1 >/dev/null); then "
                "echo ok; else echo \"fail $ip ${e:-timed out}\"; fi; done; done")
        return [subprocess.Popen(["docker", "-H", self.lab.engines[c["node"]], "exec",
                                  c["containers"][0]["id"], "sh", "-c", loop],
                                 stdout=subprocess.PIPE, text=True)
                for c in self.instances("rlclient")]

    def stop(self) -> None:
        for c in self.instances("rlclient"):
            subprocess.run(["docker", "-H", self.lab.engines[c["node"]], "exec",
                            c["containers"][0]["id"], "touch", "/stop"],
                           capture_output=True, timeout=60)  # (a loop that goes on: killed)


def app(lab: Lab, name: str, replicas: int, env: dict[str, str],
        update: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"app": name, "replicas": replicas, "containers": [{
        "name": "main", "image": lab.image, "command": ["sh", "-c", SERVE], "env": env,
        "ready": {"tcp": 8080, "timeout": 30},
        "resources": {"request": {"cpu": "10m", "memory": "8Mi"},
                      "limit": {"memory": "32Mi"}}}]}
    if update:
        spec["update"] = update
    return spec


def count(procs: list[subprocess.Popen[str]]) -> Counter[str]:
    """What the client loops said (once they ended): `ok`, `fail`, and `reset` for the
    failures that were a connection reset (one open as its IP flipped: a live move does not
    carry TCP connections over)."""
    out: Counter[str] = Counter()
    for p in procs:
        try:
            text, _ = p.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate(timeout=15)
        for line in text.splitlines():
            if line.strip():
                out[line.split()[0]] += 1
                out["reset"] += "reset by peer" in line
                if line.startswith("fail"):
                    print(line, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=30)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    opts = parser.parse_args()
    lab = Lab(LabConfig(hosts=opts.hosts, name="rl", dir=Path("/var/lib/sigma-lab/rl-bench"),
                        subnet="10.81.0.0/24", etcd_port=13479, registry_port=5101,
                        listen="127.0.0.1:18181", port_range=(32100, 32199)))
    update = {"max_parallel": "25%", "min_ready": "2s"}
    try:
        lab.up()
        bench = Bench(lab)
        bench.ctl("apply", "-f", "-", "--wait", "--timeout", "600",
                  stdin=json.dumps(app(lab, "rlclient", opts.hosts, {})))
        bench.ctl("apply", "-f", "-", "--wait", "--timeout", "600",
                  stdin=json.dumps(app(lab, "rlweb", opts.instances, {"RUN": "0"}, update)))
        ips = [i["ip"] for i in bench.instances("rlweb")]
        rows = []
        for n in range(1, opts.runs + 1):
            procs = bench.clients(ips)
            time.sleep(3)
            start = time.monotonic()
            bench.ctl("apply", "-f", "-", "--wait", "--timeout", "900",
                      stdin=json.dumps(app(lab, "rlweb", opts.instances, {"RUN": str(n)},
                                           update)))
            took = time.monotonic() - start
            time.sleep(3)
            bench.stop()
            answers = count(procs)
            requests = answers["ok"] + answers["fail"]
            rows.append({"run": n, "seconds": took, "requests": requests,
                         "lost": answers["fail"], "resets": answers["reset"]})
            print(f"run {n}: {opts.instances} instances rolled out in {took:.1f}s; "
                  f"{answers['fail']} of {requests} requests lost ({answers['reset']} "
                  "connection resets)", flush=True)
        result = {"instances": opts.instances, "hosts": opts.hosts, "runs": rows,
                  "update": update}
        write_section(opts.out, "Release", section(result))
        print(json.dumps(result))
    finally:
        if not opts.keep:
            lab.down()


def section(result: dict[str, Any]) -> str:
    n, hosts = result["instances"], result["hosts"]
    return "\n".join([
        "## Release", "",
        *measured(f"python bench/release.py --instances {n} --hosts {hosts} --runs "
        f"{len(result['runs'])}"),
        f"A rolling release (a new revision: an env change) of a {n}-instance httpd app on a "
        f"{hosts}-host lab (TLS on), `update: {{max_parallel: 25%, min_ready: 2s}}` (at most "
        f"{max(1, n * 25 // 100)} instances in transition; each moves live to another host "
        "with its IP: its old copy drains before the flip (its agent drops new SYNs to it "
        "and waits for its open connections to end, at most 3 s), and stops once every agent "
        "has applied the flip), from `sigmactl apply --wait` to the rollout's `done`, while "
        "one client per host requests every instance's IP in turn (a new connection per "
        "request; goal: 0 lost). A lost request that was a connection reset is one whose "
        "connection was still open at the flip (the new copy does not know it); a timed-out "
        "one, a SYN dropped by the drain and not answered by the new copy within the "
        "client's 3 s; a refused one, the old copy stopping too early. The drain's cost: a "
        "request whose SYN was dropped waits for its kernel's retry (about 1 s), so the "
        "clients make fewer requests in the same time than without it.", "",
        "| run | duration | requests | lost | of which resets |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {r['run']} | {r['seconds']:.1f} s | {r['requests']} | {r['lost']} | "
          f"{r['resets']} |" for r in result["runs"]),
        "", goal(result["runs"]), "",
    ])


def goal(runs: list[dict[str, Any]]) -> str:
    """Whether the goal (0 lost) was met, and what the losses were."""
    lost, resets = sum(r["lost"] for r in runs), sum(r["resets"] for r in runs)
    requests = sum(r["requests"] for r in runs)
    if not lost:
        return f"Goal met: 0 of {requests} requests lost."
    return (f"Goal not met: {lost} of {requests} requests lost, {resets} of them connection "
            "resets at a flip" + ("" if lost == resets else f", {lost - resets} other") + ".")


if __name__ == "__main__":
    main()
