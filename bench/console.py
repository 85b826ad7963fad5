"""Console benchmark: the page's weight, and the master's CPU with 10 consoles open.

    python bench/console.py [--seconds 45] [--keep] [--out docs/benchmarks.md]

Root: it builds a 3-host lab of its own (name `console`, subnet 10.81.24.0/24, free ports,
TLS on), applies an app of 6 replicas, and removes the lab on exit unless --keep.

- Page weight: the bytes of /ui/, console.js and console.css as served (no compression), and
  of the first state message and the history a console reads on load.
- CPU: the master's user+system CPU (from /proc/PID/stat) over --seconds, three ways: no
  console; 10 consoles (10 reader tokens, each signed in by POST /ui/session, each reading
  its own /v1/console?watch=true stream, as an open page does); no console again, with the
  same churn as the 10-console run: the app is scaled between 6 and 8 replicas every 5 s, so
  every console gets a state message for each change. (A console in a browser also fetches
  the page of an open app or instance every 2 s; the pool and nodes pages read only the
  stream.) Writes the "Console" section of docs/benchmarks.md and prints one JSON object on
  its last line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import ssl
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.docs import write_section  # noqa: E402
from sigmad.lab import Lab, LabConfig  # noqa: E402

CONSOLES = 10
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Master:
    """HTTPS calls to the lab's master, verified with its CA."""

    def __init__(self, lab: Lab) -> None:
        self.url = lab.server
        self.token = lab.token
        self.tls = ssl.create_default_context(cafile=lab.ca)

    def call(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None, token: bool = True
             ) -> tuple[int, bytes, Any]:
        head = {"Authorization": f"Bearer {self.token}"} if token else {}
        request = urllib.request.Request(self.url + path, data=body, method=method,
                                         headers={**head, **(headers or {})})
        with urllib.request.urlopen(request, context=self.tls, timeout=30) as r:
            return r.status, r.read(), r.headers


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def console_stream(master: Master, token: str, stop: threading.Event, got: list[int]
                   ) -> None:
    """Sign in with `token` and read the console stream until `stop`; count messages."""
    _, _, headers = master.call("POST", "/ui/session", json.dumps({"token": token}).encode(),
                                {"Content-Type": "application/json"}, token=False)
    cookie = headers["Set-Cookie"].split(";", 1)[0]
    request = urllib.request.Request(master.url + "/v1/console?watch=true",
                                     headers={"Cookie": cookie})
    with urllib.request.urlopen(request, context=master.tls, timeout=30) as r:
        while not stop.is_set():
            line = r.readline()
            if not line:
                break
            if line.startswith(b"data: "):
                got[0] += 1


def spec(image: str, replicas: int) -> bytes:
    return yaml.safe_dump({"app": "churn", "replicas": replicas, "containers": [{
        "name": "main", "image": image, "command": ["sh", "-c", "exec sleep 100000"],
        "resources": {"request": {"cpu": "10m", "memory": "8Mi"},
                      "limit": {"memory": "32Mi"}}}]}).encode()


def measure(master: Master, pid: int, seconds: float, image: str, churn: bool) -> float:
    """The master's CPU seconds per second over `seconds`, scaling the app every 5 s if
    `churn`."""
    start, began = cpu_seconds(pid), time.monotonic()
    n = 0
    while time.monotonic() - began < seconds:
        if churn:
            n += 1
            master.call("PUT", "/v1/apps", spec(image, 8 if n % 2 else 6))
        time.sleep(min(5.0, max(0.0, seconds - (time.monotonic() - began))))
    return (cpu_seconds(pid) - start) / (time.monotonic() - began)


def bench(lab: Lab, seconds: float) -> dict[str, Any]:
    master = Master(lab)
    weight = {}
    for path in ("/ui/", "/ui/console.js", "/ui/console.css"):
        weight[path] = len(master.call("GET", path, token=False)[1])
    master.call("PUT", "/v1/apps", spec(lab.image, 6))
    time.sleep(10)
    weight["state message"] = len(master.call("GET", "/v1/console")[1])
    weight["history"] = len(master.call("GET", "/v1/console/history")[1])
    pid = lab.masters[0].pid
    idle = measure(master, pid, seconds, lab.image, churn=False)
    tokens = []
    for i in range(CONSOLES):
        body = json.dumps({"name": f"viewer{i}", "role": "reader"}).encode()
        tokens.append(json.loads(master.call("POST", "/v1/tokens", body)[1])["token"])
    stop = threading.Event()
    counts = [[0] for _ in tokens]
    threads = [threading.Thread(target=console_stream, args=(master, t, stop, c), daemon=True)
               for t, c in zip(tokens, counts, strict=True)]
    for t in threads:
        t.start()
    time.sleep(3)
    with_consoles = measure(master, pid, seconds, lab.image, churn=True)
    stop.set()
    messages = sum(c[0] for c in counts)
    time.sleep(8)  # the streams end at their next heartbeat
    without = measure(master, pid, seconds, lab.image, churn=True)
    return {"weight": weight, "cpu_idle": idle, "cpu_10_consoles_churn": with_consoles,
            "cpu_no_console_churn": without, "messages": messages, "seconds": seconds}


def section(r: dict[str, Any]) -> str:
    w = r["weight"]
    page = w["/ui/"] + w["/ui/console.js"] + w["/ui/console.css"]
    rows = "\n".join(f"| {k} | {v:,} |" for k, v in w.items())
    return f"""## Console

`bench/console.py` on a 3-host lab (TLS), an app of 6 replicas; {platform.node()},
{os.cpu_count()} cores shared with other work, {datetime.date.today()}.

Page weight (bytes as served, uncompressed; nothing else is fetched: no font, image or library):

| What | Bytes |
| --- | --- |
{rows}
| the page (HTML + JS + CSS) | {page:,} |

The master's CPU (user + system, one core = 100 %), each over {r['seconds']:.0f} s:

| Consoles | Churn (scale 6 ↔ 8 every 5 s) | Master CPU |
| --- | --- | --- |
| 0 | no | {100 * r['cpu_idle']:.1f} % |
| 10 (each its own reader token and stream) | yes | {100 * r['cpu_10_consoles_churn']:.1f} % |
| 0 | yes | {100 * r['cpu_no_console_churn']:.1f} % |

The 10 consoles got {r['messages']:,} messages (state messages at most one a second, built
once for all of them, and the events). The difference between the last two rows is what 10
open consoles cost the master.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=45)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    opts = parser.parse_args()
    root = Path(f"/tmp/sigma-bench-console-{os.getpid()}")
    lab = Lab(LabConfig(hosts=3, name="console", dir=root, subnet="10.81.24.0/24",
                        etcd_port=free_port(), registry_port=free_port(),
                        listen=f"127.0.0.1:{free_port()}"))
    try:
        lab.up()
        result = bench(lab, opts.seconds)
        write_section(opts.out, "Console", section(result))
        print(json.dumps(result))
    finally:
        if not opts.keep:
            lab.down()


if __name__ == "__main__":
    main()
