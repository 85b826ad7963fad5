"""The records' schema version (sigmad.schema) on the in-memory store: the first leader
writes it, a master refuses to lead over a newer one or a restore under way, and says why."""

from __future__ import annotations

import asyncio
import functools

import pytest

from sigmad import schema
from sigmad.leader import Elector
from sigmad.schema import SchemaRecord, SchemaRefused
from tests.fakes.store import MemoryStore


async def test_the_first_leader_writes_the_version_and_the_next_finds_it() -> None:
    store = MemoryStore()
    assert await schema.read(store) == (None, False)
    assert await schema.settle(store, "m1") == schema.VERSION
    written = store.value(store.keys.schema(), SchemaRecord)
    assert (written.version, written.by) == (schema.VERSION, "m1")
    revision = store.data[store.keys.schema()].mod_revision
    assert await schema.settle(store, "m2") == schema.VERSION
    assert store.data[store.keys.schema()].mod_revision == revision  # not rewritten


async def test_a_newer_schema_is_refused_and_left_alone() -> None:
    store = MemoryStore()
    await store.put(store.keys.schema(), SchemaRecord(schema.VERSION + 1, "new"))
    with pytest.raises(SchemaRefused, match=f"schema version {schema.VERSION + 1}, newer"):
        await schema.settle(store, "m1")
    assert store.value(store.keys.schema(), SchemaRecord).version == schema.VERSION + 1
    assert "upgrade this master" in (await schema.why_not_lead(store) or "")


async def test_an_older_schema_is_migrated_step_by_step(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    store = MemoryStore()
    steps: list[int] = []

    async def step(version: int, s: MemoryStore) -> None:
        steps.append(version)

    monkeypatch.setattr(schema, "VERSION", 3)
    monkeypatch.setattr(schema, "MIGRATIONS", {1: functools.partial(step, 1),
                                               2: functools.partial(step, 2)})
    await store.put(store.keys.schema(), SchemaRecord(1))
    assert await schema.settle(store, "m1") == 3
    assert steps == [1, 2] and store.value(store.keys.schema(), SchemaRecord).version == 3


async def test_nobody_leads_while_a_restore_is_under_way() -> None:
    store = MemoryStore()
    await store.put(store.keys.restoring(), {"revision": 9})
    why = await schema.why_not_lead(store)
    assert why is not None and "restore is under way" in why
    with pytest.raises(SchemaRefused, match="restore"):
        await schema.settle(store, "m1")
    assert store.keys.schema() not in store.data


def test_refusal_is_pure() -> None:
    assert schema.refusal(None, False, 1) is None
    assert schema.refusal(1, False, 1) is None
    assert schema.refusal(1, False, 2) is None  # older: migrated, not refused
    assert schema.refusal(3, False, 2) is not None


async def test_an_elector_whose_gate_refuses_does_not_campaign(
        caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    await store.put(store.keys.schema(), SchemaRecord(schema.VERSION + 1))
    led = []

    async def lead() -> None:
        led.append(1)

    e = Elector(store, MemoryStore(), "m1", "http://m1", 2, watcher=store,
                gate=functools.partial(schema.why_not_lead, store))
    hold = asyncio.create_task(asyncio.sleep(0.05))
    caplog.set_level("INFO")
    await asyncio.wait_for(e._campaign(lead, store, hold), 5)
    assert store.keys.leader() not in store.data and not led
    assert "m1 does not lead: the records are of schema version" in caplog.text
