"""The node's SSDs: the allow-listed disks, formatted, mounted and reported (DESIGN.md §2, §6).

The agent keeps one record per disk of its config's `ssds` at `ssds/{node}/{id}`; the master
claims a `ready` disk for an instance at `alloc/ssd/{node}/{id}`, in the placement's
transaction, guarding the disk record's revision. `step` decides what to do with one disk
(a pure function); `DiskKeeper` does it through `Host`, the one seam to the kernel.

Invariants:
- only a path of the config's allow-list is ever formatted, and only while its record says
  free, formatting or wiping (never bound, retained, ready or broken): a record that says
  bound keeps its data across agent restarts and reboots;
- a claimed disk is `bound` while its owner's record places it here on it, else `retained`
  (its owner moved away or is gone, and the claim stays: `reclaim: retain`, a lost node);
  only the claim's deletion (delete of a `wipe` volume, `sigmactl ssd release`) wipes it;
- a disk leaves `ready` (to be formatted again) only in a transaction guarding that no claim
  exists and that its record is unchanged, and the master claims only a `ready` disk whose
  record revision it guards: a disk is never claimed while it is being formatted;
- a disk released before its agent saw the claim (its record still `ready`: claimed and
  released between two passes) is marked `wiping` by the release itself
  (sigmad.state.writes.Writes.wipe_unseen), so it is wiped like any other;
- a released disk (bound, its claim gone) is wiped — a fresh filesystem with a new UUID and an
  empty data directory, checked — before it is `ready` again: no tenant sees another's data;
- a disk whose device vanished, or whose I/O fails, is `broken` (with the error) and stays so
  until an operator acts: nothing is formatted or claimed on it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import subprocess
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from sigmad.errors import SigmaError
from sigmad.models import (
    SSD_BOUND,
    SSD_BROKEN,
    SSD_FORMATTING,
    SSD_FREE,
    SSD_READY,
    SSD_RETAINED,
    SSD_WIPING,
    Instance,
    Ssd,
    SsdClaim,
    now,
    split_name,
)
from sigmad.store import Guard, Op, Store, Versioned

log = logging.getLogger(__name__)

MOUNT_OPTIONS = "nodev,nosuid,noatime"
DATA = "data"  # the directory of a disk's filesystem that instances see (its root holds
# lost+found and the agent's health probe)
PROBE = ".sigma-probe"
FS_LABEL = "sigma-ssd"
CHECK_INTERVAL = 5.0  # seconds between two checks of every disk
COMMAND_TIMEOUT = 300.0  # seconds a mkfs, mount or umount may take
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")

# What `step` asks for.
RECORD, FORMAT, MOUNT, BREAK, NOTHING = "record", "format", "mount", "break", "nothing"


def disk_id(path: str) -> str:
    """The disk's id in keys: its allow-listed path's last part, made key-safe
    (/dev/disk/by-id/nvme-X_1 → nvme-X_1, /dev/loop3 → loop3)."""
    return _ID_UNSAFE.sub("_", path.rstrip("/").rpartition("/")[2]) or "disk"


def mount_point(data_dir: str, disk: str) -> str:
    return f"{data_dir}/ssds/{disk}"


def data_path(mount: str) -> str:
    """The directory bind-mounted into an instance's containers."""
    return f"{mount}/{DATA}"


@dataclass(frozen=True)
class Probe:
    """What the host says about one allow-listed device right now."""

    device: str  # the real block device (/dev/loop3)
    size: int  # bytes
    rotational: bool
    fs_uuid: str = ""  # the filesystem on it ("" none)
    mounted: bool = False  # whether it is mounted at its mount point
    error: str = ""  # an I/O error of its health check ("" healthy or not mounted)


@dataclass(frozen=True)
class Step:
    """What to do with one disk: `action`, and the record to write (RECORD, BREAK) or the
    state it goes through (FORMAT: `record` says formatting or wiping)."""

    action: str
    record: Ssd | None = None
    why: str = ""


