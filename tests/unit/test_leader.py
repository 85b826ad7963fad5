"""Leader election pieces that need no etcd: the masters view, the master options, the lease
holder's loss detection, the fence check, `sigmactl get masters` and `lab up --masters`."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import pytest

from sigmad import store as store_module
from sigmad.config import MasterConfig, master_config
from sigmad.errors import SpecError
from sigmad.lab.config import LabConfig, LabError
from sigmad.leader import Elector, LeaderRecord, MasterRecord, masters_view
from sigmad.spec import Fields
from sigmad.store import EtcdStore, Guard
from tests.unit.test_sigmactl_client import Fake, run

TOKEN = "9f3c1e7a5b2d8046"  # 16 characters, no pattern


# the masters view


def test_masters_view_puts_the_leader_first_and_the_rest_as_standbys() -> None:
    leader = LeaderRecord("m2", "http://b:7475", 200.0)
    seen = [MasterRecord("m1", "http://a:7475", 100.0), MasterRecord("m2", "http://b:7475", 150.0),
            MasterRecord("m0", "http://c:7475", 120.0)]
    view = masters_view(leader, seen)
    assert view["leader"] == {"id": "m2", "api": "http://b:7475", "since": 200.0}
    assert [(i["id"], i["role"], i["since"]) for i in view["items"]] == [
        ("m2", "leader", 200.0), ("m0", "standby", 120.0), ("m1", "standby", 100.0)]


def test_masters_view_without_a_leader_and_with_a_leader_not_listed() -> None:
    assert masters_view(None, [MasterRecord("m1", "u", 1.0)]) == {
        "leader": None, "items": [{"id": "m1", "api": "u", "role": "standby", "since": 1.0}]}
    view = masters_view(LeaderRecord("m9", "v", 2.0), [])
    assert view["items"] == [{"id": "m9", "api": "v", "role": "leader", "since": 2.0}]


# master options


def master(**doc: object) -> MasterConfig:
    return master_config(Fields("", {"token": TOKEN, **doc}, ""))


def test_master_id_ttl_and_url_defaults() -> None:
    cfg = master(listen="0.0.0.0:7480")
    assert (cfg.id, cfg.leader_ttl, cfg.advertise) == ("", 5, "")
    assert cfg.master_id() == f"{socket.gethostname()}:7480"
    assert cfg.api_url() == f"http://{socket.gethostname()}:7480"
    assert master(listen="10.0.0.5:7475").api_url() == "http://10.0.0.5:7475"


def test_master_id_ttl_and_url_given() -> None:
    cfg = master(id="m-1.a", leader_ttl=2, advertise="https://m1.example:7475/")
    assert (cfg.master_id(), cfg.leader_ttl, cfg.api_url()) == (
        "m-1.a", 2, "https://m1.example:7475")


@pytest.mark.parametrize("doc, field", [
    ({"leader_ttl": 1}, "leader_ttl"), ({"leader_ttl": 2.5}, "leader_ttl"),
    ({"leader_ttl": True}, "leader_ttl"), ({"id": "a/b"}, "id"), ({"id": 7}, "id"),
    ({"advertise": "m1:7475"}, "advertise"),
])
def test_bad_master_election_options_are_refused(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as info:
        master(**doc)
    assert info.value.field == field


# the lease holder


def elector(ttl: int = 2) -> Elector:
    s = EtcdStore(["http://127.0.0.1:1"], "/t")
    return Elector(s, EtcdStore(["http://127.0.0.1:1"], "/t"), "m1", "http://m1", ttl)


async def test_a_lease_etcd_calls_expired_is_lost_at_the_next_keepalive() -> None:
    e = elector(ttl=3)

    async def expired(lease: int) -> bool:
        return False

    e.store.keepalive = expired  # type: ignore[method-assign]
    started = time.monotonic()
    why = await asyncio.wait_for(e._hold(7, asyncio.get_running_loop().time()), 5)
    assert why == "etcd says it expired"
    assert 0.9 < time.monotonic() - started < 1.5  # at ttl/3


async def test_a_lease_no_keepalive_renews_is_lost_at_its_ttl() -> None:
    e = elector(ttl=2)
    calls = []

    async def hangs(lease: int) -> bool:
        calls.append(lease)
        await asyncio.sleep(60)
        return True

    e.store.keepalive = hangs  # type: ignore[method-assign]
    started = time.monotonic()
    why = await asyncio.wait_for(e._hold(7, asyncio.get_running_loop().time()), 5)
    assert why.startswith("no keepalive got through")
    assert 1.9 < time.monotonic() - started < 2.3 and calls == [7]


async def test_failing_keepalives_are_retried_until_the_ttl_runs_out() -> None:
    e = elector(ttl=3)
    calls = []

    async def unreachable(lease: int) -> bool:
        calls.append(time.monotonic())
        raise store_module.StoreUnavailable("etcd is unreachable")

    e.store.keepalive = unreachable  # type: ignore[method-assign]
    started = time.monotonic()
    why = await asyncio.wait_for(e._hold(7, asyncio.get_running_loop().time()), 5)
    assert why.startswith("no keepalive got through")
    assert 2.9 < time.monotonic() - started < 3.3 and len(calls) >= 2


def test_a_fresh_elector_fences_its_controller_store_shut() -> None:
    e = elector()
    assert e.fenced.fence == Guard("/t/leader", -1)
    e.fenced.on_deposed()  # type: ignore[misc]
    assert e._deposed.is_set()


# the fence check on a failed transaction's answer


@pytest.mark.parametrize("fence, found, holds", [
    (Guard("k", 5), [5], True),
    (Guard("k", 5), [9], False),
    (Guard("k", 5), [], False),
    (Guard("k", 0), [], True),
    (Guard("k", -1), [], False),
    (Guard("k", -1), [5], False),
])
def test_the_fence_holds_only_while_the_leader_key_is_as_won(
    fence: Guard, found: list[int], holds: bool,
) -> None:
    assert store_module._holds(fence, found) is holds


# sigmactl get masters


def masters_answer() -> dict[str, Any]:
    """What GET /v1/masters answers: a leader for 125 s, a standby for 30 s (from now)."""
    return {"leader": {"id": "m1", "api": "http://a:7475", "since": 100.0}, "items": [
        {"id": "m1", "api": "http://a:7475", "role": "leader", "since": time.time() - 125},
        {"id": "m2", "api": "http://b:7475", "role": "standby", "since": time.time() - 30},
    ]}


def test_get_masters_prints_a_table_and_json(fake: Fake) -> None:
    answer = masters_answer()
    fake.answer("GET", "/v1/masters", (200, answer))
    lines = run(fake, "get", "masters").stdout.splitlines()
    assert lines[0].split() == ["ID", "API", "ROLE", "AGE"]
    assert lines[1].split() == ["m1", "http://a:7475", "leader", "2m"]
    assert lines[2].split()[:3] == ["m2", "http://b:7475", "standby"]
    assert "SINCE" in run(fake, "get", "master", "-o", "wide").stdout
    assert json.loads(run(fake, "get", "masters", "-o", "json").stdout) == answer["items"]
    refused = run(fake, "get", "masters", "-n", "default")
    assert refused.exit_code == 2 and "masters have no namespace" in refused.output


# sigmad lab up --masters


def test_lab_masters_listen_on_consecutive_ports() -> None:
    assert LabConfig(masters=2, listen="127.0.0.1:7575").master_listens == [
        "127.0.0.1:7575", "127.0.0.1:7576"]
    assert LabConfig().master_listens == ["127.0.0.1:7575"]
    with pytest.raises(LabError, match="--masters 0"):
        LabConfig(masters=0).validate()
    with pytest.raises(LabError, match="--masters 9"):
        LabConfig(masters=9).validate()


def test_lab_status_shows_each_masters_role() -> None:
    from sigmad.lab.report import status_table

    master = {"pid": 7, "listen": "127.0.0.1:7575", "alive": True, "healthy": True}
    text = status_table({
        "name": "t", "dir": "/x", "ready": True, "image": "", "hosts": [], "etcd": None,
        "registry": None, "masters": [{**master, "role": "leader"},
                                      {**master, "listen": "127.0.0.1:7576", "role": "standby"},
                                      {**master, "alive": False, "healthy": False, "role": ""}],
    })
    lines = [line for line in text.splitlines() if line.startswith("master:")]
    assert lines[0].endswith("running yes  healthy yes  leader")
    assert "127.0.0.1:7576" in lines[1] and lines[1].endswith("standby")
    assert lines[2].endswith("running no  healthy no")
