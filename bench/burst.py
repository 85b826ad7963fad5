"""Burst benchmark: Sigma starting N instances of one app on a lab, against raw `docker run -d`
of the same containers on the same engines.

    python bench/burst.py --hosts 3 --instances 300 [--runs 1] [--first 5] [--keep]
    python bench/burst.py --lab-dir DIR --instances 30       (reuse a lab, leave it up)

Root: it builds its own lab (name `burst`, subnet 10.81.0.0/24, free ports for etcd, the
registry and the API), and removes it on exit, also on Ctrl-C or failure, unless --keep. It
talks to Sigma only through the HTTP API and to the engines only through docker (the CLI for
everything it measures, the Engine API socket to list and inspect), so it measures any Sigma
version the same way. Measured, in one run, on the same engines:

- first_running_s: on the idle lab, from sending PUT /v1/apps of a 1-replica app until a
  GET /v1/instances (polled every 25 ms) answers it Running; --first times, deleted in between.
- sigma_s: from sending PUT /v1/apps of N replicas of `sleep` until a GET /v1/instances
  answers all N Running (polled every --poll s, 0.25); then DELETE until no container is left.
- raw_s: `docker run -d` of the same image, command and cgroup caps (read from a container
  Sigma made), N/hosts per engine, one sequential stream per engine, the engines' streams in
  parallel, from the first start until the last `docker run` returned; then `docker rm -f`.
- ratio = sigma_s / raw_s. With --runs > 1, sigma and raw alternate which goes first.

Prints progress, writes the "Burst" section of docs/benchmarks.md and prints one JSON object
on its last line.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import ipaddress
import json
import os
import platform
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.docs import write_section  # noqa: E402
from sigmad.lab import Lab, LabConfig, LabError  # noqa: E402

T = TypeVar("T")
NAMESPACE = "default"
FIRST_APP = "bench-first"
BURST_APP = "bench-burst"
COMMAND = ["sleep", "86400"]
REQUEST = {"cpu": "5m", "memory": "4Mi"}
RAW_LABEL = "sigma-bench.burst"  # on raw containers only: how cleanup finds them
FIRST_POLL = 0.025
IDLE_TIMEOUT = 120.0
DOCKER_TIMEOUT = 120.0
# HostConfig fields that carry cgroup caps, and the `docker run` flag that sets each.
CAP_FLAGS: tuple[tuple[str, str], ...] = (
    ("NanoCpus", "--cpus"), ("CpuShares", "--cpu-shares"), ("CpuPeriod", "--cpu-period"),
    ("CpuQuota", "--cpu-quota"), ("CpusetCpus", "--cpuset-cpus"),
    ("CpusetMems", "--cpuset-mems"), ("Memory", "--memory"), ("MemorySwap", "--memory-swap"),
    ("MemoryReservation", "--memory-reservation"), ("MemorySwappiness", "--memory-swappiness"),
    ("PidsLimit", "--pids-limit"), ("BlkioWeight", "--blkio-weight"),
    ("OomKillDisable", "--oom-kill-disable"),
)
# What the engine means when a field is unset, where 0 is not it (0 is a swappiness).
CAP_DEFAULTS: dict[str, int] = {"MemorySwappiness": -1, "PidsLimit": -1}


class BenchError(Exception):
    """The benchmark cannot go on: what went wrong, in words."""


def say(text: str) -> None:
    print(text, flush=True)


def loadavg() -> str:
    """The first three fields of /proc/loadavg."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def cpu_ticks(pids: Sequence[int] = ()) -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat, or with `pids` (busy of
    those processes, total of the machine)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    busy = total - fields[3] - fields[4]
    if pids:
        busy = 0
        for pid in pids:
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
                busy += int(stat[11]) + int(stat[12])  # utime stime
    return busy, total


