"""Interactive exec sessions (`sigmactl exec -it`): POST /v1/instances/{ns}/{name}/exec with
`stdin` and `tty` makes an exec in the engine and a session here (`Terminals.add`); GET
/v1/exec/{id} upgrades to a WebSocket that relays the exec's terminal both ways (`relay`).

On the WebSocket, client to master: binary messages are keystrokes, a text message is
`{"resize": [rows, cols]}`. Master to client: binary messages are the terminal's output,
then one text message, `{"exit_code": N}` or `{"error": "..."}`, and the close.

Invariants:
- a session is opened at most once, within `open_within` seconds of its making, and only
  with the token that made it (its Principal's id); at most `most` wait to be opened;
- every engine call runs on the main loop (`on_main`); this loop only relays, and a slow
  client holds the terminal's output back (RELAY_BACKLOG chunks) rather than buffering it;
- a session with no byte either way for `idle` seconds ends;
- however a session ends (the command exits, the client hangs up, idles or sends a bad
  message), every process of the container still carrying its marker (the environment
  variable MARKER, inherited by whatever the command starts) is sent SIGHUP, then SIGKILL a
  second later: a hung-up shell leaves nothing running. This needs `sh`, `tr`, `grep` and
  `kill` in the container (busybox has them); without them the leftovers stay, and a
  warning is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web

from sigmad.engine import Engine, Terminal
from sigmad.errors import EngineError, Forbidden, NotFound, SpecError

log = logging.getLogger(__name__)
MARKER = "SIGMA_EXEC"  # env NAME=marker on a session's command and all it starts
OPEN_WITHIN = 30.0  # seconds a made session waits to be opened
MAX_PENDING = 256  # sessions made and not yet opened, on one master
RELAY_BACKLOG = 64  # output chunks queued for a slow client
EXIT_WAIT = 5.0  # seconds the engine gets to say an ended command's exit code
MAX_MESSAGE = 1 << 16  # bytes of one client message
MAX_SIZE = 10_000  # rows or columns of a terminal
# Ends the processes whose environment holds the line $1 (MARKER=marker): SIGHUP, then
# SIGKILL for the ones still there a second later; prints what it signalled.
END_MARKED = """m="$1"
marked() { for d in /proc/[0-9]*; do
  tr '\\0' '\\n' < "$d/environ" 2>/dev/null | grep -qx "$m" && echo "${d#/proc/}"; done; }
