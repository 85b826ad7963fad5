"""A fake container engine for unit tests (the `Engine` protocol, in memory).

Containers go created → running → exited like Docker's, with Docker's errors (409 for a
taken name, 404 for an unknown container or image, 304 handled as Docker's client sees it)
and Docker's events. Scripts make things happen:
- `exit(cid, code, oom=False)`: the container ends (OOM-killed if asked);
- `script[name] = code`: a container of that name exits with `code` right after it starts;
- `probe[name] = n`: its readiness probe fails n times, then passes;
- `slow = seconds`: every call takes that long; `hang()`: calls wait until `release()`;
- `down = True`: every call fails as an unreachable engine does;
- an exec with a terminal (`exec_create`, `exec_attach`) is a FakeTerminal in `terminals`:
  it echoes what is typed, and a typed line `exit N` ends it with code N.
Every call is recorded in `calls` (its name and first argument).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from sigmad.engine import LABEL_CLUSTER, ContainerState
from sigmad.errors import EngineError


class FakeTerminal:
    """An exec's terminal (see the module docstring); `sizes` are the resizes it got."""

    def __init__(self, container_id: str, command: list[str], env: list[str]) -> None:
        self.container_id = container_id
        self.command = command
        self.env = env
        self.started = False
        self.closed = False
        self.code: int | None = None  # None while it runs
        self.sizes: list[tuple[int, int]] = []
        self._line = b""
        self._output: asyncio.Queue[bytes] = asyncio.Queue()

    def say(self, data: bytes) -> None:
        """The command writes `data`."""
        self._output.put_nowait(data)

    async def read(self) -> bytes:
        return b"" if self.closed else await self._output.get()

    async def write(self, data: bytes) -> None:
        if self.closed or self.code is not None:
            raise EngineError("fake terminal: the terminal is gone")
        self.say(data)
        self._line += data
        while b"\n" in self._line:
            line, _, self._line = self._line.partition(b"\n")
            if line.startswith(b"exit "):
                self.code = int(line.split()[1])
                self.say(b"")

    def close(self) -> None:
        self.closed = True
        self.say(b"")


@dataclass
class FakeContainer:
    id: str
    name: str
    config: dict[str, Any]
    status: str = "created"
    exit_code: int = 0
    oom: bool = False
    started_at: str = ""
    finished_at: str = ""
    caps: dict[str, Any] = field(default_factory=dict)
    output: list[str] = field(default_factory=list)  # lines it wrote (last_lines reads them)

    @property
    def labels(self) -> dict[str, str]:
        labels: dict[str, str] = self.config.get("Labels", {})
        return labels

    def state(self) -> ContainerState:
        ip = ((self.config.get("NetworkingConfig") or {}).get("EndpointsConfig") or {})
        address = next((e.get("IPAMConfig", {}).get("IPv4Address", "")
                        for e in ip.values()), "")
        return ContainerState(
            id=self.id, name=self.name, labels=dict(self.labels),
            running=self.status == "running", status=self.status, exit_code=self.exit_code,
            oom_killed=self.oom, error="", started_at=self.started_at,
            finished_at=self.finished_at, pid=1 if self.status == "running" else 0,
            ip=address if self.status == "running" else "",
        )