class CpuMeter:
    """CPU used from creation to `read()`: the machine's busy share, and the seconds of some
    processes (the masters of a lab this benchmark built)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.machine = cpu_ticks()
        self.procs = cpu_ticks(pids) if pids else (0, 0)

    def read(self) -> dict[str, float]:
        busy, total = cpu_ticks()
        span = max(total - self.machine[1], 1)
        out = {"machine_busy": round((busy - self.machine[0]) / span, 3)}
        if self.pids:
            hz = os.sysconf("SC_CLK_TCK")
            out["master_cpu_s"] = round((cpu_ticks(self.pids)[0] - self.procs[0]) / hz, 2)
        return out


def lab_pids(lab: Lab) -> list[int]:
    """The lab's own processes: masters, agents, dockerds and their children (containerd),
    etcd and the registry."""
    state = lab.state
    if state is None:
        return []
    pids = {m.pid for m in state.masters}
    pids |= {p for h in state.hosts for p in (h.agent_pid, h.dockerd_pid)}
    pids |= {x.pid for x in (state.etcd, state.registry) if x is not None}
    parents = set(pids)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int((entry / "stat").read_text().rpartition(")")[2].split()[1]) in parents:
                    pids.add(int(entry.name))
    return sorted(p for p in pids if p > 0)


def settle(pids: list[int], least: float, most: float = 60.0,
           quiet: float = 0.1) -> tuple[float, float]:
    """Wait at least `least` s, then until the lab's processes used under `quiet` of a core
    over a second (at most `most` s); how long it took and how busy the machine was in that
    last second (other people's work too)."""
    start = time.monotonic()
    time.sleep(least)
    hz = os.sysconf("SC_CLK_TCK")
    busy = 0.0
    for _ in range(int(most) + 1):
        lab0, machine0 = cpu_ticks(pids)[0], cpu_ticks()
        time.sleep(1.0)
        lab1, machine1 = cpu_ticks(pids)[0], cpu_ticks()
        busy = (machine1[0] - machine0[0]) / max(machine1[1] - machine0[1], 1)
        if not pids or (lab1 - lab0) / hz < quiet or time.monotonic() - start > most:
            break
    return time.monotonic() - start, busy


def calm_text(calm: tuple[float, float]) -> str:
    return f"settled {calm[0]:.0f}s, machine {calm[1]:.0%} busy, load {loadavg()}"


def until(check: Callable[[], T | None], timeout: float, what: str, every: float,
          duty: float = 0.25) -> T:
    """Call `check` every `every` s, or less often so that the calls take at most `duty` of
    the time (a big GET must not load the master it measures), until it returns something
    truthy; BenchError after `timeout` s."""
    start = time.monotonic()
    for _ in range(int(timeout / every) + 2):
        called = time.monotonic()
        got = check()
        if got:
            return got
        now = time.monotonic()
        if now - start >= timeout:
            break
        time.sleep(max(0.0, called + max(every, (now - called) / duty) - now))
    raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")


def free_port(pair: bool = False) -> int:
    """A TCP port free now on every address (and the next one too with `pair`)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("0.0.0.0", 0))
            port = int(s.getsockname()[1])
        if not pair:
            return port
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port + 1))
            except OSError:
                continue
        return port
    raise BenchError("found no pair of free ports in 50 tries")


# -- Sigma, through its HTTP API only ------------------------------------------------------


class Api:
    """Sigma's HTTP API (docs/api.md): the only way this benchmark talks to Sigma."""

    def __init__(self, server: str, token: str, ca: str = "") -> None:
        self.server = server.rstrip("/")
        self.token = token
        # The lab's API is HTTPS with a CA of its own (`ca`); "" for plain HTTP.
        self.context = ssl.create_default_context(cafile=ca) if ca else None

    def call(self, method: str, path: str, body: bytes | None = None,
             timeout: float = 30.0) -> Any:
        req = urllib.request.Request(
            self.server + path, data=body, method=method,
            headers={"Authorization": f"Bearer {self.token}",
                     "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.context) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise BenchError(f"{method} {path}: HTTP {exc.code}: "
                             f"{exc.read()[:300].decode(errors='replace')}") from None
        except OSError as exc:
            raise BenchError(f"{method} {path}: {exc}") from None

    def app_exists(self, app: str) -> bool:
        try:
            self.call("GET", f"/v1/apps/{NAMESPACE}/{app}")
        except BenchError as exc:
            if "HTTP 404" in str(exc):
                return False
            raise
        return True

    def instances(self, app: str = "") -> list[dict[str, Any]]:
        query = f"?namespace={NAMESPACE}&app={app}" if app else ""
        items: list[dict[str, Any]] = self.call("GET", f"/v1/instances{query}")["items"]
        return items

    def nodes(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.call("GET", "/v1/nodes")["items"]
        return items

    def delete(self, app: str) -> None:
        self.call("DELETE", f"/v1/apps/{NAMESPACE}/{app}")


def app_spec(app: str, image: str, replicas: int, limit: dict[str, str]) -> dict[str, Any]:
    """N replicas of `sleep`: tiny requests (so 100s fit a host), caps, no readiness probe."""
    return {"app": app, "namespace": NAMESPACE, "replicas": replicas, "containers": [{
        "name": "main", "image": image, "command": COMMAND,
        "resources": {"request": REQUEST, "limit": limit},
    }]}


# -- the engines, through docker only ------------------------------------------------------


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("docker", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


class Engine:
    """One host's Docker engine: the docker CLI for what is measured, the Engine API for
    listing and inspecting (a socket read is cheaper than a CLI process on a busy machine)."""

    def __init__(self, host: str, url: str) -> None:
        self.host = host
        self.url = url

    def get(self, path: str, timeout: float = 15.0) -> Any:
        if self.url.startswith("unix://"):
            conn: http.client.HTTPConnection = _UnixConnection(
                self.url.removeprefix("unix://"), timeout)
        else:
            conn = http.client.HTTPConnection(self.url.split("://", 1)[-1], timeout=timeout)
        try:
            conn.request("GET", path)
            answer = conn.getresponse()
            body = answer.read()
        except OSError as exc:
            raise BenchError(f"engine {self.host} ({self.url}) GET {path}: {exc}") from None
        finally:
            conn.close()
        if answer.status != 200:
            raise BenchError(f"engine {self.host} GET {path}: HTTP {answer.status}: "
                             f"{body[:300].decode(errors='replace')}")
        return json.loads(body)

    def docker(self, *args: str, timeout: float = DOCKER_TIMEOUT) -> str:
        """`docker -H URL ARGS...`; its stdout (BenchError when it fails)."""
        try:
            done = subprocess.run(["docker", "-H", self.url, *args], capture_output=True,
                                  text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{self.host}: docker {args[0]} did not finish in "
                             f"{timeout:.0f}s") from None
        if done.returncode != 0:
            raise BenchError(f"{self.host}: docker {' '.join(args[:3])}...: "
                             f"{done.stderr.strip()[-300:]}")
        return done.stdout.strip()

    def containers(self) -> list[dict[str, Any]]:
        """Every container, running or not."""
        items: list[dict[str, Any]] = self.get("/containers/json?all=1")
        return items

    def running(self) -> list[dict[str, Any]]:
        """The running containers (the engine's default list)."""
        items: list[dict[str, Any]] = self.get("/containers/json")
        return items

    def inspect(self, container: str) -> dict[str, Any]:
        data: dict[str, Any] = self.get(f"/containers/{container}/json")
        return data


def cap_flags(host_config: dict[str, Any]) -> list[str]:
    """`docker run` flags giving a container the cgroup caps in `host_config` (engine
    defaults, which are 0, None or -1 for most fields, are left out)."""
    flags: list[str] = []
    for key, flag in CAP_FLAGS:
        value = host_config.get(key)
        if key == "OomKillDisable":
            if value:
                flags.append(flag)
            continue
        if value is None or value == "" or value == CAP_DEFAULTS.get(key, 0) or (
                key == "PidsLimit" and value == 0):
            continue
        if key == "NanoCpus":
            flags += [flag, f"{int(value) / 1e9:.9f}".rstrip("0").rstrip(".")]
        else:
            flags += [flag, str(value)]
    return flags


def caps_of(host_config: dict[str, Any]) -> dict[str, Any]:
    return {key: host_config.get(key) for key, _ in CAP_FLAGS}


def pick_ips(engine: Engine, network: str, used: set[str], count: int) -> list[str]:
    """`count` addresses of `network`'s subnet from its top down, none in `used` (so raw
    containers on different engines never share an address on the overlay)."""
    config = (engine.get(f"/networks/{network}").get("IPAM") or {}).get("Config") or []
    if not config or not config[0].get("Subnet"):
        raise BenchError(f"network {network} on {engine.host} has no subnet of its own")
    net = ipaddress.ip_network(config[0]["Subnet"])
    taken = used | {str(config[0].get("Gateway", ""))}
    found: list[str] = []
    top = int(net.broadcast_address) - 1
    for k in range(min(net.num_addresses - 2, count + len(taken) + 1)):
        ip = str(ipaddress.ip_address(top - k))
        if ip not in taken:
            found.append(ip)
            if len(found) == count:
                return found
    raise BenchError(f"network {network}: fewer than {count} free addresses")


def network_ips(engines: list[Engine], network: str) -> set[str]:
    """Addresses of every container attached to `network` on the engines."""
    ips: set[str] = set()
    for e in engines:
        attached = (e.get(f"/networks/{network}").get("Containers") or {}).values()
        ips |= {str(c.get("IPv4Address", "")).split("/")[0] for c in attached}
    return ips


# -- measurements --------------------------------------------------------------------------


@dataclass
class Context:
    """What every measurement needs: the API, the engines and how raw containers are made."""

    api: Api
    engines: list[Engine]
    image: str
    poll: float
    timeout: float
    limit: dict[str, str]
    baseline: set[str] = field(default_factory=set)  # container ids there before we began
    network: str = ""
    caps: list[str] = field(default_factory=list)
    sigma_caps: dict[str, Any] = field(default_factory=dict)
    master_pids: list[int] = field(default_factory=list)
    lab_pids: list[int] = field(default_factory=list)
    settle: float = 2.0

    def engine(self, host: str) -> Engine:
        for e in self.engines:
            if e.host == host:
                return e
        raise BenchError(f"no engine for node {host!r} (hosts: "
                         f"{', '.join(e.host for e in self.engines)})")

    def ours(self, ids: set[str]) -> list[dict[str, Any]]:
        """The containers of a Sigma app on the engines (any state): new since we began, not
        raw, and running our command or named by the API (`ids`)."""
        command = " ".join(COMMAND)
        return [c for e in self.engines for c in e.containers()
                if c["Id"] not in self.baseline
                and RAW_LABEL not in (c.get("Labels") or {})
                and (c.get("Command") == command or c["Id"] in ids)]


def api_ids(items: list[dict[str, Any]]) -> set[str]:
    return {c["id"] for i in items for c in i.get("containers") or [] if c.get("id")}


def wait_gone(ctx: Context, app: str, ids: set[str], timeout: float,
              progress: Callable[[int, int], None] | None = None) -> None:
    """Until the API lists no instance of `app` and no container of it is left on any
    engine (engines are read only once the API is empty)."""
    last = [0.0]

    def gone() -> bool:
        items = ctx.api.instances(app)
        left = 0 if items else len(ctx.ours(ids))
        if progress and time.monotonic() - last[0] >= 1.0:
            last[0] = time.monotonic()
            progress(len(items), left)
        return not items and not left

    until(gone, timeout, f"app {app} and its containers gone", ctx.poll)


def all_ready(ctx: Context) -> None:
    """Until every node the API lists is Ready (bounded): no measurement starts on a lab
    with a host away."""
    def ready() -> bool:
        nodes = ctx.api.nodes()
        return len(nodes) == len(ctx.engines) and all(
            n.get("status") == "Ready" for n in nodes)

    until(ready, IDLE_TIMEOUT, "every node Ready", 0.5)


def first_running(ctx: Context, runs: int) -> list[float]:
    """PUT of a 1-replica app until the API lists it Running, `runs` times on the idle lab.
    The first run's container also gives the caps the raw containers get."""
    took: list[float] = []
    body = json.dumps(app_spec(FIRST_APP, ctx.image, 1, ctx.limit)).encode()
    for n in range(1, runs + 1):
        calm = settle(ctx.lab_pids, ctx.settle)
        all_ready(ctx)
        start = time.monotonic()
        ctx.api.call("PUT", "/v1/apps", body)

        def running() -> dict[str, Any] | None:
            items = ctx.api.instances(FIRST_APP)
            return items[0] if items and items[0].get("state") == "Running" else None

        inst = until(running, 60, f"{FIRST_APP} Running", FIRST_POLL, duty=1.0)
        took.append(time.monotonic() - start)
        say(f"first Running {n}/{runs}: {took[-1]:.3f}s (on {inst.get('node')}; before it: "
            f"{calm_text(calm)})")
        if not ctx.caps:
            learn_caps(ctx, inst)
        ctx.api.delete(FIRST_APP)
        wait_gone(ctx, FIRST_APP, api_ids([inst]), IDLE_TIMEOUT)
    return took


def learn_caps(ctx: Context, inst: dict[str, Any]) -> None:
    """Read the network and cgroup caps of the container Sigma made for `inst`."""
    cid = next((c["id"] for c in inst.get("containers") or [] if c.get("id")), "")
    if not cid:
        raise BenchError(f"the API lists no container id for {inst.get('name')}")
    host_config = ctx.engine(str(inst.get("node"))).inspect(cid)["HostConfig"]
    ctx.sigma_caps = caps_of(host_config)
    ctx.caps = cap_flags(host_config)
    mode = str(host_config.get("NetworkMode") or "")
    if not ctx.network:
        ctx.network = "bridge" if mode in ("", "default") or ":" in mode else mode
    say(f"Sigma's container: network {mode or 'default'}, caps {' '.join(ctx.caps) or 'none'}"
        f"; raw containers get --network {ctx.network} and the same caps")


class Watcher:
    """Counts, once a second in a thread of its own, the running containers on the engines
    that `match`, and notes when the count first reached `n` (seconds from `start`). Sigma
    and raw each get one, so the engines carry the same listing load on either side."""

    def __init__(self, ctx: Context, match: Callable[[dict[str, Any]], bool], n: int,
                 start: float, every: float = 1.0) -> None:
        self.ctx, self.match, self.n, self.start, self.every = ctx, match, n, start, every
        self.count = 0
        self.reached: float | None = None
        self.lists: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = self.start + self.ctx.timeout
        for _ in range(int(self.ctx.timeout / self.every) + 2):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            began = time.monotonic()
            with contextlib.suppress(BenchError):
                self.count = sum(1 for e in self.ctx.engines for c in e.running()
                                 if self.match(c))
                self.lists.append(time.monotonic() - began)
                if self.count >= self.n and self.reached is None:
                    self.reached = time.monotonic() - self.start
            self._stop.wait(max(0.0, began + self.every - time.monotonic()))

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@dataclass
class SigmaRun:
    start_s: float
    delete_s: float
    put_s: float
    milestones: dict[str, float]
    per_host: dict[str, int]
    found: int
    get_ms: float  # median time of a GET /v1/instances while polling
    get_max_ms: float
    cpu: dict[str, float]
    not_ready: dict[str, float]  # node → seconds into the burst it was first seen not Ready


def sigma_burst(ctx: Context, n: int, label: str) -> SigmaRun:
    """PUT of N replicas until the API lists all N Running; DELETE until no container is
    left."""
    body = json.dumps(app_spec(BURST_APP, ctx.image, n, ctx.limit)).encode()
    marks: dict[str, float] = {}
    last = [0.0]
    gets: list[float] = []
    not_ready: dict[str, float] = {}
    command = " ".join(COMMAND)

    def sigmas(c: dict[str, Any]) -> bool:
        return (c["Id"] not in ctx.baseline and c.get("Command") == command
                and RAW_LABEL not in (c.get("Labels") or {}))

    def all_running() -> list[dict[str, Any]] | None:
        sent = time.monotonic()
        items = ctx.api.instances(BURST_APP)
        t = time.monotonic() - start
        gets.append(t - (sent - start))
        states = Counter(str(i.get("state")) for i in items)
        running = states.get("Running", 0)
        for name, share in (("first", 1), ("half", (n + 1) // 2), ("90%", -(-9 * n // 10))):
            if running >= share and name not in marks:
                marks[name] = t
        if t - last[0] >= 1.0:
            last[0] = t
            for node in ctx.api.nodes():  # a lost node sends its instances elsewhere
                if node.get("status") != "Ready" and node["name"] not in not_ready:
                    not_ready[node["name"]] = t
                    say(f"{label}: warning: node {node['name']} is {node.get('status')} at "
                        f"{t:.1f}s")
            others = ", ".join(f"{k} {v}" for k, v in sorted(states.items()) if k != "Running")
            say(f"{label}: {t:6.1f}s  {running}/{n} Running" + (f" ({others})" if others else "")
                + f"; {watcher.count} containers running on the engines")
        return items if len(items) == n and running == n else None

    meter = CpuMeter(ctx.master_pids)
    start = time.monotonic()
    watcher = Watcher(ctx, sigmas, n, start)
    with watcher:
        ctx.api.call("PUT", "/v1/apps", body)
        put_s = time.monotonic() - start
        items = until(all_running, ctx.timeout, f"{n} instances of {BURST_APP} Running",
                      ctx.poll)
        took = time.monotonic() - start
    cpu = meter.read()
    if watcher.reached is not None:
        marks["engines"] = watcher.reached

    marks["all"] = took
    ids = api_ids(items)
    found = sum(1 for c in ctx.ours(ids) if c.get("State") == "running")
    per_host = dict(sorted(Counter(str(i.get("node")) for i in items).items()))
    say(f"{label}: all {n} Running in {took:.2f}s (per host {per_host}; {found} containers "
        f"running on the engines; GET /v1/instances took {statistics.median(gets) * 1000:.0f} ms "
        f"(median), {max(gets) * 1000:.0f} ms (max); {cpu})")
    if found < n:
        say(f"warning: only {found} of {n} containers found running on the engines by "
            "command; the teardown wait relies on the container ids the API lists")
    start = time.monotonic()
    ctx.api.delete(BURST_APP)

    def progress(instances: int, containers: int) -> None:
        say(f"{label} delete: {time.monotonic() - start:6.1f}s  {instances} instances listed"
            + (f", {containers} containers left" if not instances else ""))

    wait_gone(ctx, BURST_APP, ids, ctx.timeout, progress)
    delete_s = time.monotonic() - start
    say(f"{label}: deleted, every container gone in {delete_s:.2f}s")
    return SigmaRun(took, delete_s, put_s, marks, per_host, found,
                    round(statistics.median(gets) * 1000, 1), round(max(gets) * 1000, 1), cpu,
                    not_ready)


def streams(ctx: Context, jobs: dict[str, list[list[str]]], label: str,
            deadline: float) -> tuple[float, dict[str, list[str]]]:
    """Run each engine's docker commands one after another, the engines in parallel; the
    seconds from starting until the last one returned, and each command's stdout."""
    outputs: dict[str, list[str]] = {host: [] for host in jobs}
    errors: list[str] = []
    stop = threading.Event()
    ends: list[float] = []

    def stream(host: str, commands: list[list[str]]) -> None:
        engine = ctx.engine(host)
        try:
            for args in commands:
                if stop.is_set():
                    return
                outputs[host].append(engine.docker(*args))
        except BenchError as exc:
            errors.append(str(exc))
            stop.set()
        finally:
            ends.append(time.monotonic())

    threads = [threading.Thread(target=stream, args=(h, c), daemon=True)
               for h, c in jobs.items()]
    total = sum(len(c) for c in jobs.values())
    start = time.monotonic()
    for t in threads:
        t.start()
    try:
        for _ in range(int(max(deadline - start, 0)) + 2):
            tick = time.monotonic() + 1.0
            for t in threads:
                t.join(timeout=max(0.0, tick - time.monotonic()))
            done = sum(len(v) for v in outputs.values())
            if not any(t.is_alive() for t in threads):
                break
            say(f"{label}: {time.monotonic() - start:6.1f}s  {done}/{total} done")
            if time.monotonic() > deadline:
                raise BenchError(f"{label}: not done by its deadline ({done}/{total})")
    finally:
        stop.set()
    if errors:
        raise BenchError(f"{label}: {errors[0]}")
    if any(t.is_alive() for t in threads) or len(ends) != len(threads):
        raise BenchError(f"{label}: a stream did not finish")
    return max(ends) - start, outputs


@dataclass
class RawRun:
    start_s: float
    rm_s: float
    cpu: dict[str, float]


def raw_burst(ctx: Context, n: int, run: int, label: str) -> RawRun:
    """`docker run -d` of N containers (N/hosts per engine, one stream each), then
    `docker rm -f` of each, the same way."""
    hosts = [e.host for e in ctx.engines]
    counts = {h: n // len(hosts) + (1 if k < n % len(hosts) else 0) for k, h in enumerate(hosts)}
    ips: list[str] = []
    if ctx.network != "bridge":
        used = {str(i.get("ip")) for i in ctx.api.instances()} | network_ips(ctx.engines,
                                                                               ctx.network)
        ips = pick_ips(ctx.engines[0], ctx.network, used, n)
    jobs: dict[str, list[list[str]]] = {}
    k = 0
    for h in hosts:
        jobs[h] = []
        for _ in range(counts[h]):
            args = ["run", "-d", "--name", f"bench-raw-{run}-{k}", "--label",
                    f"{RAW_LABEL}={run}", "--network", ctx.network,
                    *(["--ip", ips[k]] if ips else []), *ctx.caps, ctx.image, *COMMAND]
            jobs[h].append(args)
            k += 1
    meter = CpuMeter([])

    def raws(c: dict[str, Any]) -> bool:
        return (c.get("Labels") or {}).get(RAW_LABEL) == str(run)

    with Watcher(ctx, raws, n, time.monotonic()):  # the same listing load as Sigma's side
        took, outputs = streams(ctx, jobs, label, time.monotonic() + ctx.timeout)
    cpu = meter.read()
    running = 0
    for e in ctx.engines:
        running += sum(1 for c in e.containers()
                       if (c.get("Labels") or {}).get(RAW_LABEL) == str(run)
                       and c.get("State") == "running")
    say(f"{label}: {n} containers started in {took:.2f}s ({running} running; {cpu})")
    if running != n:
        raise BenchError(f"{label}: {running} of {n} raw containers are running")
    if run == 1:
        check_caps(ctx, ctx.engine(hosts[0]), outputs[hosts[0]][0])
    rm_jobs = {h: [["rm", "-f", cid] for cid in outputs[h]] for h in hosts}
    rm_s, _ = streams(ctx, rm_jobs, f"{label} rm", time.monotonic() + ctx.timeout)
    left = sum(1 for e in ctx.engines for c in e.containers()
               if (c.get("Labels") or {}).get(RAW_LABEL) == str(run))
    if left:
        raise BenchError(f"{label}: {left} raw containers left after docker rm -f")
    say(f"{label}: removed in {rm_s:.2f}s")
    return RawRun(took, rm_s, cpu)


def check_caps(ctx: Context, engine: Engine, cid: str) -> None:
    """The raw container's caps must be Sigma's, or the comparison is unfair."""
    raw = caps_of(engine.inspect(cid)["HostConfig"])
    diff = {k: (ctx.sigma_caps.get(k), v) for k, v in raw.items() if ctx.sigma_caps.get(k) != v}
    if diff:
        raise BenchError(f"raw container caps differ from Sigma's (sigma, raw): {diff}")
    say("raw container caps match Sigma's")


def user_network(engine: Engine) -> str:
    """The engine's one network that is not a built-in (the orchestrator's), or "bridge"."""
    names = [str(n.get("Name")) for n in engine.get("/networks")
             if n.get("Name") not in ("bridge", "host", "none")]
    return names[0] if len(names) == 1 else "bridge"


def warm_up(ctx: Context) -> None:
    """Pull the image on every engine and start and remove one container on each, untimed,
    so neither side pays a cold engine."""
    for e in ctx.engines:
        e.docker("pull", "-q", ctx.image, timeout=300)
    network = ctx.network or user_network(ctx.engines[0])
    ips: list[str] = []
    if network != "bridge":
        used = {str(i.get("ip")) for i in ctx.api.instances()} | network_ips(ctx.engines,
                                                                               network)
        ips = pick_ips(ctx.engines[0], network, used, len(ctx.engines))
    for k, e in enumerate(ctx.engines):
        cid = e.docker("run", "-d", "--label", f"{RAW_LABEL}=warm", "--network", network,
                       *(["--ip", ips[k]] if ips else []), ctx.image, *COMMAND)
        e.docker("rm", "-f", cid)
    say(f"image pulled on {', '.join(e.host for e in ctx.engines)}; one container started and "
        f"removed on each (network {network})")


# -- the lab -------------------------------------------------------------------------------


@contextlib.contextmanager
def lab_for(args: argparse.Namespace) -> Iterator[Lab]:
    """The lab given with --lab-dir, or a new one removed on the way out (unless --keep)."""
    if args.lab_dir:
        yield Lab.load(args.lab_dir, out=lambda s: say(f"lab: {s}"))
        return
    if os.geteuid() != 0:
        raise BenchError("bench/burst.py builds a lab: run it as root (or give --lab-dir)")
    root = Path(tempfile.mkdtemp(prefix="sigma-burst-"))
    os.environ["SIGMA_CREDENTIALS"] = str(root / "credentials.json")
    config = LabConfig(hosts=args.hosts, name=args.name, dir=root / "lab", subnet=args.subnet,
                       etcd_port=free_port(pair=True), registry_port=free_port(),
                       listen=f"127.0.0.1:{free_port()}", heartbeat_ttl=args.heartbeat_ttl)
    lab = Lab(config, out=lambda s: say(f"lab: {s}"))
    try:
        lab.up()
        yield lab
    finally:
        quiet()
        if lab.state is None:
            shutil.rmtree(root, ignore_errors=True)
        elif args.keep:
            say(f"lab kept: {lab.server} (token in {config.root / 'token'}); remove it with: "
                f"sigmad lab down --name {config.name} --dir {config.root}")
        else:
            say("removing the lab")
            try:
                lab.down()
            except LabError as exc:
                say(f"error: {exc}")
            shutil.rmtree(root, ignore_errors=True)


def remove_leftovers(ctx: Context) -> None:
    """What this benchmark made on a lab that stays up: its apps (waited for, bounded) and
    raw containers."""
    for app in (FIRST_APP, BURST_APP):
        with contextlib.suppress(BenchError):
            if ctx.api.app_exists(app):
                say(f"deleting app {app}")
                ctx.api.delete(app)
                wait_gone(ctx, app, set(), IDLE_TIMEOUT)
    for e in ctx.engines:
        with contextlib.suppress(BenchError):
            for c in e.containers():
                if RAW_LABEL in (c.get("Labels") or {}):
                    e.docker("rm", "-f", c["Id"])


def on_signal(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def quiet() -> None:
    """From here on, cleanup: a second Ctrl-C or SIGTERM must not cut it short."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


# -- report --------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    return {"cpu": model or platform.processor() or "?", "cores": str(os.cpu_count()),
            "memory": mem, "kernel": platform.release(), "python": platform.python_version()}


def bullet(text: str) -> str:
    return textwrap.fill(text, width=96, initial_indent="- ", subsequent_indent="  ",
                         break_long_words=False, break_on_hyphens=False)


def hosts_text(per_host: dict[str, int]) -> str:
    return ", ".join(f"{h} {c}" for h, c in per_host.items())


def section(r: dict[str, Any], command: str) -> str:
    """The "Burst" section of docs/benchmarks.md."""
    m, n, hosts = r["machine"], r["instances"], r["hosts"]

    def row(label: str, med: float, runs: list[float], unit: str = " s", digits: int = 1) -> str:
        return (f"| {label} | {med:.{digits}f}{unit} | {max(runs):.{digits}f}{unit} | "
                f"{len(runs)} |")

    rows = [
        row("First Running: PUT of a 1-replica app → Running in GET /v1/instances (idle lab)",
            r["first_running_s"], r["first_running_runs"], digits=2),
        row(f"**sigma_s**: PUT of {n} replicas → all {n} Running", r["sigma_s"],
            r["sigma_runs"]),
        row(f"**raw_s**: {n} x `docker run -d`, one stream per engine, {hosts} in parallel",
            r["raw_s"], r["raw_runs"]),
        row("**ratio** sigma_s / raw_s", r["ratio"], r["ratio_runs"], "", 2),
        row("Sigma: DELETE → every container gone", r["sigma_delete_s"],
            r["sigma_delete_runs"]),
        row(f"raw: {n} x `docker rm -f`, one stream per engine", r["raw_rm_s"],
            r["raw_rm_runs"]),
    ]
    head = ["run", "order", "sigma_s", "raw_s", "ratio", "Sigma 1st / half / 90% Running",
            "all running per the engines", "Sigma placed", "nodes seen not Ready",
            "Sigma delete", "raw rm",
            "machine CPU busy the second before (sigma; raw)",
            "machine CPU busy during (sigma; raw)", "master CPU (sigma)"]
    per_run = []
    for k, run in enumerate(r["per_run"], 1):
        ms, sc, rc = run["milestones"], run["sigma_cpu"], run["raw_cpu"]
        master = f"{sc['master_cpu_s']:.1f} s" if "master_cpu_s" in sc else "?"
        cells = [str(k), run["order"], f"{run['sigma_s']:.1f} s", f"{run['raw_s']:.1f} s",
                 f"{run['sigma_s'] / run['raw_s']:.2f}",
                 f"{ms['first']:.1f} / {ms['half']:.1f} / {ms['90%']:.1f} s",
                 f"{ms['engines']:.1f} s" if "engines" in ms else "-",
                 hosts_text(run["per_host"]),
                 ", ".join(f"{h} at {t:.0f} s" for h, t in run["not_ready"].items()) or "none",
                 f"{run['sigma_delete_s']:.1f} s", f"{run['raw_rm_s']:.1f} s",
                 f"{run['busy_before_sigma']:.0%}; {run['busy_before_raw']:.0%}",
                 f"{sc['machine_busy']:.0%}; {rc['machine_busy']:.0%}", master]
        per_run.append("| " + " | ".join(cells) + " |")
    network = (f"network `{r['raw_network']}` (the one Sigma's containers are on) with an "
               "explicit free `--ip` each, as Sigma gives its containers their IPs"
               if r["raw_network"] != "bridge" else "the default bridge network")
    intro = (f"Measured {r['date']} on this machine ({m['cpu']}, {m['cores']} cores shared "
             f"with other work, {m['memory']}, Linux {m['kernel']}, Docker {r['docker']}, "
             f"Python {m['python']}); load average at the start {r['loadavg_start']}, at the "
             f"end {r['loadavg_end']}; on a {hosts}-host lab (network namespaces, one dockerd "
             "each), in one run of:")
    notes = [
        f"The app: {n} replicas of `{' '.join(COMMAND)}` in the lab's busybox image, request "
        f"cpu {REQUEST['cpu']} / memory {REQUEST['memory']}, limit cpu {r['limit']['cpu']} / "
        f"memory {r['limit']['memory']}, no readiness probe. The lab's agents have a "
        f"heartbeat TTL of {r['heartbeat_ttl']} s (the hosts share this machine's cores: a "
        "starved agent must not lose its node mid-burst; a node seen not Ready during a "
        "burst is in the table, and every node must be Ready before each measurement).",
        "Clocks (monotonic, in the benchmark process): first Running and sigma_s start just "
        "before the PUT /v1/apps is sent and stop when the answer to a GET /v1/instances "
        f"(sent every {FIRST_POLL * 1000:.0f} ms, resp. every {r['poll']:g} s or less often, "
        "so that GETs take at most a quarter of the time; one took "
        f"{r['get_ms']:.0f} ms, median, and {r['get_max_ms']:.0f} ms at most during the "
        "burst) lists the instance(s) Running: "
        "the time an API client sees. A thread of its own lists the engines' running "
        "containers once a second, during the raw starts too (the same load on both sides): "
        "\"all running per the engines\" is when docker first had all N of Sigma's running "
        "(about a second late at most; - if the API said so first). The delete starts "
        "before the DELETE is sent and stops "
        "when the API lists no instance of the app and no container of it is left on any "
        "engine. raw_s starts before the first `docker run -d` and stops when the last one "
        "has returned (each returns once its container started); "
        f"{r['raw_per_engine']} per engine, one `docker` command after another per engine, "
        "the engines in parallel; the same for `docker rm -f`.",
        f"Raw containers: {network}, and the cgroup caps read from a container Sigma made "
        f"(checked equal on a raw one): `{' '.join(r['raw_caps']) or 'none'}`.",
        "Before measuring, the image was pulled on every engine and one container started "
        f"and removed on each. Before each measurement it waits {r['settle']:g} s and then "
        "until the lab's own processes (masters, agents, dockerds, containerd, etcd) used "
        "under 10% of a core in a second (at most 60 s). Machine CPU busy is the share of "
        "all cores busy (any process, other people's too) in that second, and during the "
        "start; master CPU is the CPU time the lab's master used during the start.",
        "The teardowns are for information, not a like-for-like pair: Sigma stops its "
        "containers its own way (`sleep` as PID 1 ignores SIGTERM), `docker rm -f` kills "
        "at once. The ratio compares the starts.",
    ]
    return "\n".join([
        "## Burst", "", textwrap.fill(intro, width=96), "", "```", command, "```", "",
        "| Measure | median | worst | runs |", "| --- | --- | --- | --- |", *rows, "",
        "| " + " | ".join(head) + " |", "|" + " --- |" * len(head), *per_run, "",
        *(bullet(t) for t in notes), "",
    ])


# -- main ----------------------------------------------------------------------------------


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--hosts", type=int, default=3, help="hosts of the lab it builds")
    parser.add_argument("--instances", type=int, default=300, help="N: replicas, raw containers")
    parser.add_argument("--runs", type=int, default=1, help="sigma + raw pairs, alternating")
    parser.add_argument("--first", type=int, default=5, help="first-Running repetitions")
    parser.add_argument("--poll", type=float, default=0.25,
                        help="seconds between GET /v1/instances during the burst")
    parser.add_argument("--timeout", type=float, default=900,
                        help="seconds allowed to each burst, delete and raw stream set")
    parser.add_argument("--limit-cpu", default="1",
                        help="the app's cpu cap (a tight one throttles each container's start)")
    parser.add_argument("--limit-memory", default="64Mi", help="the app's memory cap")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="idle seconds before each measurement, and then until the lab's "
                        "processes are quiet (at most 60 s)")
    parser.add_argument("--raw-network", choices=("sigma", "bridge"), default="sigma",
                        help="sigma: the network Sigma's containers use; bridge: the default")
    parser.add_argument("--heartbeat-ttl", type=int, default=15,
                        help="the agents' heartbeat TTL in the lab it builds: the lab's hosts "
                        "share this machine's cores, and an agent starved by the burst must "
                        "not lose its node (lab default 5)")
    parser.add_argument("--lab-dir", type=Path, help="reuse this lab (it is left up)")
    parser.add_argument("--keep", action="store_true", help="leave the lab it built up")
    parser.add_argument("--name", default="burst", help="name of the lab it builds")
    parser.add_argument("--subnet", default="10.81.0.0/24", help="underlay of the lab it builds")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    for option in ("hosts", "instances", "runs", "first"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1")
    if not 0.02 <= args.poll <= 5:
        parser.error("--poll: 0.02 to 5 seconds")
    return args


def bench(lab: Lab, args: argparse.Namespace, load_start: str) -> dict[str, Any]:
    """Every measurement, on `lab`; the result object."""
    api = Api(lab.server, lab.token, lab.ca)
    engines = [Engine(h, url) for h, url in sorted(lab.engines.items())]
    ctx = Context(api, engines, lab.image, args.poll, args.timeout,
                  {"cpu": args.limit_cpu, "memory": args.limit_memory},
                  network="" if args.raw_network == "sigma" else "bridge",
                  master_pids=[m.pid for m in lab.masters], settle=args.settle)
    ready = [n["name"] for n in api.nodes() if n.get("status") == "Ready"]
    if sorted(ready) != [e.host for e in engines]:
        raise BenchError(f"nodes Ready: {ready}; the lab's hosts: {[e.host for e in engines]}")
    busy = api.instances()
    for app in (FIRST_APP, BURST_APP):
        if api.app_exists(app):
            raise BenchError(f"the lab already has an app {app}: delete it first")
    if busy:
        say(f"warning: the lab is not idle: {len(busy)} instances of other apps")
    ctx.baseline = {c["Id"] for e in engines for c in e.containers()}
    say(f"lab {lab.name}: {len(engines)} hosts {[e.host for e in engines]}, API {lab.server}, "
        f"image {lab.image}, {len(ctx.baseline)} containers there already")
    try:
        warm_up(ctx)
        ctx.lab_pids = lab_pids(lab)
        firsts = first_running(ctx, args.first)
        runs: list[dict[str, Any]] = []
        for k in range(1, args.runs + 1):
            order = ("sigma", "raw") if k % 2 else ("raw", "sigma")
            run: dict[str, Any] = {"order": " → ".join(order)}
            for side in order:
                calm = settle(ctx.lab_pids, args.settle)
                say(f"before {side} run {k}: {calm_text(calm)}")
                run[f"busy_before_{side}"] = round(calm[1], 3)
                run[f"load_{side}"] = loadavg()
                if side == "sigma":
                    all_ready(ctx)
                    s = sigma_burst(ctx, args.instances, f"sigma run {k}")
                    run.update(sigma_s=s.start_s, sigma_delete_s=s.delete_s, put_s=s.put_s,
                               milestones=s.milestones, per_host=s.per_host, found=s.found,
                               get_ms=s.get_ms, get_max_ms=s.get_max_ms, sigma_cpu=s.cpu,
                               not_ready=s.not_ready)
                else:
                    r = raw_burst(ctx, args.instances, k, f"raw run {k}")
                    run.update(raw_s=r.start_s, raw_rm_s=r.rm_s, raw_cpu=r.cpu)
            say(f"run {k}: sigma {run['sigma_s']:.2f}s, raw {run['raw_s']:.2f}s, ratio "
                f"{run['sigma_s'] / run['raw_s']:.2f}")
            runs.append(run)
        version = str(engines[0].get("/version").get("Version", "?"))
    finally:
        quiet()
        if args.lab_dir or args.keep:
            remove_leftovers(ctx)
    sigma = [r["sigma_s"] for r in runs]
    raw = [r["raw_s"] for r in runs]
    fr_med, fr_max = statistics.median(firsts), max(firsts)
    return {
        "sigma_s": round(statistics.median(sigma), 3),
        "raw_s": round(statistics.median(raw), 3),
        "ratio": round(statistics.median(sigma) / statistics.median(raw), 3),
        "first_running_s": round(fr_med, 3),
        "first_running_worst_s": round(fr_max, 3),
        "first_running_runs": [round(x, 3) for x in firsts],
        "sigma_runs": [round(x, 3) for x in sigma],
        "raw_runs": [round(x, 3) for x in raw],
        "ratio_runs": [round(s / r, 3) for s, r in zip(sigma, raw, strict=True)],
        "sigma_delete_s": round(statistics.median(r["sigma_delete_s"] for r in runs), 3),
        "sigma_delete_runs": [round(r["sigma_delete_s"], 3) for r in runs],
        "raw_rm_s": round(statistics.median(r["raw_rm_s"] for r in runs), 3),
        "raw_rm_runs": [round(r["raw_rm_s"], 3) for r in runs],
        "sigma_engines_s": [round(r["milestones"]["engines"], 3) if "engines" in r["milestones"]
                            else None for r in runs],
        "sigma_milestones_s": [{k: round(v, 3) for k, v in r["milestones"].items()}
                               for r in runs],
        "instances": args.instances,
        "hosts": len(engines),
        "per_host": runs[-1]["per_host"],
        "raw_per_engine": f"{args.instances // len(engines)}"
                          + ("+1" if args.instances % len(engines) else ""),
        "raw_network": ctx.network,
        "raw_caps": ctx.caps,
        "poll": args.poll,
        "limit": ctx.limit,
        "settle": args.settle,
        "heartbeat_ttl": int(lab.config.heartbeat_ttl),
        "nodes_not_ready": [r["not_ready"] for r in runs],
        "loadavg_before": [{"sigma": r["load_sigma"], "raw": r["load_raw"]} for r in runs],
        "get_ms": statistics.median(r["get_ms"] for r in runs),
        "get_max_ms": max(r["get_max_ms"] for r in runs),
        "machine_busy_sigma": [r["sigma_cpu"]["machine_busy"] for r in runs],
        "machine_busy_raw": [r["raw_cpu"]["machine_busy"] for r in runs],
        "machine_busy_before_sigma": [r["busy_before_sigma"] for r in runs],
        "machine_busy_before_raw": [r["busy_before_raw"] for r in runs],
        "master_cpu_s": [r["sigma_cpu"].get("master_cpu_s") for r in runs],
        "docker": version,
        "per_run": runs,
        "loadavg_start": load_start,
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
    }


def main() -> int:
    args = parse()
    load_start = loadavg()
    say(f"load average at start: {load_start} ({os.cpu_count()} cores)")
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with `&`
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    command = "python bench/burst.py " + " ".join(sys.argv[1:])
    result: dict[str, Any] = {}
    try:
        with lab_for(args) as lab:
            try:
                result = bench(lab, args, load_start)
            finally:
                quiet()
    except (BenchError, LabError) as exc:
        say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    result["loadavg_end"] = loadavg()
    text = section(result, command)
    say(text)
    write_section(args.out, "Burst", text)
    summary = {k: v for k, v in result.items() if k not in ("per_run", "machine")}
    summary["cores"] = os.cpu_count()
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