def step(path: str, node: str, mount: str, record: Ssd | None, probe: Probe | None,
         claim: str | None, in_use: bool = True) -> Step:
    """The next thing to do with the allow-listed disk `path`, from its record (None: never
    seen), what the host says (`probe` None: the device is gone), its claim's owner (None:
    unclaimed) and whether that owner's record places it here on this disk (`in_use`; a
    claimed disk not in use is retained: its owner moved away or is gone)."""
    disk = disk_id(path)
    base = record or Ssd(node=node, id=disk, path=path)
    if record is not None and record.state == SSD_BROKEN:
        return Step(NOTHING)  # until an operator acts (`sigmactl ssd uncordon`)
    if probe is None:
        return Step(BREAK, _with(base, state=SSD_BROKEN, error=f"device {path} vanished"),
                    "vanished")
    if probe.error:
        return Step(BREAK, _with(base, state=SSD_BROKEN, error=probe.error), "I/O error")
    facts = _with(base, size=probe.size, rotational=probe.rotational)
    if record is None:
        return Step(RECORD, _with(facts, state=SSD_FREE), "found")
    state = record.state
    if state in (SSD_FREE, SSD_FORMATTING, SSD_WIPING):
        going = SSD_WIPING if state == SSD_WIPING else SSD_FORMATTING
        return Step(FORMAT, _with(facts, state=going, mount="", owner=""), "format")
    held = SSD_BOUND if in_use else SSD_RETAINED
    if state in (SSD_READY, SSD_BOUND, SSD_RETAINED) and claim is not None and \
            (state, record.owner) != (held, claim):
        return Step(RECORD, _with(facts, state=held, owner=claim, mount=mount),
                    "claimed" if in_use else "retained")
    if state in (SSD_BOUND, SSD_RETAINED) and claim is None:
        return Step(FORMAT, _with(facts, state=SSD_WIPING, mount="", owner=""), "released")
    if state in (SSD_READY, SSD_BOUND, SSD_RETAINED) and probe.fs_uuid != record.fs_uuid:
        return Step(BREAK, _with(facts, state=SSD_BROKEN, error=(
            f"its filesystem {probe.fs_uuid or 'is gone'}, not {record.fs_uuid}: replaced "
            "or formatted outside sigma")), "filesystem changed")
    if state in (SSD_READY, SSD_BOUND, SSD_RETAINED) and not probe.mounted:
        return Step(MOUNT, _with(facts, mount=mount), "not mounted")
    if (facts.size, facts.rotational) != (record.size, record.rotational):
        return Step(RECORD, facts, "size changed")
    return Step(NOTHING)


def _with(record: Ssd, **changes: object) -> Ssd:
    return replace(record, **changes, updated=now())  # type: ignore[arg-type]


class Host(Protocol):
    """The kernel side of the disks (unit tests replace it)."""

    async def probe(self, path: str, mount: str) -> Probe | None: ...
    async def format(self, device: str) -> str: ...  # mkfs; the new filesystem's UUID
    async def mount(self, device: str, mount: str) -> None: ...
    async def unmount(self, mount: str) -> None: ...
    async def check_fresh(self, device: str, mount: str, fs_uuid: str) -> str: ...


class DiskError(Exception):
    """A host command on a disk failed (its message says which and why)."""


class DiskBusy(DiskError):
    """The device is in use (mounted, possibly only inside a container that still holds a
    bind of it): it is not formatted now, and is tried again on the next pass."""


