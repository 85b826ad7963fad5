"""Backup and restore of every key under Sigma's etcd prefix (`GET /v1/backup`,
`sigmactl backup`, `sigmad restore`).

Invariants:
- a backup is one read of every key under the prefix at one etcd revision (paged, each page
  at that revision): a consistent cut, recorded with its revision;
- keys are kept relative to the prefix, so a backup restores under another prefix too;
- leased keys (heartbeats, usage, events, audit, leader, masters) are kept marked as leased and
  never restored: their leases belonged to processes of the old etcd, which grant new ones;
- a restore writes only into a prefix without unleased keys and without a running master's
  keys (forced: after deleting every key under it, which deposes a leader). It first creates
  the `restoring` marker (guarded: absent), then writes in transactions of at most
  MAX_TXN_OPS operations, deleting the marker in the last one. A crash leaves the marker:
  masters do not lead and agents remove nothing while it is there (sigmad.schema), and
  `sigmad restore --force` again finishes the job.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sigmad.errors import SigmaError
from sigmad.store import MAX_TXN_OPS, Guard, Op, Store

FORMAT = "sigma-backup"
VERSION = 1
Say = Callable[[str], None]


class BackupError(SigmaError):
    """A backup file that cannot be restored, or a prefix it may not be restored into."""

    code = "backup"
    status = 400


@dataclass(frozen=True)
class Entry:
    key: str  # relative to the prefix
    value: bytes
    leased: bool = False


@dataclass
class Backup:
    prefix: str  # the prefix it was taken under
    revision: int  # the etcd revision of the cut
    taken: float  # unix time
    entries: list[Entry] = field(default_factory=list)

    @property
    def leased(self) -> int:
        return sum(1 for e in self.entries if e.leased)

    def to_dict(self) -> dict[str, Any]:
        keys = []
        for e in self.entries:
            item: dict[str, Any] = {"key": e.key}
            try:
                item["value"] = e.value.decode("utf-8")
            except UnicodeDecodeError:
                item["b64"] = base64.b64encode(e.value).decode()
            if e.leased:
                item["leased"] = True
            keys.append(item)
        return {"format": FORMAT, "version": VERSION, "prefix": self.prefix,
                "revision": self.revision, "taken": self.taken, "count": len(keys),
                "leased": self.leased, "keys": keys}


def encode(backup: Backup) -> bytes:
    return json.dumps(backup.to_dict(), separators=(",", ":")).encode()


def decode(data: bytes) -> Backup:
    """A Backup from a file's bytes; BackupError naming what is wrong."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BackupError(f"not a sigma backup (not JSON: {exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BackupError(f"not a sigma backup (no \"format\": \"{FORMAT}\")")
    if doc.get("version") != VERSION:
        raise BackupError(f"backup format version {doc.get('version')!r}: this sigmad reads "
                          f"version {VERSION} only; restore it with the sigmad that took it")
    revision, keys = doc.get("revision"), doc.get("keys")
    if not isinstance(revision, int) or not isinstance(keys, list):
        raise BackupError("revision: must be a number, and keys a list")
    entries = []
    for n, item in enumerate(keys):
        key = item.get("key") if isinstance(item, dict) else None
        if not isinstance(key, str) or not key or key.startswith("/") or ".." in key.split("/"):
            raise BackupError(f"keys[{n}].key: must be a key relative to the prefix")
        if isinstance(item.get("value"), str):
            value = item["value"].encode("utf-8")
        elif isinstance(item.get("b64"), str):
            value = base64.b64decode(item["b64"])
        else:
            raise BackupError(f"keys[{n}]: needs a value (or b64)")
        entries.append(Entry(key, value, bool(item.get("leased"))))
    if doc.get("count") != len(entries):
        raise BackupError(f"count {doc.get('count')!r} but {len(entries)} keys: the file is "
                          "cut short or edited")
    return Backup(str(doc.get("prefix", "")), revision, float(doc.get("taken") or 0), entries)


async def take(store: Store) -> Backup:
    """Every key under the store's prefix, read at one revision."""
    root = store.keys.prefix + "/"
    items, revision = await store.range_raw(root)
    return Backup(store.keys.prefix, revision, time.time(),
                  [Entry(i.key.removeprefix(root), i.value, bool(i.lease)) for i in items])


def restore_ops(backup: Backup, prefix: str) -> list[Op]:
    """The puts of a restore under `prefix`: every unleased key, in the backup's order."""
    root = prefix.rstrip("/") + "/"
    return [Op(root + e.key, data=e.value) for e in backup.entries if not e.leased]


@dataclass
class Restored:
    written: int
    skipped: int  # leased keys left out
    deleted: int  # keys a forced restore deleted first


async def restore(store: Store, backup: Backup, force: bool = False,
                  say: Say | None = None) -> Restored:
    """Write `backup` under the store's prefix (see the module docstring)."""
    say = say or (lambda _: None)
    root = store.keys.prefix + "/"
    present, _ = await store.range_raw(root)
    unleased = [i.key for i in present if not i.lease]
    if unleased and not force:
        raise BackupError(
            f"{root} holds {len(unleased)} keys (e.g. {unleased[0]}): restore writes only "
            "into an empty prefix. Stop the masters and agents, then run it again with "
            "--force to delete them first", "force")
    masters = [i.key for i in present
               if i.key == store.keys.leader() or i.key.startswith(store.keys.masters())]
    if masters and not force:
        raise BackupError(
            f"a master runs ({masters[0]} is held): a leader would act on a half-restored "
            "state. Stop every master first (systemctl stop sigmad-master), or run it again "
            "with --force, which deletes its keys (a leader then stops leading)", "force")
    deleted = 0
    for start in range(0, len(present), MAX_TXN_OPS):
        gone = present[start:start + MAX_TXN_OPS]
        await store.commit([], [Op(i.key, delete=True) for i in gone])
        deleted += len(gone)
        say(f"deleted {deleted}/{len(present)} keys under {root}")
    marker = store.keys.restoring()
    started = {"revision": backup.revision, "taken": backup.taken, "started": time.time()}
    if not await store.commit([Guard(marker, 0)], [Op(marker, started)]):
        raise BackupError(f"{marker} exists: another restore is under way")
    ops = restore_ops(backup, store.keys.prefix)
    step = MAX_TXN_OPS - 1  # room for the marker's delete in the last one
    written = 0
    for start in range(0, max(len(ops), 1), step):
        part = ops[start:start + step]
        last = start + step >= len(ops)
        await store.commit([], [*part, *([Op(marker, delete=True)] if last else [])])
        written += len(part)
        say(f"restored {written}/{len(ops)} keys")
    return Restored(written, backup.leased, deleted)
