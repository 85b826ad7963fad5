"""The node's SSDs: the pure step of one disk, and the keeper on a fake host and store."""

from __future__ import annotations

from dataclasses import replace

import pytest

from sigmad.models import (
    SSD_BOUND,
    SSD_BROKEN,
    SSD_FORMATTING,
    SSD_FREE,
    SSD_READY,
    SSD_RETAINED,
    SSD_WIPING,
    BoundSsd,
    Instance,
    Ssd,
    SsdClaim,
)
from sigmad.node.disks import (
    BREAK,
    FORMAT,
    MOUNT,
    NOTHING,
    RECORD,
    DiskBusy,
    DiskError,
    DiskKeeper,
    Probe,
    disk_id,
    step,
)
from tests.fakes.store import MemoryStore

PATH, MOUNTED = "/dev/disk/by-id/nvme-A_1", "/var/lib/sigma/ssds/nvme-A_1"
GOOD = Probe("/dev/nvme0n1", 100 << 30, False, fs_uuid="u1", mounted=True)


def rec(state: str, **kw: object) -> Ssd:
    base = Ssd(node="h1", id="nvme-A_1", path=PATH, size=100 << 30, state=state,
               fs_uuid="u1", mount=MOUNTED)
    return replace(base, **kw)  # type: ignore[arg-type]


def test_disk_ids_are_key_safe() -> None:
    assert disk_id("/dev/disk/by-id/nvme-X_1") == "nvme-X_1"
    assert disk_id("/dev/loop3") == "loop3"
    assert disk_id("/dev/disk/by-path/pci-0000:00:1f.2-ata-1") == "pci-0000_00_1f.2-ata-1"


def test_a_new_disk_is_recorded_free_then_formatted() -> None:
    found = step(PATH, "h1", MOUNTED, None, GOOD, None)
    assert found.action == RECORD and found.record is not None
    assert (found.record.state, found.record.size, found.record.id) == \
        (SSD_FREE, 100 << 30, "nvme-A_1")
    formatting = step(PATH, "h1", MOUNTED, found.record, GOOD, None)
    assert formatting.action == FORMAT and formatting.record is not None
    assert formatting.record.state == SSD_FORMATTING


@pytest.mark.parametrize("state", [SSD_READY, SSD_BOUND])
def test_a_ready_or_bound_disk_is_never_formatted(state: str) -> None:
    owner = "default/db-0" if state == SSD_BOUND else None
    record = rec(state, owner=owner or "")
    assert step(PATH, "h1", MOUNTED, record, GOOD, owner).action == NOTHING
    unmounted = step(PATH, "h1", MOUNTED, record, replace(GOOD, mounted=False), owner)
    assert unmounted.action == MOUNT  # after a reboot: mounted again, data kept


def test_a_claim_binds_and_its_release_wipes() -> None:
    bound = step(PATH, "h1", MOUNTED, rec(SSD_READY), GOOD, "default/db-0")
    assert bound.action == RECORD and bound.record is not None
    assert (bound.record.state, bound.record.owner) == (SSD_BOUND, "default/db-0")
    released = step(PATH, "h1", MOUNTED, rec(SSD_BOUND, owner="default/db-0"), GOOD, None)
    assert released.action == FORMAT and released.record is not None
    assert (released.record.state, released.record.owner) == (SSD_WIPING, "")


def test_a_claimed_disk_not_in_use_is_retained_and_bound_again_when_back() -> None:
    owner = "default/db-0"
    retained = step(PATH, "h1", MOUNTED, rec(SSD_BOUND, owner=owner), GOOD, owner, False)
    assert retained.action == RECORD and retained.record is not None
    assert (retained.record.state, retained.record.owner) == (SSD_RETAINED, owner)
    assert step(PATH, "h1", MOUNTED, retained.record, GOOD, owner, False).action == NOTHING
    back = step(PATH, "h1", MOUNTED, retained.record, GOOD, owner, True)
    assert back.record is not None and back.record.state == SSD_BOUND
    released = step(PATH, "h1", MOUNTED, retained.record, GOOD, None)
    assert released.action == FORMAT  # `sigmactl ssd release` deleted the claim: wiped


@pytest.mark.parametrize(("probe", "error"), [
    (None, "vanished"), (replace(GOOD, error="I/O on x failed: EIO"), "EIO"),
    (replace(GOOD, fs_uuid="other"), "formatted outside sigma"),
])
def test_a_vanished_failing_or_replaced_disk_is_broken(probe: Probe | None, error: str) -> None:
    broken = step(PATH, "h1", MOUNTED, rec(SSD_BOUND, owner="default/db-0"), probe,
                  "default/db-0")
    assert broken.action == BREAK and broken.record is not None
    assert broken.record.state == SSD_BROKEN and error in broken.record.error
    # and it stays broken, even if the device is back: nothing is formatted on it
    assert step(PATH, "h1", MOUNTED, broken.record, GOOD, None).action == NOTHING