class DiskKeeper:
    """Keeps the records of the node's allow-listed disks true and their filesystems ready."""

    def __init__(self, node: str, data_dir: str, paths: list[str], store: Store,
                 host: Host) -> None:
        self.node, self.data_dir, self.paths = node, data_dir, list(paths)
        self.store, self.host = store, host

    async def sync(self) -> None:
        """One pass over every disk: each moves at most one step (a format is one step)."""
        keys = self.store.keys
        records = {v.value.id: v for v in (await self.store.scan(keys.ssds(self.node), Ssd))[0]}
        claims = {v.key.rpartition("/")[2]: v.value.owner
                  for v in (await self.store.scan(keys.ssd_claims(self.node), SsdClaim))[0]}
        for path in self.paths:
            disk = disk_id(path)
            owner = claims.get(disk)
            try:
                await self.sync_one(path, records.get(disk), owner,
                                    await self._in_use(disk, owner) if owner else False)
            except DiskError as exc:
                log.warning("ssd %s: %s", path, exc)

    async def _in_use(self, disk: str, owner: str) -> bool:
        """Whether instance `owner` (`ns/app-i`) is placed on this node with this disk."""
        ns, _, name = owner.partition("/")
        parts = split_name(name)
        if parts is None:
            return False
        found = await self.store.get(self.store.keys.instance(ns, *parts), Instance)
        return found is not None and found.value.node == self.node and \
            any(d.disk == disk for d in found.value.ssds)

    async def sync_one(self, path: str, current: Versioned[Ssd] | None,
                       claim: str | None, in_use: bool = True) -> None:
        disk = disk_id(path)
        mount = mount_point(self.data_dir, disk)
        probe = await self.host.probe(path, mount)
        todo = step(path, self.node, mount, current.value if current else None, probe, claim,
                    in_use)
        if todo.action == NOTHING:
            return
        log.info("ssd %s (%s): %s → %s", disk, path, todo.why, todo.action)
        assert todo.record is not None
        if todo.action in (RECORD, BREAK):
            await self._write(current, todo.record)
        elif todo.action == MOUNT:
            assert probe is not None
            await self.host.mount(probe.device, mount)
        elif todo.action == FORMAT:
            assert probe is not None
            await self._format(current, todo.record, probe, mount)

    async def _write(self, current: Versioned[Ssd] | None, record: Ssd,
                     unclaimed: bool = False) -> int:
        """Write the disk's record if it did not change since read (and, with `unclaimed`,
        if no claim exists): its new revision, or 0."""
        key = self.store.keys.ssd(self.node, record.id)
        guards = [Guard(key, current.mod_revision if current else 0)]
        if unclaimed:
            guards.append(Guard(self.store.keys.ssd_claim(self.node, record.id), 0))
        return await self.store.commit(guards, [Op(key, record)])

    async def _format(self, current: Versioned[Ssd] | None, going: Ssd, probe: Probe,
                      mount: str) -> None:
        """Format (or wipe) the disk, check the result, and make it ready; broken if the
        check fails. First recorded as formatting/wiping, guarded against a claim."""
        revision = await self._write(current, going, unclaimed=True)
        if not revision:
            return  # claimed or changed meanwhile: the next pass sees it
        at = Versioned(self.store.keys.ssd(self.node, going.id), going, revision)
        if probe.mounted:
            try:
                await self.host.unmount(mount)
            except DiskError as exc:  # busy (a container still holds it): the next pass
                log.warning("ssd %s: %s; retrying", going.id, exc)
                return
        try:
            fs_uuid = await self.host.format(probe.device)
        except DiskBusy as exc:  # e.g. a stale container of its last owner: the next pass
            log.warning("ssd %s: %s; retrying", going.id, exc)
            if going.error != str(exc):
                await self._write(at, _with(going, error=str(exc)))
            return
        except DiskError as exc:
            await self._write(at, _with(going, state=SSD_BROKEN, error=str(exc)))
            return
        try:
            await self.host.mount(probe.device, mount)
            problem = await self.host.check_fresh(probe.device, mount, fs_uuid)
            if fs_uuid == probe.fs_uuid:
                problem = f"the new filesystem kept the old UUID {fs_uuid}"
        except DiskError as exc:
            problem = str(exc)
        if problem:
            await self._write(at, _with(going, state=SSD_BROKEN, error=problem))
            return
        await self._write(at, _with(going, state=SSD_READY, mount=mount, fs_uuid=fs_uuid,
                                    error=""))

    async def run(self, interval: float = CHECK_INTERVAL) -> None:
        """Sync every `interval` seconds until cancelled."""
        while True:
            try:
                await self.sync()
            except SigmaError as exc:  # etcd out of reach: the next pass
                log.warning("ssd pass failed: %s", exc.message)
            await asyncio.sleep(interval)

    async def capacity(self) -> tuple[int, int]:
        """How many disks the node lists and the summed size of those present."""
        probes = [await self.host.probe(p, mount_point(self.data_dir, disk_id(p)))
                  for p in self.paths]
        return len(self.paths), sum(p.size for p in probes if p is not None)


