"""The node's SSD keeper on real loop devices, real ext4 and a real etcd (sigmad/node/disks.py).

Each test makes its own sparse files and loop devices and detaches them at the end.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sigmad.models import SSD_BOUND, SSD_BROKEN, SSD_READY, BoundSsd, Instance, Ssd, SsdClaim
from sigmad.node.disks import DATA, DiskKeeper, LinuxHost, disk_id
from sigmad.procs import EtcdProcess
from sigmad.store import EtcdStore

SIZE = 64 << 20


class Loop:
    """A sparse file behind a loop device."""

    def __init__(self, root: Path) -> None:
        self.file = root / f"disk-{uuid.uuid4().hex[:8]}.img"
        with open(self.file, "wb") as f:
            f.truncate(SIZE)
        self.device = subprocess.run(["losetup", "-f", "--show", str(self.file)], check=True,
                                     capture_output=True, text=True).stdout.strip()

    def vanish(self) -> None:
        """The disk is gone while mounted: its size drops to 0 (a mounted loop device cannot
        be detached at once, the kernel defers it)."""
        with open(self.file, "wb") as f:
            f.truncate(0)
        subprocess.run(["losetup", "-c", self.device], check=True)


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[list[Loop]]:
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    made = [Loop(tmp_path), Loop(tmp_path)]
    yield made
    for mount in (tmp_path / "data" / "ssds").glob("*"):
        subprocess.run(["umount", "-l", str(mount)], check=False)
    for loop in made:
        subprocess.run(["losetup", "-d", loop.device], check=False)


@pytest.fixture
async def store(etcd: EtcdProcess) -> AsyncIterator[EtcdStore]:
    s = EtcdStore([etcd.endpoint], f"/disks-{uuid.uuid4().hex[:8]}")
    yield s
    await s.close()


def mounts() -> dict[str, tuple[str, str, str]]:
    """Mount point → (device, type, options) from the kernel."""
    found = {}
    for line in Path("/proc/self/mounts").read_text().splitlines():
        dev, where, kind, options, *_ = line.split()
        found[where] = (dev, kind, options)
    return found


async def test_format_bind_restart_and_wipe_on_real_disks(
        loops: list[Loop], store: EtcdStore, tmp_path: Path) -> None:
    data_dir = str(tmp_path / "data")
    keeper = DiskKeeper("h1", data_dir, [loops[0].device, loops[1].device], store, LinuxHost())
    for _ in range(2):
        await keeper.sync()
    records = {v.value.id: v.value for v in (await store.scan(store.keys.ssds("h1"), Ssd))[0]}
    assert set(records) == {disk_id(loops[0].device), disk_id(loops[1].device)}
    first = records[disk_id(loops[0].device)]
    assert first.state == SSD_READY and first.size == SIZE and first.fs_uuid
    dev, kind, options = mounts()[first.mount]
    assert (dev, kind) == (loops[0].device, "ext4")
    assert {"nodev", "nosuid"} <= set(options.split(","))
    assert await keeper.capacity() == (2, 2 * SIZE)

    claim = store.keys.ssd_claim("h1", first.id)
    assert await store.create(claim, SsdClaim("default/db-0"))
    await store.put(store.keys.instance("default", "db", 0), Instance(
        "default", "db", 0, 1, node="h1", ssds=[BoundSsd("data", first.id, "/x")]))
    await keeper.sync()
    sentinel = Path(first.mount) / DATA / "sentinel"
    sentinel.write_text("tenant data")

    # the agent restarts (a new keeper) and the disk is unmounted (a reboot): mounted again,
    # never formatted, the data kept
    subprocess.run(["umount", first.mount], check=True)
    keeper = DiskKeeper("h1", data_dir, [loops[0].device, loops[1].device], store, LinuxHost())
    for _ in range(2):
        await keeper.sync()
    bound = await store.get(store.keys.ssd("h1", first.id), Ssd)
    assert bound is not None and bound.value.state == SSD_BOUND
    assert bound.value.fs_uuid == first.fs_uuid and sentinel.read_text() == "tenant data"

    assert await store.delete(claim)
    await keeper.sync()
    wiped = await store.get(store.keys.ssd("h1", first.id), Ssd)
    assert wiped is not None and wiped.value.state == SSD_READY
    assert wiped.value.fs_uuid != first.fs_uuid
    assert not sentinel.exists() and os.listdir(Path(first.mount) / DATA) == []
    assert mounts()[first.mount][0] == loops[0].device


async def test_a_disk_that_vanishes_is_broken(loops: list[Loop], store: EtcdStore,
                                              tmp_path: Path) -> None:
    keeper = DiskKeeper("h1", str(tmp_path / "data"), [loops[0].device], store, LinuxHost())
    for _ in range(2):
        await keeper.sync()
    loops[0].vanish()
    await keeper.sync()
    broken = await store.get(store.keys.ssd("h1", disk_id(loops[0].device)), Ssd)
    assert broken is not None and broken.value.state == SSD_BROKEN
    assert "vanished" in broken.value.error
