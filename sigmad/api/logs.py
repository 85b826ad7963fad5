"""An instance's container output for GET /v1/instances/{ns}/{name}/logs, relayed from its
node's engine (sigmad.engine) or, with `previous`, from its termination record; and a
command run in it for POST /v1/instances/{ns}/{name}/exec (output bounded by the engine;
with a terminal, a session of sigmad.api.terminals).

Invariants:
- every engine call runs on the main loop (`on_main`), where the engines live; the API's
  loop only writes what arrives;
- an answer is bounded: `tail` is at most MAX_TAIL lines, a read without `follow` at most
  MAX_READ bytes; a follow is a stream counted against the token's streams (like
  `?watch=true`), ended when the client goes, the container stops or the engine ends it,
  and a slow client holds the engine's stream back (a queue of RELAY_BACKLOG chunks) rather
  than making the master buffer it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from sigmad.engine import Engine, EnginePool
from sigmad.errors import NotFound, SpecError
from sigmad.models import Instance
from sigmad.state.cache import Cache

MAX_TAIL = 10_000
DEFAULT_TAIL = 100
MAX_READ = 4 << 20
RELAY_BACKLOG = 64
MAX_ARGS, MAX_ARG = 256, 4096  # an exec's command: arguments, characters each
MAX_EXEC_SECONDS = 300
OnMain = Callable[[Coroutine[Any, Any, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Query:
    """`?container=C&tail=N&follow=1&previous=1`, checked (SpecError naming the field)."""

    container: str
    tail: int
    follow: bool
    previous: bool

    @classmethod
    def of(cls, request: web.Request, inst: Instance) -> Query:
        q = request.query
        raw = q.get("tail", str(DEFAULT_TAIL))
        if not raw.isascii() or not raw.isdigit() or len(raw) > 6 or int(raw) > MAX_TAIL:
            raise SpecError("tail", f"must be a whole number from 0 to {MAX_TAIL}")
        follow, previous = (q.get(k, "").lower() in ("1", "true", "yes")
                            for k in ("follow", "previous"))
        if follow and previous:
            raise SpecError("follow", "a previous container's lines cannot be followed: "
                            "drop follow or previous")
        return cls(_container(inst, q.get("container", "")), int(raw), follow, previous)


def _container(inst: Instance, given: Any) -> str:
    """The container named `given` (default: the first) of `inst`; SpecError otherwise."""
    names = [c.name for c in inst.containers] or [t.container for t in inst.terminations]
    if not isinstance(given, str):
        raise SpecError("container", "must be a container name")
    container = given or (names[0] if names else "")
    if container not in names:
        known = ", ".join(dict.fromkeys(names)) or "none yet"
        raise SpecError("container", f"{container[:64]!r} is not a container of "
                        f"{inst.key} (its containers: {known})")
    return container


@dataclass(frozen=True)
class Exec:
    """`{"command": [...], "container": C, "timeout": S}`, checked; with `"stdin": true,
    "tty": true` a terminal session (sigmad.api.terminals), which has no timeout."""

    command: list[str]
    container: str
    timeout: float
    terminal: bool = False

    @classmethod
    def of(cls, body: dict[str, Any], inst: Instance) -> Exec:
        command = body.get("command")
        if not (isinstance(command, list) and 0 < len(command) <= MAX_ARGS
                and all(isinstance(a, str) and len(a) <= MAX_ARG for a in command)):
            raise SpecError("command", f"must be a list of 1 to {MAX_ARGS} strings (each at "
                            f"most {MAX_ARG} characters)")
        unknown = set(body) - {"command", "container", "timeout", "stdin", "tty"}
        if unknown:
            raise SpecError(sorted(unknown)[0], "is not a field of an exec (command, "
                            "container, timeout, stdin, tty)")
        stdin, tty = body.get("stdin", False), body.get("tty", False)
        for name, value in (("stdin", stdin), ("tty", tty)):
            if not isinstance(value, bool):
                raise SpecError(name, "must be true or false")
        if stdin != tty:
            raise SpecError("tty" if stdin else "stdin", "stdin and tty go together (a "
                            "terminal session): give both true, or neither")
        timeout = body.get("timeout", 30)
        if tty and "timeout" in body:
            raise SpecError("timeout", "a terminal session has no timeout (it ends when "
                            "idle): drop timeout, or stdin and tty")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) \
                or not 0 < timeout <= MAX_EXEC_SECONDS:
            raise SpecError("timeout", f"must be seconds, more than 0 and at most "
                            f"{MAX_EXEC_SECONDS}")
        return cls(list(command), _container(inst, body.get("container", "")),
                   float(timeout), tty)


def previous(inst: Instance, container: str) -> str:
    """The last lines kept with `container`'s last termination, under a line that says how
    it ended."""
    ends = [t for t in inst.terminations if t.container == container]
    if not ends:
        raise NotFound(f"no ended container {container} is kept for {inst.key}: it has not "
                       "ended (read its logs without previous)")
    end = ends[-1]
    head = f"# container {container} ({end.container_id[:12]}) ended: {end.reason}\n"
    return head + "".join(line + "\n" for line in end.logs)


def target(cache: Cache, engines: EnginePool, inst: Instance, container: str
           ) -> tuple[Engine, str]:
    """The engine of the instance's node and the id of its container `container`."""
    status = next((c for c in inst.containers if c.name == container and c.id), None)
    node = cache.node(inst.node) if inst.node else None
    if status is None or node is None:
        raise NotFound(f"container {container} of {inst.key} is not on a node now: see "
                       "its last lines with previous=1")
    engine, _ = engines.get(node.name, node.engine)
    return engine, status.id


async def read(engine: Engine, container_id: str, tail: int) -> bytes:
    """The last `tail` lines (at most MAX_READ bytes: the newest)."""
    data = b""
    stream = engine.logs(container_id, tail)
    try:
        async for chunk in stream:
            data = (data + chunk)[-MAX_READ:]
    finally:
        await stream.aclose()
    return data


async def relay(request: web.Request, response: web.StreamResponse, on_main: OnMain,
                engine: Engine, container_id: str, tail: int) -> None:
    """Stream the last `tail` lines and what follows to the client, chunk by chunk."""
    here = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(RELAY_BACKLOG)

    async def pump() -> None:
        """On the main loop: the engine's stream into the queue (held back when full)."""
        stream = engine.logs(container_id, tail, follow=True)
        try:
            async for chunk in stream:
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(queue.put(chunk),
                                                                           here))
        finally:
            await stream.aclose()

    def ended(_: object) -> None:
        if queue.full():  # (the client reads slowly: say the end after what it has)
            here.call_later(0.1, ended, None)
        else:
            queue.put_nowait(None)

    pumping = asyncio.ensure_future(on_main(pump()))
    pumping.add_done_callback(ended)
    await response.prepare(request)
    try:
        while (chunk := await queue.get()) is not None:
            await response.write(chunk)
        if not pumping.cancelled() and (exc := pumping.exception()) is not None:
            await response.write(f"\n# the log stream ended: {exc}\n".encode())
        await response.write_eof()
    finally:
        pumping.cancel()
