"""Server-sent event streams (`text/event-stream`), as GET /v1/events?watch=true serves them.

Invariants:
- a stream that has nothing to send sends a heartbeat (a comment line, which clients skip)
  every `heartbeat` seconds, so a client that is gone is noticed within one heartbeat (its
  connection is closed, or the write fails), and the stream and what feeds it are released;
- a write that the client does not read within STALL seconds ends the stream (a client that
  stopped reading never holds the server's memory);
- at most `backlog` messages wait for one client: one too slow to keep up loses the excess;
- `Metrics.api_streams_open` counts the streams being served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from aiohttp import web

from sigmad.metrics import Metrics

log = logging.getLogger(__name__)
HEARTBEAT = b": keep-alive\n\n"
STALL = 30.0  # seconds a write may wait for the client to read
_END = b""


def message(data: bytes) -> bytes:
    """One event whose data is `data` (JSON: one line)."""
    return b"data: " + data + b"\n\n"


def comment(text: str) -> bytes:
    """A comment line: clients skip it (a heartbeat, or why the server ends a stream)."""
    return f": {text}\n\n".encode()


class Stream:
    """One client's stream: messages may be offered from any thread; `serve` sends them."""

    def __init__(self, backlog: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(backlog)
        self.why = ""

    def offer(self, data: bytes) -> None:
        """Queue `message(data)` (from any thread)."""
        self.loop.call_soon_threadsafe(self._put, message(data))

    def end(self, why: str) -> None:
        """End the stream once what is queued is sent, saying `why` (from any thread)."""
        self.why = why
        self.loop.call_soon_threadsafe(self._put, _END)

    def _put(self, item: bytes) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(item)

    async def serve(self, request: web.Request, first: Iterable[bytes], heartbeat: float,
                    metrics: Metrics) -> web.StreamResponse:
        """Send `first`, then each offered message, with heartbeats while idle, until the
        client goes or `end` is called."""
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        response.force_close()  # a stream ends its connection: it is never reused
        await response.prepare(request)
        metrics.api_streams_open += 1
        try:
            for part in first:
                await self._write(response, part)
            while not _gone(request):
                try:
                    item = await asyncio.wait_for(self.queue.get(), heartbeat)
                except TimeoutError:
                    item = HEARTBEAT
                if item == _END:
                    await self._write(response, comment(self.why))
                    await response.write_eof()
                    break
                await self._write(response, item)
        except (ConnectionError, TimeoutError) as exc:
            log.debug("event stream to %s ended: %s", request.remote, exc)
            if request.transport is not None:
                request.transport.close()
        finally:
            metrics.api_streams_open -= 1
            metrics.api_streams_closed += 1
        return response

    @staticmethod
    async def _write(response: web.StreamResponse, data: bytes) -> None:
        async with asyncio.timeout(STALL):
            await response.write(data)


def _gone(request: web.Request) -> bool:
    """Whether the client's connection is closed (or closing)."""
    return request.transport is None or request.transport.is_closing()
