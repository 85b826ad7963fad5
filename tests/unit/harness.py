"""A leader on fakes, for unit tests: the in-memory store, the state cache on it, the
controller with fake engines, and the API's write path. No root, no etcd, no Docker."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, TypeVar

from aiohttp.test_utils import TestClient, TestServer

from sigmad.api.apps import AppWrites
from sigmad.api.routes import make_app
from sigmad.config import MasterConfig
from sigmad.control.controller import Controller
from sigmad.engine import Engine, EnginePool
from sigmad.events import Event
from sigmad.models import Beat, Instance, Node, Overcommit
from sigmad.spec import Resources, parse
from sigmad.state.cache import Cache
from tests.fakes.engine import FakeEngine
from tests.fakes.store import MemoryStore

T = TypeVar("T")
GI = 2**30
TOKEN = "0123456789abcdef0123"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


class Leader:
    """A store, its cache and a running controller (see the module docstring)."""

    def __init__(self, workers: int = 4, resync: float = 300.0,
                 fence_grace: float = 0.2) -> None:
        self.store = MemoryStore("/t")
        self.cache = Cache(self.store)
        self.engines: dict[str, FakeEngine] = {}
        self.pool = EnginePool("/t", factory=self._engine)
        self.config = MasterConfig(token=TOKEN, reconcile_interval=resync, workers=workers,
                                   fence_grace=fence_grace)
        self.controller = Controller(self.store, self.cache, self.config, self.pool)
        self.api = AppWrites(self.store, self.cache, self.pool)
        self.leases: dict[str, int] = {}
        self.tasks: list[asyncio.Task[Any]] = []

    @asynccontextmanager
    async def client(self, **options: Any) -> AsyncIterator[TestClient]:
        """A test client of the master's API over this store, cache and engines (`options`
        go to make_app)."""
        client = TestClient(TestServer(make_app(self.store, self.cache, TOKEN, self.pool,
                                                **options)))
        await client.start_server()
        try:
            yield client
        finally:
            await client.close()

    def _engine(self, url: str, cluster: str) -> Engine:
        return self.engines.setdefault(url, FakeEngine(url, cluster))

    def engine(self, node: str) -> FakeEngine:
        return self.engines.setdefault(f"fake://{node}", FakeEngine(f"fake://{node}", "/t"))

    async def __aenter__(self) -> Leader:
        self.tasks = [asyncio.create_task(self.cache.run())]
        await self.cache.synced.wait()
        self.tasks.append(asyncio.create_task(self.controller.run()))
        return self

    async def controller_stop(self) -> None:
        """Stop the controller (a leader lost): the store, cache and engines stay."""
        task = self.tasks.pop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def controller_start(self) -> None:
        """A new controller (a new leader) over the same store and engines: it rebuilds
        from etcd."""
        self.controller = Controller(self.store, self.cache, self.config, self.pool)
        self.tasks.append(asyncio.create_task(self.controller.run()))

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        for task in reversed(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def add_node(self, name: str, cpu_m: int = 4000, memory: int = 8 * GI,
                       labels: dict[str, str] | None = None, ports: int = 10,
                       ssds: int = 0) -> None:
        """A node record and its heartbeat (as its agent writes them)."""
        self.engine(name)
        node = Node(name, f"fake://{name}", address=f"10.0.0.{len(self.leases) + 1}",
                    labels=labels or {}, capacity=Resources(cpu_m, memory),
                    allocatable=Resources(cpu_m, memory), overcommit=Overcommit(),
                    port_range=[31000, 31000 + ports - 1], ssds=ssds)
        await self.store.put(self.store.keys.node(name), node)
        self.leases[name] = await self.store.grant(5)
        await self.beat(name)

    async def beat(self, name: str, engine: bool = True) -> None:
        """Its agent's heartbeat, saying whether its engine answers."""
        await self.store.put(self.store.keys.heartbeat(name), Beat(name, 0.0, engine),
                             lease=self.leases[name])

    async def lose_node(self, name: str) -> None:
        """Its heartbeat lease lapses."""
        await self.store.expire(self.leases.pop(name))

    async def apply(self, text: str, force: bool = False) -> list[Any]:
        return await self.api.apply(parse(text), dry_run=False, force=force)

    def events(self) -> list[str]:
        """The messages of the events written so far, oldest first."""
        prefix = self.store.keys.events()
        return [self.store.value(k, Event).message for k in sorted(self.store.data)
                if k.startswith(prefix)]

    def instances(self, app: str = "") -> list[Instance]:
        return sorted((v.value for v in self.cache.instances().values()
                       if not app or v.value.app == app), key=lambda i: (i.app, i.index))

    async def until(self, check: Callable[[], T], timeout: float = 5.0, what: str = "") -> T:
        """Poll `check` until it is truthy (a bounded wait)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = check()
            if last:
                return last
            await asyncio.sleep(0.01)
        raise AssertionError(f"timed out after {timeout}s waiting for {what or check}; "
                             f"last: {last!r}")

    async def running(self, app: str, count: int, timeout: float = 5.0) -> list[Instance]:
        def check() -> list[Instance] | None:
            found = self.instances(app)
            ok = len(found) == count and all(i.state == "Running" for i in found)
            return found if ok else None
        return await self.until(check, timeout, f"{count} Running instances of {app}")


def spec(app: str = "web", replicas: int = 2, **extra: str) -> str:
    """A small app spec (YAML); `extra` adds top-level YAML lines."""
    lines = [f"app: {app}", f"replicas: {replicas}", "containers:",
             "  - name: main", "    image: img",
             "    resources: {request: {cpu: 100m, memory: 64Mi}, "
             "limit: {cpu: 500m, memory: 128Mi}}"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


async def call(client: TestClient, method: str, path: str, body: Any = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """(status, JSON answer) of one API call, as the bootstrap admin unless `headers`."""
    data = body if isinstance(body, str) or body is None else json.dumps(body)
    async with client.request(method, path, data=data,
                              headers=ADMIN if headers is None else headers) as r:
        return r.status, await r.json()
