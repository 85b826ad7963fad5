"""`sigmactl exec -it`: this terminal on a command in an instance's container, over the
WebSocket of a terminal session of the master that made it (sigmad.api.terminals).

Invariants:
- the local terminal is in raw mode only while the session runs, and its mode is given back
  however the session ends (the command's exit, an error, a lost connection);
- every size change of the local terminal (SIGWINCH) is sent as a resize, and so is its
  size at the start (unless it has none: 0 rows or columns);
- the exit status is the command's; 255 when the session ended without one (as ssh does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import termios
import tty
from collections.abc import Iterator
from typing import Any

import aiohttp
import click

from sigmactl.client import Client, CtlError, tls_context

NO_EXIT_CODE = 255
CONNECT_TIMEOUT = 30.0


def run(client: Client, path: str, stdin: int = 0, stdout: int = 1) -> int:
    """Relay the session at `path` (of the master `client` used last) between this
    terminal (`stdin`, `stdout`) and the command; its exit status."""
    with _raw(stdin):
        code, error = asyncio.run(_session(client, path, stdin, stdout))
    if error:  # (said once the terminal is itself again)
        click.echo(f"error: {error}", err=True)
    return code


def need_terminal(fd: int) -> None:
    """CtlError unless `fd` is a terminal (checked before a session is made)."""
    if not os.isatty(fd):
        raise CtlError("-it needs a terminal on stdin: run it from one (or drop -it to run "
                       "the command and print its output)")


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    """`fd`'s terminal in raw mode (typed-ahead input kept), its mode given back after."""
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSADRAIN)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _size(fd: int) -> str | None:
    """The resize message of `fd`'s terminal (None when it has no size: the engine's
    default stays)."""
    size = os.get_terminal_size(fd)
    if not (size.lines and size.columns):
        return None
    return json.dumps({"resize": [size.lines, size.columns]})


async def _session(client: Client, path: str, stdin: int, stdout: int) -> tuple[int, str]:
    """(exit status, error message or "")."""
    url = client.server.replace("http", "ws", 1) + path
    ssl = tls_context(client.ca) if url.startswith("wss://") else True
    headers = {"Authorization": f"Bearer {client.token}"} if client.token else {}
    loop = asyncio.get_running_loop()
    timeout = aiohttp.ClientWSTimeout(ws_close=5.0)
    async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(connect=CONNECT_TIMEOUT)) as http:
        try:
            ws = await http.ws_connect(url, headers=headers, ssl=ssl, timeout=timeout,
                                       max_msg_size=0)
        except aiohttp.WSServerHandshakeError as exc:
            return NO_EXIT_CODE, (f"the master refused the terminal ({exc.status} "
                                  f"{exc.message}): run the command again")
        except (aiohttp.ClientError, OSError) as exc:
            return NO_EXIT_CODE, (f"cannot open the terminal at {client.server} "
                                  f"({exc or type(exc).__name__}): run the command again")
        sending: set[asyncio.Task[Any]] = set()

        def send(data: bytes | str | None) -> None:
            if data is None or ws.closed:
                return
            task = asyncio.ensure_future(ws.send_bytes(data) if isinstance(data, bytes)
                                         else ws.send_str(data))
            sending.add(task)
            task.add_done_callback(sending.discard)

        def typed() -> None:
            try:
                data = os.read(stdin, 65536)
            except OSError:
                data = b""
            if data:
                send(data)
            else:  # the terminal is gone: so is this end
                loop.remove_reader(stdin)

        send(_size(stdin))
        loop.add_reader(stdin, typed)
        loop.add_signal_handler(signal.SIGWINCH, lambda: send(_size(stdin)))
        try:
            return await _output(ws, stdout)
        finally:
            loop.remove_reader(stdin)
            loop.remove_signal_handler(signal.SIGWINCH)
            await ws.close()


async def _output(ws: aiohttp.ClientWebSocketResponse, stdout: int) -> tuple[int, str]:
    """Write the terminal's output until the session's last message; (status, error)."""
    async for msg in ws:
        if msg.type is aiohttp.WSMsgType.BINARY:
            _write_all(stdout, msg.data)
        elif msg.type is aiohttp.WSMsgType.TEXT:
            last = json.loads(msg.data)
            if "exit_code" in last:
                return int(last["exit_code"]), ""
            return NO_EXIT_CODE, f"the session ended: {last.get('error', last)}"
    return NO_EXIT_CODE, "the connection to the master was lost: the command's end is unknown"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
