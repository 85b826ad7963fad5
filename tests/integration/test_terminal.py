"""`exec -it` on a real master, agent, etcd and dockerd: the session's WebSocket driven by
hand (a shell's output, its exit code, a resize its `stty size` sees, a hang-up that ends
what the shell left running even though it ignores SIGHUP), and `sigmactl exec -it` on a
pseudo-terminal (its size, a SIGWINCH, the exit code, the terminal's mode given back)."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import Cluster, wait_for, web_spec

pytestmark = pytest.mark.integration
SHELL = json.dumps({"command": ["sh"], "stdin": True, "tty": True})


@pytest.fixture
def web(cluster: Cluster) -> Cluster:
    cluster.apply(web_spec(1))
    cluster.wait_running("web", 1)
    return cluster


@pytest.fixture
async def http(web: Cluster) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
            web.server, headers={"Authorization": f"Bearer {web.token}"}) as session:
        yield session


async def _open(web: Cluster, http: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse:
    status, made = web.api("POST", "/v1/instances/default/web-0/exec", SHELL)
    assert status == 201, made
    return await http.ws_connect(made["path"])


async def _read_until(ws: aiohttp.ClientWebSocketResponse, want: bytes,
                      seen: bytearray) -> None:
    """Read the terminal's output into `seen` until it holds `want` (10 s at most)."""
    async with asyncio.timeout(10):
        while want not in seen:
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.BINARY, (msg, bytes(seen))
            seen += msg.data


async def _last(ws: aiohttp.ClientWebSocketResponse, seen: bytearray) -> dict[str, Any]:
    async with asyncio.timeout(10):
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                return dict(json.loads(msg.data))
            seen += msg.data
    raise AssertionError(f"closed without a last message; output {bytes(seen)!r}")


def _ps(web: Cluster) -> str:
    [cid] = web.engine.sigma_containers("web")
    return web.engine.docker("exec", cid, "ps", "-o", "pid,args").stdout


async def test_a_shell_echoes_resizes_and_exits_3(web: Cluster,
                                                  http: aiohttp.ClientSession) -> None:
    ws = await _open(web, http)
    seen = bytearray()
    await ws.send_str(json.dumps({"resize": [37, 111]}))
    await ws.send_bytes(b"stty size\n")
    await _read_until(ws, b"37 111", seen)
    await ws.send_str(json.dumps({"resize": [50, 132]}))
    await ws.send_bytes(b"stty size\n")
    await _read_until(ws, b"50 132", seen)
    await ws.send_bytes(b"echo h''i; exit 3\n")  # ('' keeps the echoed line from matching)
    last = await _last(ws, seen)
    assert last == {"exit_code": 3}, bytes(seen)
    assert b"\r\nhi\r\n" in seen  # a terminal's line ends
    assert (await ws.receive()).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


async def test_a_hang_up_ends_what_the_shell_left(web: Cluster,
                                                  http: aiohttp.ClientSession) -> None:
    ws = await _open(web, http)
    seen = bytearray()
    await ws.send_bytes(b"trap '' HUP; sleep 777 & echo start''ed\n")
    await _read_until(ws, b"started", seen)
    assert "sleep 777" in _ps(web)
    await ws.close()  # the client hangs up
    wait_for(lambda: "sleep 777" not in _ps(web), 10,
             f"sleep 777 (ignoring SIGHUP) to end after the hang-up; ps: {_ps(web)}")


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class _Pty:
    """A pseudo-terminal's leader end and what was read from it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.seen = b""

    def read_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if select.select([self.fd], [], [], left)[0]:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # (EIO: no one holds the other end)
                    return
                if not chunk:
                    return
                self.seen += chunk

    def until(self, want: bytes, seconds: float = 10) -> None:
        deadline = time.monotonic() + seconds
        while want not in self.seen and time.monotonic() < deadline:
            self.read_for(0.2)
        assert want in self.seen, self.seen


def test_sigmactl_exec_it_on_a_terminal(web: Cluster) -> None:
    """The CLI end to end: raw mode on a pseudo-terminal, its size at the start and after a
    SIGWINCH, the shell's output, its exit code, and the terminal's mode given back."""
    leader, follower = pty.openpty()
    _set_size(follower, 30, 90)
    before = subprocess.run(["stty", "-g"], stdin=follower, capture_output=True,
                            text=True).stdout
    proc = subprocess.Popen([sys.executable, "-m", "sigmactl", "exec", "-it", "web-0", "--",
                             "sh"], stdin=follower, stdout=follower, stderr=follower,
                            env=web.env)
    term = _Pty(leader)
    try:
        os.write(leader, b"stty size\n")
        term.until(b"30 90")
        _set_size(follower, 45, 120)
        proc.send_signal(signal.SIGWINCH)  # (what the kernel sends a terminal's foreground)
        deadline = time.monotonic() + 10
        while b"45 120" not in term.seen and time.monotonic() < deadline:
            os.write(leader, b"stty size\n")  # (until the resize has reached the shell)
            term.read_for(1)
        assert b"45 120" in term.seen, term.seen
        os.write(leader, b"echo h''i; exit 3\n")
        assert proc.wait(20) == 3, term.seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    term.read_for(0.5)
    assert b"\r\nhi\r\n" in term.seen, term.seen
    after = subprocess.run(["stty", "-g"], stdin=follower, capture_output=True,
                           text=True).stdout
    assert after == before  # raw mode undone
    os.close(leader)
    os.close(follower)
