"""`exec -it` on a real master, agent, etcd and dockerd: the session's WebSocket driven by
hand (a shell's output, its exit code, a resize its `stty size` sees, a hang-up that ends
what the shell left running even though it ignores SIGHUP), and `sigmactl exec -it` on a
pseudo-terminal."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import subprocess
import sys
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


def test_sigmactl_exec_it_on_a_terminal(web: Cluster) -> None:
    """The CLI end to end: raw mode on a pseudo-terminal, the shell's output, its exit code,
    and the terminal's mode given back."""
    leader, follower = pty.openpty()
    before = subprocess.run(["stty", "-g"], stdin=follower, capture_output=True,
                            text=True).stdout
    proc = subprocess.Popen([sys.executable, "-m", "sigmactl", "exec", "-it", "web-0", "--",
                             "sh"], stdin=follower, stdout=follower, stderr=follower,
                            env=web.env)
    seen = b""
    try:
        os.write(leader, b"echo h''i; exit 3\n")
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.2)[0]:
                seen += os.read(leader, 4096)
        assert proc.wait(10) == 3, seen
    finally:
        if proc.poll() is None:
            proc.kill()
        while select.select([leader], [], [], 0.1)[0]:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    assert b"\r\nhi\r\n" in seen, seen
    after = subprocess.run(["stty", "-g"], stdin=follower, capture_output=True,
                           text=True).stdout
    assert after == before  # raw mode undone
    os.close(leader)
    os.close(follower)
