"""How the API is served on a TCP port: bounded in connections and in time.

Invariants:
- at most `Limits.max_connections` connections are served at once; one more is answered
  503 (with when to try again) and closed, without reaching the application;
- a connection that has not sent a whole request head within `header_timeout` seconds of
  connecting (`_FirstHead`) or of its last answer (aiohttp's keep-alive timer) is closed:
  slow or idle clients hold no connection for longer;
- a request body that has not arrived within `body_timeout` seconds is answered 408 before
  any handler runs (`read_body`), and the rest of it is waited for LINGER seconds at most.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from sigmad.metrics import Metrics

LINGER = 2.0  # seconds the unread rest of a refused body is read before the close
REFUSED_FOR = 1.0  # seconds a connection over the cap stays open to read its answer
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Limits:
    """The API's bounds (conf/master.yaml: header_timeout, body_timeout, max_connections,
    stream_heartbeat, exec_idle_timeout)."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 1024
    stream_heartbeat: float = 5.0
    exec_idle: float = 900.0  # seconds a terminal session may pass without a byte


def read_body(limits: Limits, metrics: Metrics) -> Callable[..., Awaitable[web.StreamResponse]]:
    """A middleware that reads a request's whole body (up to the app's size cap) within
    `limits.body_timeout` before the handler runs, or answers 408."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.body_exists:
            try:
                async with asyncio.timeout(limits.body_timeout):
                    await request.read()
            except TimeoutError:
                metrics.api_slow_bodies += 1
                raise web.HTTPRequestTimeout(
                    reason=f"the request body did not arrive within "
                    f"{limits.body_timeout:g}s: send it whole, at once") from None
        return await handler(request)

    return middleware


class _Refused(asyncio.Protocol):
    """A connection over the cap: a 503 that says when to try again, then the close."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        body = json.dumps({"error": {
            "code": "too_many_connections", "field": None,
            "message": "this master serves as many connections as it may: try again in a "
                       "second, or another master"}}).encode()
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json"
                        b"\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: "
                        + str(len(body)).encode() + b"\r\n\r\n" + body)
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(REFUSED_FOR, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # the request is not read


class _FirstHead(asyncio.Protocol):
    """A served connection that is closed unless its first request head (up to the blank
    line) arrives within `timeout` seconds; the rest is the wrapped handler's."""

    def __init__(self, handler: asyncio.Protocol, timeout: float) -> None:
        self.handler = handler
        self.timeout = timeout
        self.tail = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.timer = asyncio.get_running_loop().call_later(self.timeout, transport.close)
        self.handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.timer is not None:
            self.tail = self.tail[-3:] + data
            if b"\r\n\r\n" in self.tail or b"\n\n" in self.tail:  # (bare LFs too)
                self.timer.cancel()
                self.timer, self.tail = None, b""
            else:
                self.tail = self.tail[-3:]
        self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self.handler.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.handler.connection_lost(exc)

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()


class Served:
    """The API listening on one address (see the module docstring)."""

    def __init__(self, app: web.Application, limits: Limits, metrics: Metrics) -> None:
        self.limits = limits
        self.metrics = metrics
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0,
                                    keepalive_timeout=limits.header_timeout,
                                    lingering_time=LINGER)
        self.listener: asyncio.Server | None = None

    def _protocol(self) -> asyncio.BaseProtocol:
        server = self.runner.server
        assert server is not None
        if len(server.connections) >= self.limits.max_connections:
            self.metrics.api_connections_refused += 1
            return _Refused()
        return _FirstHead(server(), self.limits.header_timeout)

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> int:
        """Listen on `host`:`port` (0: any free port); the port listened on."""
        await self.runner.setup()
        server = self.runner.server
        assert server is not None
        self.metrics.connections = lambda: len(server.connections)
        self.listener = await asyncio.get_running_loop().create_server(
            self._protocol, host, port, ssl=tls, backlog=128)
        return int(self.listener.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening, end every connection (streams get 2 s), run the app's cleanup."""
        if self.listener is not None:
            self.listener.close()
        await self.runner.cleanup()
        if self.listener is not None:
            await self.listener.wait_closed()