class LinuxHost:
    """`Host` on Linux: /sys/class/block, blkid, mkfs.ext4, mount."""

    async def probe(self, path: str, mount: str) -> Probe | None:
        return await asyncio.to_thread(_probe, path, mount)

    async def format(self, device: str) -> str:
        # mkfs discards the whole device first (TRIM on an SSD, holes in a loop device's
        # file), so no block of an earlier tenant stays readable; one already mounted
        # anywhere is refused (a single -F does not override that), and said busy here.
        await asyncio.to_thread(_exclusive, device)
        fs_uuid = str(uuid.uuid4())
        await _run("mkfs.ext4", "-F", "-q", "-L", FS_LABEL, "-U", fs_uuid, device)
        return fs_uuid

    async def mount(self, device: str, mount: str) -> None:
        await asyncio.to_thread(os.makedirs, mount, 0o700, True)
        await _run("mount", "-t", "ext4", "-o", MOUNT_OPTIONS, device, mount)
        await asyncio.to_thread(os.makedirs, data_path(mount), 0o755, True)

    async def unmount(self, mount: str) -> None:
        await _run("umount", mount)

    async def check_fresh(self, device: str, mount: str, fs_uuid: str) -> str:
        return await asyncio.to_thread(_check_fresh, device, mount, fs_uuid)


async def _run(*argv: str) -> None:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as exc:
        raise DiskError(f"cannot run {argv[0]}: {exc.strerror}") from None
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise DiskError(f"{' '.join(argv)} took over {COMMAND_TIMEOUT:.0f} s") from None
    if proc.returncode:
        text = out.decode(errors="replace").strip().splitlines()
        raise DiskError(f"{' '.join(argv)} failed ({proc.returncode}): "
                        f"{text[-1] if text else 'no output'}")


def _exclusive(device: str) -> None:
    """DiskBusy unless `device` can be opened exclusively (nothing mounts or holds it)."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise DiskBusy(f"{device} is in use (mounted elsewhere, or still held by a "
                           "container of its last owner)") from None
        raise DiskError(f"cannot open {device}: {exc.strerror}") from None
    os.close(fd)


def _block(device: str) -> Path:
    return Path("/sys/class/block") / Path(device).name


def _probe(path: str, mount: str) -> Probe | None:
    """The device behind `path` now; None if it is gone (a detached loop device has size 0)."""
    try:
        device = os.path.realpath(path, strict=True)
        sectors = int((_block(device) / "size").read_text())
    except (OSError, ValueError):
        return None
    if sectors == 0:
        return None
    sys = _block(device)
    rotational_file = sys / "queue" / "rotational"
    if not rotational_file.exists():  # a partition: its disk's queue
        rotational_file = sys.resolve().parent / "queue" / "rotational"
    try:
        rotational = rotational_file.read_text().strip() == "1"
    except OSError:
        rotational = False
    mounted = _mounted_device(mount)
    same = mounted is not None and os.path.realpath(mounted) == device
    return Probe(device=device, size=sectors * 512, rotational=rotational,
                 fs_uuid=_fs_uuid(device), mounted=same,
                 error=_health(device, mount) if same else "")


def _mounted_device(mount: str) -> str | None:
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[1] == mount:
            return parts[0]
    return None


def _fs_uuid(device: str) -> str:
    try:
        out = subprocess.run(["blkid", "-p", "-s", "UUID", "-o", "value", device],
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()


def _health(device: str, mount: str) -> str:
    """"" if a small write, fsync and read-back on the mounted disk work and ext4 counted no
    error; else what failed."""
    errors = Path("/sys/fs/ext4") / Path(device).name / "errors_count"
    try:
        if errors.exists() and int(errors.read_text() or 0) > 0:
            return f"ext4 reports {int(errors.read_text())} error(s) on {device}"
        probe = Path(mount) / PROBE
        with open(probe, "wb") as f:
            f.write(b"sigma")
            f.flush()
            os.fsync(f.fileno())
        if probe.read_bytes() != b"sigma":
            return f"a write to {device} did not read back"
    except OSError as exc:
        return f"I/O on {device} failed: {exc.strerror or exc}"
    except ValueError:
        return ""
    return ""


def _check_fresh(device: str, mount: str, fs_uuid: str) -> str:
    """"" if `device` carries the filesystem `fs_uuid`, mounted at `mount`, with an empty
    data directory; else what is wrong."""
    found = _fs_uuid(device)
    if found != fs_uuid:
        return f"after mkfs {device} has filesystem {found or 'none'}, not {fs_uuid}"
    mounted = _mounted_device(mount)
    if mounted is None or os.path.realpath(mounted) != device:
        return f"{device} is not mounted at {mount} after mkfs"
    try:
        left = os.listdir(data_path(mount))
    except OSError as exc:
        return f"cannot read {data_path(mount)}: {exc.strerror}"
    return f"{data_path(mount)} is not empty after mkfs: {left[:3]}" if left else ""
