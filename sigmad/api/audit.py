"""The audit log: one entry per authenticated API call that may change something (every
method but GET and HEAD), whatever its result, written before the answer is sent.

Where it goes:
- `audit_log` of the master's config (optional): an append-only JSON-lines file, one line
  per entry, opened with O_APPEND (mode 600), so lines of two writers never interleave;
- etcd, under `audit/` (always): keys sort newest first, under a lease rotated every
  LEASE_ROTATE seconds, so entries expire AUDIT_TTL to AUDIT_TTL + LEASE_ROTATE after they
  were written (bounded retention). `GET /v1/audit` (admin) reads the newest.

Invariants:
- an entry never holds a token, only the token's id, name and role;
- writing an entry never fails the call it records: a failed write is logged (the file
  line, if configured, is written first and does not depend on etcd).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from sigmad import records
from sigmad.errors import SigmaError
from sigmad.store import Op, Store

log = logging.getLogger(__name__)
AUDIT_TTL = 7 * 24 * 3600  # seconds an entry is kept in etcd (at least)
LEASE_ROTATE = 3600
NEWEST = 10**19  # keys are NEWEST - time in ns: an ascending range reads newest first
MAX_READ = 1000  # entries one GET /v1/audit returns at most


@dataclass(slots=True)
class AuditEntry:
    time: float
    token: str  # the token's id ("bootstrap": the config's token)
    name: str
    role: str
    method: str
    path: str
    status: int
    apps: list[str] = field(default_factory=list)  # NAMESPACE/APP touched (or asked for)
    remote: str = ""


OnMain = Callable[[Coroutine[Any, Any, Any]], Awaitable[Any]]


class AuditLog:
    """Writes entries to the file (if any) and to etcd (on the store's loop, `on_main`)."""

    def __init__(self, store: Store, path: str, on_main: OnMain) -> None:
        self.store = store
        self.path = path
        self.main = on_main
        self.fd = -1
        self.lease = 0
        self.lease_at = 0.0
        self.tag = secrets.token_hex(3)  # tells two masters' entries of one instant apart

    async def record(self, entry: AuditEntry) -> None:
        """Write `entry` to the file, then to etcd; failures are logged, never raised."""
        line = records.dumps(entry) + b"\n"
        if self.path:
            try:
                if self.fd < 0:
                    self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                                      0o600)
                os.write(self.fd, line)
            except OSError as exc:
                log.error("audit: cannot append to %s (%s): %s", self.path, exc.strerror,
                          line.decode().rstrip())
        try:
            await self.main(self._put(entry))
        except SigmaError as exc:
            log.warning("audit: not written to etcd (%s): %s", exc.message,
                        line.decode().rstrip())

    async def _put(self, entry: AuditEntry) -> None:
        if not self.lease or time.monotonic() - self.lease_at > LEASE_ROTATE:
            self.lease = await self.store.grant(AUDIT_TTL + LEASE_ROTATE)
            self.lease_at = time.monotonic()
        key = f"{self.store.keys.audit()}{NEWEST - int(entry.time * 1e9):019d}-{self.tag}" \
              f"{secrets.token_hex(2)}"
        try:
            await self.store.commit([], [Op(key, entry, lease=self.lease)])
        except SigmaError:
            self.lease = 0  # (it may have expired: a fresh one next time)
            raise

    async def newest(self, limit: int) -> list[AuditEntry]:
        """The `limit` newest entries, newest first."""
        items, _ = await self.main(self.store.range_raw(self.store.keys.audit(),
                                                        limit=min(limit, MAX_READ)))
        return [records.loads(AuditEntry, i.value) for i in items]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
