"""The version of the records' layout under the prefix (`PREFIX/schema`), and whether a master
may lead over it.

Invariants:
- VERSION is the layout this code reads and writes. The first leader over a prefix without
  the key writes it (create-if-absent, through the leader's fenced store); a cluster from
  before the key holds version-1 records, so it gets 1.
- A master never leads over a newer version (it says why, stays a standby and looks again),
  nor while a restore is under way (the `restoring` marker, sigmad.backup): nothing acts on
  a half-written state.
- An older version is brought up to VERSION by the leader, one step at a time (MIGRATIONS),
  before its controller runs. Version 1 is the first: there is no step yet.
- Records of adjacent versions read each other: a reader ignores fields it does not know
  and gives fields it does not find their defaults (sigmad.records). A new field therefore
  needs a default that means "as before"; a change that cannot be read so bumps VERSION.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sigmad import records
from sigmad.errors import SigmaError
from sigmad.store import Guard, Op, Store

VERSION = 1
# version N → the step that rewrites version-N records as version N+1 (none yet)
MIGRATIONS: dict[int, Callable[[Store], Awaitable[None]]] = {}


@dataclass(slots=True)
class SchemaRecord:
    version: int
    by: str = ""  # the master that wrote it
    at: float = 0.0


class SchemaRefused(SigmaError):
    """This master may not lead over the records it finds."""

    code = "schema"
    status = 503


def refusal(found: int | None, restoring: bool, mine: int | None = None) -> str | None:
    """Why a master of version `mine` (VERSION) may not lead over `found` (None: absent),
    or None."""
    mine = VERSION if mine is None else mine
    if restoring:
        return ("a restore is under way (its 'restoring' key is present): run "
                "'sigmad restore FILE --force' to the end before starting masters")
    if found is not None and found > mine:
        return (f"the records are of schema version {found}, newer than this master's "
                f"{mine}: a newer master wrote them; run that version (upgrade this master)")
    return None


async def read(store: Store) -> tuple[int | None, bool]:
    """The schema version under the prefix (None: absent) and whether a restore is under way."""
    item = await store.get_raw(store.keys.schema())
    marker = await store.get_raw(store.keys.restoring())
    found = records.loads(SchemaRecord, item.value).version if item is not None else None
    return found, marker is not None


async def why_not_lead(store: Store) -> str | None:
    """The gate a master passes before each campaign (sigmad.leader.Elector)."""
    return refusal(*await read(store))


async def settle(store: Store, by: str) -> int:
    """As the new leader (`store` fenced): write VERSION where there is none, migrate an older
    version step by step; SchemaRefused over a newer one or a restore. The version now."""
    while True:
        item = await store.get_raw(store.keys.schema())
        found = records.loads(SchemaRecord, item.value).version if item is not None else None
        restoring = await store.get_raw(store.keys.restoring()) is not None
        if why := refusal(found, restoring):
            raise SchemaRefused(why)
        if found == VERSION:
            return VERSION
        if found is not None and found in MIGRATIONS:
            await MIGRATIONS[found](store)
        target = VERSION if found is None else found + 1
        guard = Guard(store.keys.schema(), item.mod_revision if item is not None else 0)
        await store.commit([guard], [Op(store.keys.schema(),
                                        SchemaRecord(target, by, time.time()))])
