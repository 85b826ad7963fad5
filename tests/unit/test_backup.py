"""Backup and restore (sigmad.backup) on the in-memory store, and GET /v1/backup."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from sigmad import backup
from sigmad.backup import Backup, BackupError, Entry
from tests.fakes.store import MemoryStore
from tests.unit.harness import ADMIN, Leader, call
from tests.unit.test_sigmactl_client import run, serving


async def filled() -> MemoryStore:
    store = MemoryStore()
    await store.put(store.keys.node("h1"), {"name": "h1"})
    await store.put(store.keys.ip("10.244.0.5"), {"owner": "default/web-0"})
    for n in range(300):  # more than one transaction's worth
        await store.put(store.keys.token(f"t{n:03}"), {"n": n})
    lease = await store.grant(5)
    await store.put(store.keys.heartbeat("h1"), {"node": "h1"}, lease=lease)
    return store


def unleased(store: MemoryStore) -> dict[str, bytes]:
    return {k: e.value for k, e in store.data.items() if not e.lease}


async def test_a_backup_restores_every_unleased_key_into_an_empty_prefix() -> None:
    source = await filled()
    taken = await backup.take(source)
    assert taken.revision == source.revision and len(taken.entries) == 303
    assert taken.leased == 1
    again = backup.decode(backup.encode(taken))
    assert again == taken
    target = MemoryStore()
    said: list[str] = []
    done = await backup.restore(target, again, say=said.append)
    assert (done.written, done.skipped, done.deleted) == (302, 1, 0)
    assert unleased(target) == unleased(source)
    assert target.keys.heartbeat("h1") not in target.data  # leased: never restored
    assert target.keys.restoring() not in target.data  # the marker went with the last write
    assert said[-1] == "restored 302/302 keys"


async def test_a_backup_restores_under_another_prefix() -> None:
    taken = await backup.take(await filled())
    target = MemoryStore("/other/v1")
    await backup.restore(target, taken)
    assert "/other/v1/nodes/h1" in target.data


async def test_a_restore_refuses_a_prefix_with_keys_unless_forced() -> None:
    taken = await backup.take(await filled())
    target = MemoryStore()
    await target.put(target.keys.node("stray"), {"name": "stray"})
    lease = await target.grant(5)
    await target.put(target.keys.leader(), {"id": "m1"}, lease=lease)
    with pytest.raises(BackupError, match=r"holds 1 keys .*--force") as refused:  # first
        await backup.restore(target, taken)
    assert refused.value.field == "force"
    assert target.keys.restoring() not in target.data  # nothing written
    done = await backup.restore(target, taken, force=True)
    assert done.deleted == 2
    assert target.keys.node("stray") not in target.data
    assert unleased(target) == {k: v for k, v in unleased(await filled()).items()}


async def test_a_leased_only_prefix_counts_as_empty() -> None:
    """Leased keys (an event, a heartbeat) are no state to lose."""
    target = MemoryStore()
    lease = await target.grant(5)
    await target.put(target.keys.events() + "1-1", {"message": "x"}, lease=lease)
    taken = await backup.take(await filled())
    assert (await backup.restore(target, taken)).deleted == 1


async def test_a_restore_refuses_while_a_master_runs_unless_forced() -> None:
    target = MemoryStore()
    lease = await target.grant(5)
    await target.put(target.keys.master("m1"), {"id": "m1"}, lease=lease)
    taken = await backup.take(await filled())
    with pytest.raises(BackupError, match=r"a master runs .*masters/m1.*Stop every master"):
        await backup.restore(target, taken)
    assert target.keys.restoring() not in target.data
    assert (await backup.restore(target, taken, force=True)).deleted == 1


async def test_a_half_restore_leaves_its_marker_and_a_second_one_is_refused() -> None:
    taken = await backup.take(await filled())
    target = MemoryStore()
    await target.put(target.keys.restoring(), {"revision": 1})
    with pytest.raises(BackupError, match="--force"):
        await backup.restore(target, taken)
    await backup.restore(target, taken, force=True)  # finishes the job
    assert target.keys.restoring() not in target.data


@pytest.mark.parametrize(("doc", "message"), [
    (b"nope", "not JSON"),
    (b"{}", "no \"format\""),
    (json.dumps({"format": "sigma-backup", "version": 9}).encode(), "version 9"),
    (json.dumps({"format": "sigma-backup", "version": 1, "revision": 3, "count": 1,
                 "keys": [{"key": "/abs", "value": "{}"}]}).encode(), r"keys\[0\].key"),
    (json.dumps({"format": "sigma-backup", "version": 1, "revision": 3, "count": 1,
                 "keys": [{"key": "a/../b", "value": "{}"}]}).encode(), r"keys\[0\].key"),
    (json.dumps({"format": "sigma-backup", "version": 1, "revision": 3, "count": 2,
                 "keys": [{"key": "a", "value": "{}"}]}).encode(), "cut short"),
])
def test_a_bad_file_is_refused_with_the_reason(doc: bytes, message: str) -> None:
    with pytest.raises(BackupError, match=message):
        backup.decode(doc)


def test_a_value_that_is_not_utf8_survives() -> None:
    taken = Backup("/sigma/v1", 7, 1.0, [Entry("x", b"\xff\x00")])
    assert backup.decode(backup.encode(taken)) == taken


async def test_get_backup_is_admin_only_and_says_its_revision() -> None:
    lead = Leader()
    async with lead, lead.client() as client:
        await lead.add_node("a")
        async with client.get("/v1/backup", headers={"Authorization": "Bearer x"}) as r:
            assert r.status == 401
        body = {"name": "r", "role": "operator", "namespaces": ["a"]}
        status, made = await call(client, "POST", "/v1/tokens", body)
        assert status == 201
        status, body = await call(client, "GET", "/v1/backup",
                                  headers={"Authorization": f"Bearer {made['token']}"})
        assert status == 403 and "only an admin" in body["error"]["message"]
        async with client.get("/v1/backup", headers=ADMIN) as r:
            assert r.status == 200
            taken = backup.decode(await r.read())
        assert int(r.headers["X-Sigma-Revision"]) == taken.revision
        assert any(e.key == "nodes/a" for e in taken.entries)


def test_sigmactl_backup_writes_a_private_file_and_says_what_it_holds(tmp_path: Path) -> None:
    taken = Backup("/sigma/v1", 42, 1.0, [Entry("nodes/h1", b"{}"),
                                          Entry("heartbeats/h1", b"{}", leased=True)])
    with serving() as fake:
        fake.answer("GET", "/v1/backup", (200, taken.to_dict()))
        out = tmp_path / "b.json"
        result = run(fake, "backup", "-o", str(out), "--json")
        assert result.exit_code == 0, result.output
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        assert backup.decode(out.read_bytes()) == taken
        summary = json.loads(result.output)
        assert (summary["revision"], summary["keys"], summary["leased"]) == (42, 2, 1)
        fake.answer("GET", "/v1/backup", (200, {"items": []}))
        bad = run(fake, "backup", "-o", str(tmp_path / "c.json"))
        assert bad.exit_code != 0 and "no backup" in bad.output
        assert not (tmp_path / "c.json").exists()
