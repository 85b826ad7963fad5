"""Usage samples of one host and of its instances' containers (cgroup v1), written every
`interval` seconds as the leased `usage/{node}` record (sigmad.models.UsageRecord).

What the figures mean:
- an instance's `cpu` is the cores its containers used together on average since the last
  sample (cpuacct.usage over wall time: 0 at a container's first sample), `memory` the bytes
  they use less their inactive page cache (as `docker stats` counts), `disk` the bytes used
  on the filesystems of its SSDs;
- the host's figures are the whole machine's (`scope` "machine": /proc/stat's busy time,
  MemTotal less MemAvailable), or, with `usage_cgroup` in the node config, the engine's
  cgroup parent's (`scope` "cgroup:PARENT": what that engine's containers use together).
  The lab sets it: its hosts share one machine, whose figures would be the same for every
  host (issue 17);
- an SSD's `used` and `size` are its filesystem's (statvfs of its mount).

Invariants:
- one record per node, replaced at every sample (no history in etcd), written with the
  heartbeat lease: it goes when the node's lease goes;
- a sample reads files and lists the engine's containers once (a container is inspected
  once, for its pid); it holds at most MAX_INSTANCES instances;
- a container whose cgroup files cannot be read (it just ended) is left out of that sample.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sigmad import metrics
from sigmad.engine import LABEL_INSTANCE, Engine
from sigmad.errors import SigmaError
from sigmad.models import (
    SSD_BOUND,
    SSD_READY,
    USAGE_MACHINE,
    DiskUsed,
    HostUsed,
    InstanceUsed,
    Ssd,
    UsageRecord,
    now,
)
from sigmad.store import Store

log = logging.getLogger(__name__)
MAX_INSTANCES = 10_000  # instances in one sample (a record stays well under etcd's 1.5 MiB)
USER_HZ = 100  # /proc/stat's unit (clock ticks a second)
CGROUP_ROOT = "sys/fs/cgroup"


def cgroup_paths(text: str) -> dict[str, str]:
    """Controller → path of a /proc/PID/cgroup (v1 lines `ID:CONTROLLERS:PATH`)."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[1]:
            for controller in parts[1].split(","):
                paths[controller] = parts[2]
    return paths


def stat_value(text: str, name: str) -> int:
    """The value of `name` in a `NAME VALUE` file (memory.stat); 0 when absent."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == name and value.strip().isdigit():
            return int(value)
    return 0


def memory_used(usage_in_bytes: int, stat: str) -> int:
    """Bytes used less the inactive page cache (what `docker stats` shows)."""
    return max(usage_in_bytes - stat_value(stat, "total_inactive_file"), 0)


def machine_busy(proc_stat: str) -> float:
    """Seconds of CPU the machine spent busy since boot (all but idle and iowait)."""
    for line in proc_stat.splitlines():
        if line.startswith("cpu "):
            ticks = [int(v) for v in line.split()[1:]]
            idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
            return (sum(ticks[:8]) - idle) / USER_HZ
    return 0.0


def machine_memory(meminfo: str) -> int:
    """Bytes of memory in use: MemTotal less MemAvailable."""
    values: dict[str, int] = {}
    for line in meminfo.splitlines():
        key, _, rest = line.partition(":")
        words = rest.split()
        if words and words[0].isdigit():
            values[key] = int(words[0]) * 1024
    return max(values.get("MemTotal", 0) - values.get("MemAvailable", 0), 0)


@dataclass
class Rate:
    """Cores used between two readings of a cumulative CPU time (seconds)."""

    seconds: float = -1.0  # the last reading (-1: none yet)
    at: float = 0.0

    def cores(self, seconds: float, at: float) -> float:
        """Cores used since the last reading (0 for the first one, or a counter reset)."""
        before, then = self.seconds, self.at
        self.seconds, self.at = seconds, at
        if before < 0 or at <= then or seconds < before:
            return 0.0
        return round((seconds - before) / (at - then), 3)


class Files:
    """Reads the host's files under `root` (tests give a directory of their own)."""

    def __init__(self, root: str = "/") -> None:
        self.root = Path(root)

    def read(self, path: str) -> str | None:
        try:
            return (self.root / path.lstrip("/")).read_text()
        except (OSError, UnicodeDecodeError):
            return None

    def number(self, path: str) -> int | None:
        text = self.read(path)
        return int(text.strip()) if text and text.strip().isdigit() else None

    def disk(self, mount: str, size: int) -> DiskUsed | None:
        """Bytes used on the filesystem mounted at `mount` (None if it is not there)."""
        try:
            st = os.statvfs(self.root / mount.lstrip("/"))
        except OSError:
            return None
        total = st.f_blocks * st.f_frsize
        return DiskUsed(used=max(total - st.f_bfree * st.f_frsize, 0), size=total or size)


@dataclass
class _Seen:
    """A container's cgroup paths (cpuacct, memory) and what it belongs to."""

    instance: str
    cpuacct: str
    memory: str
    rate: Rate