class FakeEngine:
    """See the module docstring."""

    def __init__(self, url: str = "fake://engine", cluster: str = "",
                 images: set[str] | None = None) -> None:
        self.url = url
        self.cluster = cluster
        self.images = images if images is not None else {"img"}
        self.by_id: dict[str, FakeContainer] = {}
        self.calls: list[tuple[str, str]] = []
        self.script: dict[str, int] = {}
        self.probe: dict[str, int] = {}
        self.slow = 0.0
        self.down = False
        self._gate = asyncio.Event()
        self._gate.set()
        self._ids = itertools.count(1)
        self._clock = itertools.count(1)
        self._subscribers: list[asyncio.Queue[dict[str, Any]]] = []
        self.terminals: dict[str, FakeTerminal] = {}

    # -- scripting ----------------------------------------------------------------------------

    def hang(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def exit(self, cid: str, code: int, oom: bool = False) -> None:
        c = self.by_id[cid]
        c.status, c.exit_code, c.oom, c.finished_at = "exited", code, oom, self._now()
        if oom:
            self._event("oom", c)
        self._event("die", c, exitCode=str(code))

    def running(self) -> list[FakeContainer]:
        return [c for c in self.by_id.values() if c.status == "running"]

    def _now(self) -> str:
        return f"2026-01-01T00:00:{next(self._clock) % 60:02d}.000000000Z"

    def _event(self, action: str, c: FakeContainer, **attrs: str) -> None:
        event = {"status": action, "id": c.id, "Type": "container", "Action": action,
                 "Actor": {"ID": c.id, "Attributes": {**c.labels, "name": c.name, **attrs}}}
        for q in self._subscribers:
            q.put_nowait(event)

    async def _call(self, name: str, arg: str = "") -> None:
        self.calls.append((name, arg))
        await self._gate.wait()
        if self.slow:
            await asyncio.sleep(self.slow)
        if self.down:
            raise EngineError(f"engine {self.url} is unreachable: fake engine down")

    def _get(self, ref: str) -> FakeContainer | None:
        return self.by_id.get(ref) or next(
            (c for c in self.by_id.values() if c.name == ref or c.id.startswith(ref)),
            None)

    # -- the Engine protocol ------------------------------------------------------------------

    async def close(self) -> None:
        return None

    async def info(self) -> dict[str, Any]:
        await self._call("info")
        return {"NCPU": 4, "MemTotal": 8 << 30, "ServerVersion": "fake", "SwapLimit": True,
                "MemoryLimit": True}

    async def ping(self) -> None:
        await self._call("ping")

    async def ensure_network(self, cidr: str, gateway: str) -> bool:
        await self._call("ensure_network", cidr)
        return False

    async def ensure_image(self, ref: str,
                           progress: Callable[[str], None] | None = None) -> None:
        await self._call("ensure_image", ref)
        if ref not in self.images:
            raise EngineError(f"image {ref} not found: manifest unknown", 404)

    async def create(self, name: str, config: dict[str, Any]) -> str:
        await self._call("create", name)
        if any(c.name == name for c in self.by_id.values()):
            raise EngineError(f"{self.url}: Conflict. The container name \"/{name}\" is "
                              "already in use", 409)
        if config.get("Image") not in self.images:
            raise EngineError(f"{self.url}: No such image: {config.get('Image')}", 404)
        labels = {**config.get("Labels", {}),
                  **({LABEL_CLUSTER: self.cluster} if self.cluster else {})}
        cid = f"{next(self._ids):064x}"
        c = FakeContainer(cid, name, {**config, "Labels": labels},
                          caps={k: v for k, v in config.get("HostConfig", {}).items()
                                if k in ("NanoCpus", "Memory", "MemorySwap")})
        self.by_id[cid] = c
        self._event("create", c)
        return cid

    async def start(self, container_id: str) -> None:
        await self._call("start", container_id)
        c = self._get(container_id)
        if c is None:
            raise EngineError(f"{self.url}: No such container: {container_id}", 404)
        if c.status == "running":
            return
        c.status, c.started_at, c.finished_at = "running", self._now(), ""
        self._event("start", c)
        name = c.labels.get("sigma.container", "")
        if name in self.script:
            self.exit(c.id, self.script[name])

    async def stop(self, container_id: str, timeout: int = 10) -> None:
        await self._call("stop", container_id)
        c = self._get(container_id)
        if c is not None and c.status == "running":
            c.status, c.exit_code, c.finished_at = "exited", 143, self._now()
            self._event("die", c, exitCode="143")
            self._event("stop", c)

    async def remove(self, container_id: str) -> None:
        await self._call("remove", container_id)
        c = self._get(container_id)
        if c is not None:
            del self.by_id[c.id]
            self._event("destroy", c)

    async def inspect(self, container_id: str) -> ContainerState | None:
        await self._call("inspect", container_id)
        c = self._get(container_id)
        return None if c is None else c.state()

    async def containers(self, labels: dict[str, str] | None = None) -> list[ContainerState]:
        await self._call("containers")
        wanted = {**(labels or {}), **({LABEL_CLUSTER: self.cluster} if self.cluster else {})}
        found = []
        for c in self.by_id.values():
            if all(k in c.labels and (not v or c.labels[k] == v) for k, v in wanted.items()):
                s = c.state()
                s.started_at = s.finished_at = ""
                s.oom_killed, s.full = False, False
                found.append(s)
        return found

    async def find(self, labels: dict[str, str] | None = None) -> list[ContainerState]:
        return [c.state() for c in map(self._get, [s.id for s in await self.containers(labels)])
                if c is not None]

    async def update(self, container_id: str, resources: dict[str, Any]) -> None:
        await self._call("update", container_id)
        c = self._get(container_id)
        if c is None:
            raise EngineError(f"{self.url}: No such container: {container_id}", 404)
        c.caps.update(resources)

    async def kill(self, container_id: str, signal: str) -> None:
        await self._call("kill", f"{container_id} {signal}")

    async def exec(self, container_id: str, command: list[str], timeout: float = 10.0) -> int:
        await self._call("exec", container_id)
        c = self._get(container_id)
        name = c.labels.get("sigma.container", "") if c else ""
        left = self.probe.get(name, 0)
        if left:
            self.probe[name] = left - 1
            return 1
        return 0

    async def logs(self, container_id: str, tail: int, follow: bool = False
                   ) -> AsyncGenerator[bytes, None]:
        await self._call("logs", container_id)
        c = self._get(container_id)
        if c is None:
            raise EngineError(f"{self.url}: No such container: {container_id}", 404)
        lines = c.output[-tail:] if tail else []
        yield "".join(line + "\n" for line in lines).encode()

    async def run(self, container_id: str, command: list[str], timeout: float
                  ) -> tuple[int, bytes]:
        await self._call("run", " ".join(command))
        return self.probe.get(command[0], 0), (" ".join(command) + "\n").encode()

    async def exec_create(self, container_id: str, command: list[str], env: list[str]
                          ) -> str:
        await self._call("exec_create", container_id)
        c = self._get(container_id)
        if c is None or c.status != "running":
            raise EngineError(f"{self.url}: Container {container_id} is not running", 409)
        exec_id = f"exec-{next(self._ids)}"
        self.terminals[exec_id] = FakeTerminal(container_id, command, env)
        return exec_id

    async def exec_attach(self, exec_id: str) -> FakeTerminal:
        await self._call("exec_attach", exec_id)
        term = self.terminals[exec_id]
        if term.started:
            raise EngineError(f"{self.url}: exec {exec_id} has already started", 409)
        term.started = True
        return term

    async def exec_resize(self, exec_id: str, rows: int, cols: int) -> None:
        await self._call("exec_resize", f"{exec_id} {rows}x{cols}")
        self.terminals[exec_id].sizes.append((rows, cols))

    async def exec_state(self, exec_id: str) -> tuple[bool, int]:
        await self._call("exec_state", exec_id)
        term = self.terminals[exec_id]
        return term.code is None and not term.closed, term.code or 0

    async def last_lines(self, container_id: str, count: int) -> list[str]:
        await self._call("last_lines", container_id)
        c = self._get(container_id)
        return c.output[-count:] if c is not None and count else []

    async def memory_usage(self, container_id: str) -> int:
        await self._call("memory_usage", container_id)
        return 1 << 20

    async def events(self, labels: dict[str, str] | None = None, since: float | None = None
                     ) -> AsyncIterator[dict[str, Any]]:
        await self._call("events")
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._subscribers.append(q)
        try:
            while True:
                event = await q.get()
                attrs = event["Actor"]["Attributes"]
                if all(k in attrs and (not v or attrs[k] == v)
                       for k, v in (labels or {}).items()):
                    yield event
        finally:
            self._subscribers.remove(q)