p=$(marked); [ -n "$p" ] || exit 0
kill -HUP $p 2>/dev/null; echo HUP $p; sleep 1
p=$(marked); [ -n "$p" ] || exit 0
kill -KILL $p 2>/dev/null; echo KILL $p
"""
OnMain = Callable[[Coroutine[Any, Any, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Session:
    """An exec made in an engine, waiting for its WebSocket."""

    who: str  # the id of the token that made it
    what: str  # NAMESPACE/INSTANCE container, for messages and logs
    engine: Engine
    container_id: str
    exec_id: str
    marker: str
    expires: float  # time.monotonic() after which it cannot be opened


def new_marker() -> str:
    return secrets.token_hex(8)


class Terminals:
    """The sessions of this master that wait to be opened (module docstring)."""

    def __init__(self, idle: float, open_within: float = OPEN_WITHIN,
                 most: int = MAX_PENDING,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.idle = idle
        self.open_within = open_within
        self.most = most
        self.clock = clock
        self._pending: dict[str, Session] = {}

    def add(self, who: str, what: str, engine: Engine, container_id: str, exec_id: str,
            marker: str) -> str:
        """A new session's id (a secret, like a token's)."""
        self._prune()
        while len(self._pending) >= self.most:
            self._pending.pop(next(iter(self._pending)))  # the oldest
        sid = secrets.token_urlsafe(24)
        self._pending[sid] = Session(who, what, engine, container_id, exec_id, marker,
                                     self.clock() + self.open_within)
        return sid

    def take(self, sid: str, who: str) -> Session:
        """The session `sid`, opened by the token `who`: no other opens it again.
        NotFound when unknown, already opened or expired; Forbidden for another token."""
        self._prune()
        session = self._pending.get(sid)
        if session is None:
            raise NotFound(f"no exec session {sid[:8]}…: each is opened once, within "
                           f"{self.open_within:g}s of its making; make a new one")
        if session.who != who:
            raise Forbidden("this exec session belongs to another token: open it with the "
                            "token that made it")
        del self._pending[sid]
        return session

    def _prune(self) -> None:
        now = self.clock()
        for sid in [s for s, v in self._pending.items() if v.expires <= now]:
            del self._pending[sid]


def resize_of(text: str) -> tuple[int, int]:
    """(rows, cols) of a `{"resize": [rows, cols]}` message; SpecError naming the field."""
    try:
        body = json.loads(text)
    except ValueError:
        raise SpecError("message", 'must be JSON: {"resize": [rows, cols]}') from None
    size = body.get("resize") if isinstance(body, dict) else None
    if not (isinstance(body, dict) and set(body) == {"resize"} and isinstance(size, list)
            and len(size) == 2 and all(type(n) is int and 0 < n <= MAX_SIZE for n in size)):
        raise SpecError("resize", f"must be [rows, cols], whole numbers from 1 to {MAX_SIZE}")
    return size[0], size[1]


async def relay(ws: web.WebSocketResponse, session: Session, on_main: OnMain,
                idle: float) -> None:
    """Start the session's exec and relay its terminal and `ws` both ways until the command
    ends (its exit code is sent), the client goes, or `idle` seconds pass without a byte;
    then end the session's leftover processes."""
    here = asyncio.get_running_loop()
    out: asyncio.Queue[bytes | None] = asyncio.Queue(RELAY_BACKLOG)
    try:
        term: Terminal = await on_main(session.engine.exec_attach(session.exec_id))
    except EngineError as exc:
        await _last(ws, {"error": f"the command did not start: {exc.message}"})
        return
    last = [time.monotonic()]

    async def pump() -> None:
        """On the main loop: the terminal's output into the queue, then None."""
        try:
            while data := await term.read():
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(out.put(data),
                                                                           here))
        except Exception:  # (a bug, not a closed terminal: that reads b"")
            log.exception("exec %s: reading its terminal failed", session.what)
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(out.put(None), here))

    async def to_client() -> None:
        while (data := await out.get()) is not None:
            last[0] = time.monotonic()
            await ws.send_bytes(data)

    async def from_client() -> str:
        """Until the client closes: its keystrokes and resizes to the engine; a bad message
        ends the session with what is wrong ("" when the client closed)."""
        async for msg in ws:
            last[0] = time.monotonic()
            if msg.type is WSMsgType.BINARY:
                with contextlib.suppress(EngineError):  # it ended: its output's end says so
                    await on_main(term.write(msg.data))
            elif msg.type is WSMsgType.TEXT:
                try:
                    rows, cols = resize_of(msg.data)
                except SpecError as exc:
                    return exc.message
                await on_main(_resize(session, rows, cols))
        return ""

    async def idled() -> None:
        while (left := last[0] + idle - time.monotonic()) > 0:
            await asyncio.sleep(left)

    pumping = asyncio.ensure_future(on_main(pump()))
    tasks = {name: asyncio.ensure_future(coro) for name, coro in (
        ("output", to_client()), ("input", from_client()), ("idle", idled()))}
    try:
        done, _ = await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_COMPLETED)
        first = next(n for n, t in tasks.items() if t in done)
        if first == "output" and tasks["output"].exception() is None:
            code = await on_main(_exit_code(session))
            await _last(ws, {"exit_code": code} if code is not None else {
                "error": "the terminal closed and the command still runs: it is ended"})
        elif first == "input" and not tasks["input"].exception() and tasks["input"].result():
            await _last(ws, {"error": tasks["input"].result()})
        elif first == "idle":
            await _last(ws, {"error": f"no input or output for {idle:g}s: the session "
                                      "ended"})
    finally:
        pumping.cancel()
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(pumping, *tasks.values(), return_exceptions=True)
        await on_main(_close(term))
        await ws.close()
        await on_main(end_marked(session))


async def _last(ws: web.WebSocketResponse, message: dict[str, Any]) -> None:
    """The session's last message, unless the client is gone."""
    if not ws.closed:
        with contextlib.suppress(ConnectionError):
            await ws.send_str(json.dumps(message))


async def _resize(session: Session, rows: int, cols: int) -> None:
    try:
        await session.engine.exec_resize(session.exec_id, rows, cols)
    except EngineError as exc:  # a size is not worth ending a session for
        log.info("exec %s: resize to %dx%d failed: %s", session.what, rows, cols,
                 exc.message)


async def _close(term: Terminal) -> None:
    term.close()


async def _exit_code(session: Session) -> int | None:
    """The ended command's exit code (None if it still runs after EXIT_WAIT seconds)."""
    deadline = time.monotonic() + EXIT_WAIT
    while True:
        try:
            running, code = await session.engine.exec_state(session.exec_id)
        except EngineError as exc:
            log.warning("exec %s: its exit code is unknown: %s", session.what, exc.message)
            return None
        if not running:
            return code
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.05)


async def end_marked(session: Session) -> None:
    """End the session's processes still running (module docstring); logs what it did."""
    try:
        code, output = await session.engine.run(session.container_id, [
            "sh", "-c", END_MARKED, "sh", f"{MARKER}={session.marker}"], 10.0)
    except EngineError as exc:
        log.warning("exec %s: its leftover processes were not ended: %s", session.what,
                    exc.message)
        return
    said = output.decode(errors="replace").strip()
    if code:
        log.warning("exec %s: its leftover processes were not ended (the container needs "
                    "sh, tr, grep and kill): exit %d: %s", session.what, code, said[:200])
    elif said:
        log.info("exec %s: ended its leftover processes: %s", session.what, said)