class Sampler:
    """Samples one node (see the module docstring). `clock` is monotonic seconds."""

    def __init__(self, node: str, engine: Engine, store: Store, cgroup: str = "",
                 files: Files | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.node, self.engine, self.store = node, engine, store
        self.cgroup = cgroup.strip("/")
        self.files = files or Files()
        self.clock = clock
        self.seen: dict[str, _Seen] = {}  # container id → what it is
        self.host_rate = Rate()
        self.last: UsageRecord | None = None  # the last sample taken

    def _cgroup_file(self, controller: str, path: str, name: str) -> str:
        return f"{CGROUP_ROOT}/{controller}/{path.strip('/')}/{name}".replace("//", "/")

    def _cpu_seconds(self, path: str) -> float | None:
        ns = self.files.number(self._cgroup_file("cpuacct", path, "cpuacct.usage"))
        return None if ns is None else ns / 1e9

    def _memory(self, path: str) -> int | None:
        usage = self.files.number(self._cgroup_file("memory", path, "memory.usage_in_bytes"))
        if usage is None:
            return None
        return memory_used(usage, self.files.read(
            self._cgroup_file("memory", path, "memory.stat")) or "")

    async def _containers(self) -> dict[str, _Seen]:
        """This node's running sigma containers, each inspected once for its cgroups."""
        found = await self.engine.containers({LABEL_INSTANCE: ""})
        running = {c.id: c for c in found if c.running}
        for cid in list(self.seen):
            if cid not in running:
                del self.seen[cid]
        for cid, c in running.items():
            if cid in self.seen:
                continue
            state = await self.engine.inspect(cid)
            if state is None or not state.pid:
                continue
            paths = cgroup_paths(self.files.read(f"proc/{state.pid}/cgroup") or "")
            if "cpuacct" in paths and "memory" in paths:
                self.seen[cid] = _Seen(c.labels.get(LABEL_INSTANCE, ""), paths["cpuacct"],
                                       paths["memory"], Rate())
        return self.seen

    def _parent(self, controller: str, name: str) -> str:
        """The path of the engine's cgroup parent in `controller`'s hierarchy: relative
        to the cgroup the engine (like this agent) runs in, else at the root (dockerd
        puts a relative --cgroup-parent under its own cgroup)."""
        own = cgroup_paths(self.files.read("proc/self/cgroup") or "").get(controller, "/")
        for path in (f"{own.rstrip('/')}/{self.cgroup}", f"/{self.cgroup}"):
            if self.files.read(self._cgroup_file(controller, path, name)) is not None:
                return path
        return f"/{self.cgroup}"

    def _host(self, at: float) -> tuple[HostUsed, str]:
        if self.cgroup:
            seconds = self._cpu_seconds(self._parent("cpuacct", "cpuacct.usage")) or 0.0
            memory = self._memory(self._parent("memory", "memory.usage_in_bytes")) or 0
            return HostUsed(self.host_rate.cores(seconds, at), memory), f"cgroup:{self.cgroup}"
        busy = machine_busy(self.files.read("proc/stat") or "")
        memory = machine_memory(self.files.read("proc/meminfo") or "")
        return HostUsed(self.host_rate.cores(busy, at), memory), USAGE_MACHINE

    async def _disks(self) -> list[Ssd]:
        found, _ = await self.store.scan(self.store.keys.ssds(self.node), Ssd)
        return [v.value for v in found if v.value.mount and v.value.state in (SSD_READY,
                                                                               SSD_BOUND)]

    async def sample(self) -> UsageRecord:
        """One sample of the host, its instances and its SSDs."""
        seen = await self._containers()
        disks = await self._disks()
        at = self.clock()
        host, scope = self._host(at)
        instances: dict[str, InstanceUsed] = {}
        for s in list(seen.values()):
            seconds, memory = self._cpu_seconds(s.cpuacct), self._memory(s.memory)
            if seconds is None or memory is None or not s.instance:
                continue
            used = instances.get(s.instance)
            if used is None:
                if len(instances) >= MAX_INSTANCES:
                    continue
                used = instances[s.instance] = InstanceUsed()
            used.cpu = round(used.cpu + s.rate.cores(seconds, at), 3)
            used.memory += memory
        ssds: dict[str, DiskUsed] = {}
        for d in disks:
            du = self.files.disk(d.mount, d.size)
            if du is None:
                continue
            ssds[d.id] = du
            if d.owner in instances:
                instances[d.owner].disk += du.used
        return UsageRecord(node=self.node, at=now(), host=host, instances=instances,
                           ssds=ssds, scope=scope)

    async def run(self, lease: Callable[[], int], interval: float) -> None:
        """Sample every `interval` seconds and write the record with the heartbeat lease
        (`lease()`, 0 while there is none: nothing is written then), until cancelled."""
        key = self.store.keys.usage(self.node)
        while True:
            tick = time.monotonic()
            try:
                record = self.last = await self.sample()
                if lease():
                    await self.store.put(key, record, lease=lease())
                    metrics.USAGE_SAMPLES.inc()
            except SigmaError as exc:
                log.warning("usage sample not written: %s", exc.message)
            await asyncio.sleep(max(tick + interval - time.monotonic(), 0.0))
