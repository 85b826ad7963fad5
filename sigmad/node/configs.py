"""The agent's config delivery: every instance placed on this node (or moving to it) gets the
config versions it pins (`Instance.configs`) as files under the node's config root, and the
agent says what it has in place (`config-held/{node}/{ns}/{app}-{index}`, sigmad.configs).
The master's Runner (sigmad.control.drive) reads that: it starts an instance only once its
versions are in place, and runs `on_change` (signal or new containers) when they move.

Layout of one config of one instance (`delivered_dir`), as Kubernetes lays out a volume:

    {root}/{ns}/{app}-{index}/{config}/
        ..v7.<ns>/          the files of version 7 (a fresh directory per delivery)
        ..data -> ..v7.<ns> the version in place
        app.conf -> ..data/app.conf   one link per file

Invariants:
- a delivery never changes a file in place: the new version's files are written (and
  fsynced) into a new directory, then `..data` is swapped by rename(2) of a new link over
  it, which is atomic: a reader through the bound directory sees every file of the old
  version or every file of the new one, never a half-written file or a mix;
- containers bind the config's directory (read-only), never a file in it, so the swap is
  seen inside them (a file bind, like Kubernetes' subPath, would keep the old inode);
- what is on disk is checked against the version's sha256 (sigmad.configs.checksum) the
  first time the agent delivers it after a start: a restarted agent rebuilds whatever is
  missing, partial or stale from etcd, and keeps what is right (no swap, no on_change);
- `config-held` is written only after the swap, and removed (with the directory) when the
  instance leaves the node;
- every loop is bounded: a failure is retried after a back-off of at most MAX_BACKOFF s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from pathlib import Path

from sigmad import records
from sigmad.configs import ConfigsHeld, ConfigVersion, checksum, delivered_dir
from sigmad.errors import SigmaError
from sigmad.models import Instance, now
from sigmad.store import Store, WatchCompacted

log = logging.getLogger(__name__)
DATA = "..data"
MAX_BACKOFF = 5.0


def _version_of(target: str) -> int:
    """The version number of a `..vN.<ns>` directory name (0 if it is not one)."""
    head = target.removeprefix("..v").partition(".")[0]
    return int(head) if target.startswith("..v") and head.isdigit() else 0


def on_disk(directory: Path) -> tuple[int, dict[str, str]]:
    """(version, files) of the version in place in `directory` ((0, {}) if none)."""
    try:
        target = os.readlink(directory / DATA)
    except OSError:
        return 0, {}
    files: dict[str, str] = {}
    try:
        for entry in (directory / target).iterdir():
            files[entry.name] = entry.read_text(encoding="utf-8")
    except (OSError, UnicodeError):
        return 0, {}
    return _version_of(target), files


def install(directory: Path, version: ConfigVersion) -> bool:
    """Put `version` in place in `directory` (see the module docstring); False if it was
    in place already (same number, same checksum), True if it was swapped in."""
    directory.mkdir(parents=True, exist_ok=True)
    number, files = on_disk(directory)
    if number == version.version and checksum(files) == version.sha256:
        _link_files(directory, version.files)
        _drop_others(directory, os.readlink(directory / DATA))
        return False
    fresh = directory / f"..v{version.version}.{time.time_ns()}"
    fresh.mkdir()
    for name, text in version.files.items():
        with open(fresh / name, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(fresh / name, 0o644)
    os.chmod(fresh, 0o755)
    link = directory / "..data_tmp"
    link.unlink(missing_ok=True)
    os.symlink(fresh.name, link)
    os.rename(link, directory / DATA)  # the swap: atomic
    _link_files(directory, version.files)
    _drop_others(directory, fresh.name)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _drop_others(directory: Path, keep: str) -> None:
    """Remove the version directories other than `keep` (older ones, or one a killed agent
    left half-written)."""
    for entry in directory.iterdir():
        if entry.name.startswith("..v") and entry.name != keep:
            shutil.rmtree(entry, ignore_errors=True)


def _link_files(directory: Path, files: dict[str, str]) -> None:
    """One `NAME -> ..data/NAME` link per file of the version; links of files it does not
    have are removed (they would dangle)."""
    for name in files:
        path = directory / name
        if os.path.islink(path) and os.readlink(path) == f"{DATA}/{name}":
            continue
        tmp = directory / f"..link.{name}"
        tmp.unlink(missing_ok=True)
        os.symlink(f"{DATA}/{name}", tmp)
        os.rename(tmp, path)
    for entry in directory.iterdir():
        if not entry.name.startswith("..") and entry.name not in files and entry.is_symlink():
            entry.unlink()


class ConfigKeeper:
    """Delivers the configs of this node's instances (see the module docstring)."""

    def __init__(self, node: str, root: str, store: Store) -> None:
        self.node = node
        self.root = root
        self.store = store
        self.keys = store.keys
        self.instances: dict[str, Instance] = {}  # record key → instance (every node's)
        self.placed: dict[tuple[str, str], int] = {}  # (instance, config) → version in place
        self.reported: dict[str, dict[str, int]] = {}  # instance → versions said held
        self.versions: dict[tuple[str, str, int], ConfigVersion] = {}

    async def run(self) -> None:
        """Follow the instance records (list, then watch), delivering after each change;
        relist after a failure or a compaction."""
        delay = 0.5
        while True:
            try:
                await self._follow()
            except (SigmaError, WatchCompacted, OSError) as exc:
                log.warning("config delivery: %s; again in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)

    async def _follow(self) -> None:
        found, revision = await self.store.scan(self.keys.instances(), Instance)
        self.instances = {v.key: v.value for v in found}
        await self.sync(first=True)
        async for batch in self.store.watch_batches(self.keys.instances(), revision + 1):
            for event in batch.events:
                if event.value is None:
                    self.instances.pop(event.key, None)
                else:
                    self.instances[event.key] = records.loads(Instance, event.value)
            if batch.events:
                await self.sync()

    def wanted(self) -> dict[str, Instance]:
        """`ns/app-index` → instance, for those on this node (or moving here) that pin
        configs."""
        return {i.key: i for i in self.instances.values()
                if i.configs and self.node in (i.node, i.next_node)}

    async def sync(self, first: bool = False) -> None:
        """Deliver what is wanted and missing, say what is held, remove what left."""
        wanted = self.wanted()
        for key, inst in wanted.items():
            held = {}
            for name, number in sorted(inst.configs.items()):
                if self.placed.get((key, name)) != number and \
                        not await self._deliver(inst, name, number):
                    continue
                held[name] = number
            if held != self.reported.get(key):
                await self.store.put(self.keys.config_held(self.node, key),
                                     ConfigsHeld(key, self.node, held, now()))
                self.reported[key] = held
        gone = [k for k in self.reported if k not in wanted]
        if first:
            held_keys = await self.store.keys_under(self.keys.configs_held(self.node))
            prefix = self.keys.configs_held(self.node)
            gone += [k.removeprefix(prefix) for k in held_keys
                     if k.removeprefix(prefix) not in wanted]
            gone += await asyncio.to_thread(self._dirs_not, set(wanted))
        for key in sorted(set(gone)):
            await self.store.delete(self.keys.config_held(self.node, key))
            self.reported.pop(key, None)
            for pair in [p for p in self.placed if p[0] == key]:
                del self.placed[pair]
            ns, _, name = key.partition("/")
            await asyncio.to_thread(shutil.rmtree, Path(self.root, ns, name), True)
        pinned = {(i.namespace, n, v) for i in wanted.values() for n, v in i.configs.items()}
        for stale in [k for k in self.versions if k not in pinned]:
            del self.versions[stale]

    def _dirs_not(self, wanted: set[str]) -> list[str]:
        """Instances (`ns/app-index`) with a directory under the root but not `wanted`."""
        root = Path(self.root)
        if not root.is_dir():
            return []
        return [f"{ns.name}/{inst.name}" for ns in root.iterdir() if ns.is_dir()
                for inst in ns.iterdir() if f"{ns.name}/{inst.name}" not in wanted]

    async def _deliver(self, inst: Instance, name: str, number: int) -> bool:
        """Put version `number` of config `name` in place for `inst`; False if that version
        cannot be read (it is tried again on the next change or relist)."""
        ref = (inst.namespace, name, number)
        version = self.versions.get(ref)
        if version is None:
            v = await self.store.get(self.keys.config_version(*ref), ConfigVersion)
            if v is None:
                log.warning("%s pins config %s/%s v%d, which etcd does not hold", inst.key,
                            inst.namespace, name, number)
                return False
            version = self.versions[ref] = v.value
        path = Path(delivered_dir(self.root, inst.namespace, inst.name, name))
        swapped = await asyncio.to_thread(install, path, version)
        self.placed[(inst.key, name)] = number
        log.info("config %s/%s v%d %s for %s", inst.namespace, name, number,
                 "delivered" if swapped else "already in place", inst.key)
        return True