class FakeHost:
    """Devices by path; a format gives a new UUID and empties the data."""

    def __init__(self) -> None:
        self.devices: dict[str, Probe] = {PATH: replace(GOOD, fs_uuid="", mounted=False)}
        self.files: dict[str, set[str]] = {PATH: {"old-tenant"}}
        self.formats = 0
        self.busy = False
        self.busy_device = False
        self.fail_format = ""

    async def probe(self, path: str, mount: str) -> Probe | None:
        return self.devices.get(path)

    async def format(self, device: str) -> str:
        if self.busy_device:
            raise DiskBusy(f"{device} is in use")
        if self.fail_format:
            raise DiskError(self.fail_format)
        self.formats += 1
        self.devices[PATH] = replace(self.devices[PATH], fs_uuid=f"u{self.formats + 1}")
        self.files[PATH] = set()
        return self.devices[PATH].fs_uuid

    async def mount(self, device: str, mount: str) -> None:
        self.devices[PATH] = replace(self.devices[PATH], mounted=True)

    async def unmount(self, mount: str) -> None:
        if self.busy:
            raise DiskError("umount: target is busy")
        self.devices[PATH] = replace(self.devices[PATH], mounted=False)

    async def check_fresh(self, device: str, mount: str, fs_uuid: str) -> str:
        return "not empty" if self.files[PATH] else ""


async def record(store: MemoryStore) -> Ssd:
    got = await store.get(store.keys.ssd("h1", "nvme-A_1"), Ssd)
    assert got is not None
    return got.value


async def test_keeper_formats_binds_and_wipes_before_ready_again() -> None:
    store, host = MemoryStore(), FakeHost()
    keeper = DiskKeeper("h1", "/var/lib/sigma", [PATH], store, host)
    await keeper.sync()
    assert (await record(store)).state == SSD_FREE and host.formats == 0
    await keeper.sync()
    ready = await record(store)
    assert (ready.state, ready.mount, host.formats) == (SSD_READY, MOUNTED, 1)
    assert await keeper.capacity() == (1, 100 << 30)

    claim = store.keys.ssd_claim("h1", "nvme-A_1")
    await store.create(claim, SsdClaim("default/db-0"))
    await keeper.sync()
    assert (await record(store)).state == SSD_RETAINED  # its record does not place it here
    await store.put(store.keys.instance("default", "db", 0), Instance(
        "default", "db", 0, 1, node="h1", ssds=[BoundSsd("data", "nvme-A_1", "/x")]))
    await keeper.sync()
    assert (await record(store)).state == SSD_BOUND
    host.files[PATH].add("sentinel")
    await keeper.sync()  # restarts and passes keep a bound disk's data
    assert host.formats == 1 and "sentinel" in host.files[PATH]

    await store.delete(claim)
    host.busy = True  # the instance's container still holds it: wiping waits
    await keeper.sync()
    assert (await record(store)).state == SSD_WIPING and "sentinel" in host.files[PATH]
    host.busy = False
    host.busy_device = True  # still held (a stale container's bind): not broken, retried
    await keeper.sync()
    waiting = await record(store)
    assert (waiting.state, waiting.error) == (SSD_WIPING, "/dev/nvme0n1 is in use")
    host.busy_device = False
    await keeper.sync()
    wiped = await record(store)
    assert (wiped.state, host.formats, host.files[PATH]) == (SSD_READY, 2, set())
    assert wiped.fs_uuid != ready.fs_uuid


async def test_keeper_never_formats_a_disk_claimed_meanwhile() -> None:
    """The claim lands between the keeper's read and its formatting write: the write's
    guard fails and nothing is formatted."""
    store, host = MemoryStore(), FakeHost()
    keeper = DiskKeeper("h1", "/var/lib/sigma", [PATH], store, host)
    await keeper.sync()
    current = await store.get(store.keys.ssd("h1", "nvme-A_1"), Ssd)
    await store.create(store.keys.ssd_claim("h1", "nvme-A_1"), SsdClaim("default/db-0"))
    await keeper.sync_one(PATH, current, None)  # what it read before the claim
    assert host.formats == 0 and (await record(store)).state == SSD_FREE


async def test_keeper_reports_a_failed_format_as_broken() -> None:
    store, host = MemoryStore(), FakeHost()
    keeper = DiskKeeper("h1", "/var/lib/sigma", [PATH], store, host)
    await keeper.sync()
    host.fail_format = "mkfs.ext4 failed (1): /dev/nvme0n1 is apparently in use"
    await keeper.sync()
    broken = await record(store)
    assert broken.state == SSD_BROKEN and "apparently in use" in broken.error
    del host.devices[PATH]
    await keeper.sync()
    assert (await record(store)).error == broken.error  # broken stays as first reported
