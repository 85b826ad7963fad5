"""The agent's host-compatible fast path (README "Host-compatible networking"): each running
host-compatible instance of this host reached at the host's address and its host ports
through tc redirects, around the host's netfilter, routing and bridge
(sigmad.network.overlay.FastPath does the netlink work).

Invariants:
- the engine is the truth: the instances are the running containers carrying the
  `sigma.host-ports` label (sigmad.engine.LABEL_HOST_PORTS), listed every POLL seconds;
- the kernel is read back at start and every RESYNC seconds, or at once when the set of
  instances changes or one's veth is gone (its container restarted in a new namespace), so a
  restarted agent only fills in what is missing and removes what belongs to no instance;
- Docker's own publishing of the same ports stays underneath: an instance is reachable at
  its host port (more slowly) before the fast path exists and after it is removed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from sigmad.engine import LABEL_HOST_PORTS, Engine
from sigmad.errors import SigmaError
from sigmad.network.overlay import FastInstance, FastPath, OverlayError

log = logging.getLogger(__name__)
POLL = 2.0  # seconds between two lists of the engine's containers
RESYNC = 10.0  # seconds between full syncs, read back from the kernel


def parse_ports(label: str) -> tuple[tuple[int, str], ...]:
    """"32400/tcp,32401/udp" → ((32400, "tcp"), (32401, "udp")); a malformed item is left
    out."""
    ports = []
    for item in label.split(","):
        port, _, protocol = item.partition("/")
        if port.isdigit() and protocol in ("tcp", "udp"):
            ports.append((int(port), protocol))
    return tuple(ports)


class FastPathKeeper:
    """Keeps this host's fast path in line with its running host-compatible containers."""

    def __init__(self, address: str, engine: Engine) -> None:
        self.engine = engine
        self.path = FastPath(address)
        self.pids: dict[str, int] = {}  # container id → its main process, as last inspected

    async def wanted(self) -> list[FastInstance]:
        """The running host-compatible containers of this engine."""
        found = []
        listed = await self.engine.containers({LABEL_HOST_PORTS: ""})
        running = {c.id for c in listed if c.running}
        self.pids = {cid: pid for cid, pid in self.pids.items() if cid in running}
        for c in listed:
            if not c.running:
                continue
            if c.id not in self.pids or not os.path.exists(f"/proc/{self.pids[c.id]}"):
                state = await self.engine.inspect(c.id)
                if state is None or not state.running or not state.pid:
                    continue
                self.pids[c.id] = state.pid
            found.append(FastInstance(c.id, self.pids[c.id],
                                      parse_ports(c.labels.get(LABEL_HOST_PORTS, ""))))
        return sorted(found, key=lambda i: i.container)

    async def run(self) -> None:
        """Until cancelled: sync when the instances change, a veth is gone, or every RESYNC
        seconds."""
        last: list[FastInstance] | None = None
        full_at = 0.0
        while True:
            try:
                wanted = await self.wanted()
                missing = any(not os.path.exists(f"/sys/class/net/{i.device}") for i in wanted)
                if wanted != last or missing or time.monotonic() >= full_at:
                    if missing:  # a container restarted: its process (and netns) is new
                        self.pids.clear()
                        wanted = await self.wanted()
                    done = await asyncio.to_thread(self.path.sync, wanted)
                    if done.added or done.removed:
                        log.info("host-compat fast path: %d added, %d removed (%d instances)",
                                 done.added, done.removed, len(wanted))
                    last, full_at = wanted, time.monotonic() + RESYNC
            except (SigmaError, OverlayError, OSError) as exc:
                log.warning("host-compat fast path: %s; retrying", exc)
                last = None
            await asyncio.sleep(POLL)
