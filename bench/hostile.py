"""Hostile input benchmark: what each of the bodies and paths the trust issue found on main
costs a real master, and how long a GET sent meanwhile waits (the serving loop's stall).

Starts etcd and one `sigmad master`, samples `GET /v1/apps` every 10 ms from a thread of its
own, sends each hostile request in turn (after an idle baseline), and reports its status, its
own time and the slowest sampled GET while it was in flight. Writes the "Hostile input" section
of docs/benchmarks.md and prints one JSON object on its last line.

    python bench/hostile.py
"""

from __future__ import annotations

import argparse
import http.client
import json
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.docs import write_section  # noqa: E402
from sigmad.procs import EtcdProcess  # noqa: E402

SAMPLE_EVERY = 0.01


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hostile() -> list[tuple[str, str, str, bytes]]:
    """(what, method, path, body) of each request the issue found answered badly."""
    laughs = "a: &a [" + ",".join(["x"] * 10) + "]\n"
    for i in range(1, 9):
        prev = "a" if i == 1 else f"a{i - 1}"
        laughs += f"a{i}: &a{i} [" + ",".join([f"*{prev}"] * 10) + "]\n"
    app = {"app": "web", "replicas": 2,
           "containers": [{"name": "main", "image": "busybox:1"}]}
    ips = dict(app, network={"ip": [f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}"
                                    for i in range(70_000)]})
    nested = "app: web\ncontainers: " + "[" * 500 + "]" * 500 + "\n"
    return [
        ("YAML alias bomb (9 levels of 10)", "PUT", "/v1/apps", laughs.encode()),
        ("network.ip of 70,000 addresses (1 MiB)", "PUT", "/v1/apps",
         yaml.safe_dump(ips).encode()[:1_048_000]),
        ("an integer of 4,301 digits", "PUT", "/v1/apps",
         f"app: web\nreplicas: {'9' * 4301}\n".encode()),
        ("500 nested lists", "PUT", "/v1/apps", nested.encode()),
        ("a body that is not UTF-8", "PUT", "/v1/apps", b"app: w\xffeb\n"),
        ("129 documents in one apply", "PUT", "/v1/apps",
         "\n---\n".join(yaml.safe_dump(dict(app, app=f"a{i}")) for i in range(129)).encode()),
        ("app name with a trailing newline", "PUT", "/v1/apps",
         json.dumps(dict(app, app="web\n")).encode()),
        ("an instance name web-\u00b2", "GET", "/v1/instances/default/web-%C2%B2", b""),
        ("a body of 2 MiB", "PUT", "/v1/apps", b"#" * (2 << 20)),
        ("JSON nested 50,000 deep", "PUT", "/v1/apps", b"[" * 50_000 + b"]" * 50_000),
    ]


class Master:
    """One etcd and one master, on loopback, for the length of the run."""

    def __init__(self, root: Path) -> None:
        self.etcd = EtcdProcess(root / "etcd", free_port(), free_port(), name="hostile")
        self.etcd.start()
        self.port = free_port()
        self.token = secrets.token_hex(16)
        config = root / "master.yaml"
        config.write_text(yaml.safe_dump({
            "listen": f"127.0.0.1:{self.port}", "token": self.token,
            "etcd": {"endpoints": [self.etcd.endpoint], "prefix": "/hostile"}}))
        self.log = open(root / "master.log", "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sigmad", "master", "--config", str(config)],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while self.call("GET", "/healthz")[0] != 200:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"the master did not start: see {root / 'master.log'}")
            time.sleep(0.2)

    def call(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body or None,
                         headers={"Authorization": f"Bearer {self.token}"})
            answer = conn.getresponse()
            return answer.status, answer.read()
        except OSError:
            return 0, b""
        finally:
            conn.close()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        self.etcd.stop()


class Sampler(threading.Thread):
    """GET /v1/apps every SAMPLE_EVERY seconds; (sent at, seconds taken) of each."""

    def __init__(self, master: Master) -> None:
        super().__init__(daemon=True)
        self.master = master
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            sent = time.monotonic()
            self.master.call("GET", "/v1/apps")
            self.samples.append((sent, time.monotonic() - sent))
            self.stop.wait(SAMPLE_EVERY)

    def worst(self, start: float, end: float) -> float:
        """The slowest GET that was in flight at some moment of [start, end]."""
        return max((d for s, d in self.samples if s <= end and s + d >= start), default=0.0)


def run() -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="sigma-hostile-") as tmp:
        master = Master(Path(tmp))
        sampler = Sampler(master)
        sampler.start()
        try:
            time.sleep(2)
            start = time.monotonic()
            time.sleep(3)
            idle = sampler.worst(start, time.monotonic())
            rows = []
            for what, method, path, body in hostile():
                start = time.monotonic()
                status, answer = master.call(method, path, body)
                end = time.monotonic()
                time.sleep(0.2)
                try:
                    error = json.loads(answer).get("error", {})
                except ValueError:
                    error = {}
                rows.append({"what": what, "bytes": len(body), "status": status,
                             "field": error.get("field", "") if isinstance(error, dict) else "",
                             "seconds": round(end - start, 3),
                             "worst_get_s": round(sampler.worst(start, end), 3)})
                print(f"{what}: {status} in {end - start:.3f}s, slowest GET meanwhile "
                      f"{rows[-1]['worst_get_s']:.3f}s", flush=True)
            alive = master.call("GET", "/healthz")[0] == 200
            written = master.call("GET", "/v1/apps")[1]
        finally:
            sampler.stop.set()
            sampler.join(5)
            master.stop()
    return {"idle_worst_get_s": round(idle, 3), "rows": rows, "alive_after": alive,
            "apps_written": len(json.loads(written).get("items", [])) if written else -1,
            "samples": len(sampler.samples)}


def section(r: dict[str, object], command: str) -> str:
    rows = r["rows"]
    assert isinstance(rows, list)
    lines = [
        "## Hostile input", "",
        f"Measured {time.strftime('%Y-%m-%d')} on this machine (2 cores shared with other work), "
        "one etcd and one master on loopback, in one run of:", "",
        "```", command, "```", "",
        "| Request | Bytes | Answer | Field named | Its time | Slowest GET meanwhile |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(f"| {row['what']} | {row['bytes']:,} | {row['status']} | "
                     f"{row['field'] or '-'} | {row['seconds']:.3f} s | "
                     f"{row['worst_get_s']:.3f} s |")
    lines += [
        "",
        f"- The slowest GET while idle (3 s before the first request): "
        f"{r['idle_worst_get_s']:.3f} s; {r['samples']} GETs sampled in all, one every 10 ms "
        "from a thread of the benchmark.",
        f"- After the run the master answered /healthz: {'yes' if r['alive_after'] else 'no'}; "
        f"apps written by all of the above: {r['apps_written']}.",
        "- 'Slowest GET meanwhile' is the longest GET /v1/apps in flight at any moment while "
        "the hostile request was: the stall one request imposes on everyone else.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    result = run()
    write_section(args.out, "Hostile input", section(result, "python bench/hostile.py"))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
