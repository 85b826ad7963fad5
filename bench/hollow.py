"""Hollow engine cost: server CPU per request of N hollow engines in one process.

    python bench/hollow.py [--engines 5000] [--containers 100000] [--concurrency 128]

A child process serves N hollow engines (sigmad.lab.hollow_engine, one Unix socket each, no
agents, no etcd); this process drives them with keep-alive HTTP clients, phase by phase:
create, start, inspect, list (label filter), stop, remove, spread round-robin over the
engines, `--latency` ms added to create/start/stop as in a scale run. For each phase it
prints the server's CPU per request (from /proc/PID/stat) and the request rate. Every
process and socket is gone at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sigmad.lab.hollow import Capacity  # noqa: E402
from sigmad.lab.hollow_engine import EngineServer  # noqa: E402
from sigmad.lab.hollow_hosts import raise_nofile  # noqa: E402

IMAGE = "sigma/busybox:latest"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def serve(directory: Path, engines: int, latency: float) -> None:
    raise_nofile()
    gc.set_threshold(50_000, 50, 100)  # as sigmad lab hollow does
    servers = []
    for i in range(1, engines + 1):
        server = EngineServer(directory / f"h{i}.sock", Capacity(), latency, (IMAGE,))
        await server.start()
        servers.append(server)
    (directory / "ready").write_text(str(os.getpid()))
    try:
        await asyncio.Event().wait()
    finally:
        for server in servers:
            await server.close()


async def drive(args: argparse.Namespace, directory: Path, pid: int) -> list[dict[str, Any]]:
    raise_nofile()
    sessions = [aiohttp.ClientSession(connector=aiohttp.UnixConnector(
        str(directory / f"h{i}.sock"), limit=0)) for i in range(1, args.engines + 1)]
    names = [f"c{n}" for n in range(args.containers)]
    body = json.dumps({"Image": IMAGE, "Entrypoint": ["sleep"], "Cmd": ["1000"],
                       "Labels": {"sigma.instance": "ns/x", "sigma.cluster": "/c"},
                       "HostConfig": {"NanoCpus": 10**8, "Memory": 64 << 20,
                                      "MemorySwap": 64 << 20}}).encode()
    label = json.dumps({"label": ["sigma.instance", "sigma.cluster=/c"]})
    headers = {"Content-Type": "application/json"}

    def request(n: int) -> tuple[aiohttp.ClientSession, str]:
        return sessions[n % len(sessions)], names[n]

    async def one(kind: str, n: int) -> None:
        session, name = request(n)
        base = "http://docker/v1.41"
        if kind == "create":
            call = session.post(f"{base}/containers/create", params={"name": name},
                                data=body, headers=headers)
        elif kind == "inspect":
            call = session.get(f"{base}/containers/{name}/json")
        elif kind == "list":
            call = session.get(f"{base}/containers/json",
                               params={"all": "1", "filters": label})
        elif kind == "remove":
            call = session.delete(f"{base}/containers/{name}", params={"force": "1"})
        else:
            call = session.post(f"{base}/containers/{name}/{kind}")
        async with call as response:
            await response.read()
            if response.status >= 400:
                raise RuntimeError(f"{kind} {name}: {response.status}")

    results = []
    for kind in ("create", "start", "inspect", "list", "stop", "remove"):
        count = args.containers if kind != "list" else min(args.containers, args.engines * 4)
        queue = iter(range(count))

        async def worker(kind: str = kind, queue: Any = queue) -> None:
            for n in queue:
                await one(kind, n)

        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall, cpu = time.monotonic() - t0, cpu_seconds(pid) - cpu0
        row = {"call": kind, "requests": count, "server_cpu_us": round(cpu / count * 1e6, 1),
               "rate": round(count / wall), "wall_s": round(wall, 1)}
        print(json.dumps(row), flush=True)
        results.append(row)
    for session in sessions:
        await session.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=int, default=5000)
    parser.add_argument("--containers", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--latency", type=float, default=0.0, help="ms")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.engines, args.latency / 1000))
        return
    with tempfile.TemporaryDirectory(prefix="sigma-hollow-") as tmp:
        directory = Path(tmp)
        child = subprocess.Popen([sys.executable, __file__, "--serve", str(directory),
                                  "--engines", str(args.engines),
                                  "--latency", str(args.latency)], start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while not (directory / "ready").exists():
                if child.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the hollow engines did not start")
                time.sleep(0.2)
            started = cpu_seconds(child.pid)
            print(f"{args.engines} engines listening (server CPU to start: {started:.1f}s)",
                  flush=True)
            rows = asyncio.run(drive(args, directory, child.pid))
            total = sum(r["requests"] for r in rows)
            cpu = sum(r["server_cpu_us"] * r["requests"] for r in rows) / total
            print(json.dumps({"engines": args.engines, "requests": total,
                              "server_cpu_us_per_request": round(cpu, 1)}), flush=True)
        finally:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


if __name__ == "__main__":
    main()
