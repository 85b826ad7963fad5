"""The HA pair (DESIGN.md §6) on real etcd and real `sigmad master` processes: one leader;
failover on SIGKILL within the lease TTL + 1 s and on SIGTERM (resignation) at once; a deposed
leader's writes are refused; both masters recover from an etcd restart; a 3-member etcd that
loses a member keeps a master working; a scale-up survives the death of the leader."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sigmad.leader import Elector, LeaderRecord
from sigmad.procs import EtcdProcess
from sigmad.store import Deposed, EtcdStore, Guard, Op
from tests.integration.conftest import (
    IMAGE,
    EngineHost,
    call_api,
    free_port,
    stop_process,
    wait_for,
)

TTL = 3  # seconds: the masters' leader_ttl in these tests
SCALE_KILL_AFTER = float(os.environ.get("SIGMA_HA_KILL_AFTER", "0.3"))  # leader mid-scale-up


class Masters:
    """`count` real `sigmad master` processes (ids m1, m2, ...) sharing one etcd prefix."""

    def __init__(self, root: Path, endpoints: list[str], count: int = 2, ttl: int = TTL) -> None:
        self.root = root
        self.ttl = ttl
        self.token = secrets.token_hex(16)
        self.prefix = f"/sigma-ha/{uuid.uuid4().hex[:8]}"
        self.ports = [free_port() for _ in range(count)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.endpoints = endpoints
        for i in range(count):
            self.config(i).write_text(yaml.safe_dump({
                "id": self.id(i), "listen": f"127.0.0.1:{self.ports[i]}", "token": self.token,
                "etcd": {"endpoints": endpoints, "prefix": self.prefix},
                "reconcile_interval": 1, "leader_ttl": ttl,
            }))

    def id(self, i: int) -> str:
        return f"m{i + 1}"

    def config(self, i: int) -> Path:
        return self.root / f"{self.id(i)}.yaml"

    def log(self, i: int) -> Path:
        return self.root / f"{self.id(i)}.log"

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def start(self, i: int) -> None:
        with open(self.log(i), "ab") as log:
            self.procs[i] = subprocess.Popen(
                [sys.executable, "-m", "sigmad", "master", "--config", str(self.config(i))],
                stdout=log, stderr=subprocess.STDOUT,
            )
        wait_for(lambda: self.api(i, "GET", "/healthz")[0] == 200, 20, f"{self.id(i)}'s API")

    def stop(self, i: int, sig: int = signal.SIGTERM) -> None:
        stop_process(self.procs.pop(i, None), sig)

    def close(self) -> None:
        for i in list(self.procs):
            self.stop(i)

    def api(self, i: int, method: str, path: str, body: str | None = None) -> tuple[int, Any]:
        """(status, JSON body) of a call to master `i`; (0, None) if it does not answer."""
        try:
            return call_api(f"{self.url(i)}{path}", method, self.token, body, timeout=5)
        except OSError:
            return 0, None

    def leader(self, i: int) -> str | None:
        """The leader's id as master `i` tells (None: no leader or no answer)."""
        status, body = self.api(i, "GET", "/v1/masters")
        return (body.get("leader") or {}).get("id") if status == 200 else None

    def agreed(self) -> str | None:
        """The leader's id if every running master names the same one and lists every running
        master, exactly one of them as the leader."""
        views = [self.api(i, "GET", "/v1/masters") for i in self.procs]
        if not views or any(status != 200 for status, _ in views):
            return None
        leaders = {(body.get("leader") or {}).get("id") for _, body in views}
        want = {self.id(i) for i in self.procs}
        for _, body in views:
            roles = Counter(item["role"] for item in body["items"])
            if {item["id"] for item in body["items"]} != want or roles["leader"] != 1:
                return None
        return leaders.pop() if len(leaders) == 1 and None not in leaders else None

    def index(self, master_id: str) -> int:
        return int(master_id[1:]) - 1


@pytest.fixture
def masters(tmp_path: Path, etcd: EtcdProcess) -> Iterator[Masters]:
    m = Masters(tmp_path, [etcd.endpoint])
    yield m
    m.close()


def takeover(m: Masters, standby: int, limit: float) -> float:
    """Seconds until master `standby` is the leader (polled every 50 ms, at most `limit`)."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if m.leader(standby) == m.id(standby):
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"{m.id(standby)} did not lead within {limit}s "
                         f"(logs: {m.log(0)}, {m.log(1)})")


def spec(app: str, replicas: int) -> str:
    return yaml.safe_dump({"app": app, "replicas": replicas, "containers": [
        {"name": "main", "image": IMAGE, "command": ["sleep", "3600"]}]})


# election and failover


def test_two_masters_agree_on_exactly_one_leader(masters: Masters) -> None:
    masters.start(0)
    masters.start(1)
    leader = wait_for(masters.agreed, 10, "both masters naming one leader")
    assert leader == "m1"  # it started first and nothing deposed it
    ctl = subprocess.run(
        [sys.executable, "-m", "sigmactl", "--server", masters.url(1), "--token", masters.token,
         "get", "masters"], capture_output=True, text=True, timeout=30,
    )
    lines = ctl.stdout.splitlines()
    assert lines[0].split() == ["ID", "API", "ROLE", "AGE"], ctl.stderr
    assert [line.split()[:3] for line in lines[1:]] == [
        ["m1", masters.url(0), "leader"], ["m2", masters.url(1), "standby"]]
    assert "m1 is the leader" in masters.log(0).read_text()
    assert "m2 is a standby" in masters.log(1).read_text()
    with pytest.raises(urllib.error.HTTPError) as info:  # the token is needed, as elsewhere
        urllib.request.urlopen(f"{masters.url(1)}/v1/masters", timeout=5)
    assert info.value.code == 401


def test_sigkill_of_the_leader_fails_over_within_the_ttl_plus_1s(masters: Masters) -> None:
    masters.start(0)
    masters.start(1)
    assert wait_for(masters.agreed, 10, "one leader") == "m1"
    masters.stop(0, signal.SIGKILL)
    took = takeover(masters, 1, TTL + 3)
    print(f"\nfailover after SIGKILL of the leader: {took:.2f}s (lease TTL {TTL}s)")
    assert took <= TTL + 1
    masters.start(0)  # it comes back as a standby
    assert wait_for(masters.agreed, 10, "one leader again") == "m2"


def test_sigterm_of_the_leader_resigns_and_the_standby_leads_at_once(masters: Masters) -> None:
    masters.start(0)
    masters.start(1)
    assert wait_for(masters.agreed, 10, "one leader") == "m1"
    proc = masters.procs[0]
    proc.send_signal(signal.SIGTERM)
    took = takeover(masters, 1, TTL + 3)
    print(f"\nfailover after SIGTERM of the leader: {took:.2f}s (lease TTL {TTL}s)")
    assert took <= 1.5
    assert proc.wait(20) == 0
    assert "m1 resigned" in masters.log(0).read_text()


def test_both_masters_recover_from_an_etcd_restart(tmp_path: Path) -> None:
    etcd = EtcdProcess(tmp_path / "etcd", free_port(), free_port(), name="ha")
    etcd.start()
    m = Masters(tmp_path, [etcd.endpoint])
    try:
        asyncio.run(etcd.wait_ready())
        m.start(0)
        m.start(1)
        assert wait_for(m.agreed, 10, "one leader") == "m1"
        etcd.stop()
        # Within the TTL the leader notices it cannot renew its lease and stops leading.
        wait_for(lambda: "m1 stops leading" in m.log(0).read_text(), TTL + 3,
                 "the leader to step down while etcd is away")
        etcd.start()
        asyncio.run(etcd.wait_ready())
        started = time.monotonic()
        leader = wait_for(m.agreed, 30, "one leader after etcd came back")
        print(f"\none leader ({leader}) {time.monotonic() - started:.1f}s after etcd restarted")
        i = m.index(leader)
        status, body = m.api(1 - i, "PUT", "/v1/apps", spec("after-restart", 0))
        assert status == 200, body
        assert m.api(i, "GET", "/v1/apps/default/after-restart")[0] == 200
    finally:
        m.close()
        etcd.stop()


# fencing


async def test_a_deposed_leaders_writes_are_refused_and_change_nothing(
    etcd: EtcdProcess,
) -> None:
    prefix = f"/sigma-ha/{uuid.uuid4().hex[:8]}"
    a, fenced, b = (EtcdStore([etcd.endpoint], prefix) for _ in range(3))
    deposed: list[int] = []
    try:
        key = a.keys.leader()
        lease_a = await a.grant(10)
        won = await a.claim(key, LeaderRecord("a", "", 0.0), lease_a)
        assert won.mod_revision > 0
        assert (await a.claim(key, LeaderRecord("a", "", 0.0), lease_a)).mod_revision == \
            won.mod_revision  # a retried claim of one's own key still counts as won
        assert (await b.claim(key, LeaderRecord("b", "", 0.0), await b.grant(10))) \
            .mod_revision == 0
        fenced.fence = Guard(key, won.mod_revision)
        fenced.on_deposed = lambda: deposed.append(1)
        one, two = a.keys.app("default", "one"), a.keys.app("default", "two")
        await fenced.put(one, {"v": 1})
        assert await fenced.create(two, {"v": 1})
        rev = (await fenced.revisions(prefix + "/apps/"))[two]
        assert not await fenced.update(two, {"v": 2}, rev + 100)  # an ordinary CAS conflict
        assert not deposed

        await a.revoke(lease_a)  # a loses its lease: the key goes, b wins it
        assert (await b.claim(key, LeaderRecord("b", "", 0.0), await b.grant(10))).mod_revision
        before = await b.revisions(prefix + "/")
        writes = [
            fenced.put(one, {"v": 3}),
            fenced.put(a.keys.events() + "x", {"v": 3}, lease=await a.grant(10)),
            fenced.create(a.keys.app("default", "three"), {"v": 3}),
            fenced.update(two, {"v": 3}, rev),
            fenced.delete(one),
            fenced.delete(two, rev),
            fenced.commit([Guard(two, rev)], [Op(one, {"v": 3}), Op(two, delete=True)]),
        ]
        for write in writes:
            with pytest.raises(Deposed):
                await write
        assert len(deposed) == len(writes)
        assert await b.revisions(prefix + "/") == before  # etcd is unchanged
    finally:
        for s in (a, fenced, b):
            await s.close()


async def test_a_leader_whose_lease_is_revoked_stops_leading_at_once(
    etcd: EtcdProcess,
) -> None:
    prefix = f"/sigma-ha/{uuid.uuid4().hex[:8]}"
    stores = [EtcdStore([etcd.endpoint], prefix, retry_for=1.0, rpc_timeout=1.0)
              for _ in range(5)]
    other = stores[4]
    leading: dict[str, float] = {}
    ended: dict[str, float] = {}

    def lead(name: str) -> Any:
        async def run() -> None:
            leading[name] = time.monotonic()
            try:
                await asyncio.sleep(3600)
            finally:
                ended[name] = time.monotonic()

        return run

    a = Elector(stores[0], stores[1], "a", "http://a", 2)
    b = Elector(stores[2], stores[3], "b", "http://b", 2)
    runs = [asyncio.create_task(a.run(lead("a")))]
    try:
        await asyncio.wait_for(_until(lambda: "a" in leading), 5)
        runs.append(asyncio.create_task(b.run(lead("b"))))
        await asyncio.wait_for(_until(lambda: b.lease != 0), 5)
        await asyncio.sleep(0.5)
        assert "b" not in leading and a.fenced.fence is not None \
            and a.fenced.fence.mod_revision > 0
        revoked = time.monotonic()
        await other.revoke(a.lease)
        await asyncio.wait_for(_until(lambda: "a" in ended and "b" in leading), 3)
        print(f"\nrevoked lease: a stopped after {ended['a'] - revoked:.2f}s, "
              f"b led after {leading['b'] - revoked:.2f}s")
        assert ended["a"] - revoked < 1.0 and leading["b"] - revoked < 1.0
        assert a.fenced.fence == Guard(a.keys.leader(), -1)  # a's controller store is shut
        await asyncio.wait_for(_until(lambda: a.lease != 0 and not a.leading), 5)
        runs[1].cancel()  # b resigns: a leads again at once
        resigned = time.monotonic()
        leading.pop("a")
        await asyncio.wait_for(_until(lambda: "a" in leading), 3)
        assert leading["a"] - resigned < 1.0
    finally:
        for task in runs:
            task.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        for s in stores:
            await s.close()


async def _until(check: Any) -> None:
    while not check():
        await asyncio.sleep(0.02)


# a 3-member etcd


class EtcdCluster:
    """Three etcd members on 127.0.0.1 with distinct ports, one data dir each."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.clients = [free_port() for _ in range(3)]
        self.peers = [free_port() for _ in range(3)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None, None, None]
        self.token = f"sigma-ha-{uuid.uuid4().hex[:8]}"

    @property
    def endpoints(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.clients]

    def start(self) -> None:
        members = ",".join(f"e{i}=http://127.0.0.1:{p}" for i, p in enumerate(self.peers))
        for i in range(3):
            client, peer = self.endpoints[i], f"http://127.0.0.1:{self.peers[i]}"
            with open(self.root / f"etcd-{i}.log", "ab") as log:
                self.procs[i] = subprocess.Popen([
                    "etcd", "--name", f"e{i}", "--data-dir", str(self.root / f"etcd-{i}"),
                    "--listen-client-urls", client, "--advertise-client-urls", client,
                    "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", members, "--initial-cluster-state", "new",
                    "--initial-cluster-token", self.token,
                ], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        for i in range(3):
            self.kill(i)


async def _healthy(endpoints: list[str], timeout: float) -> None:
    """Until a write and a read go through the cluster (it has elected a raft leader)."""
    s = EtcdStore(endpoints, "/sigma-ha-health", retry_for=2.0, rpc_timeout=2.0)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                await s.put(s.keys.node("probe"), {"ok": True})
                if await s.keys_under(s.keys.node("probe")):
                    return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.3)
    finally:
        await s.close()


def test_a_3_member_etcd_losing_the_first_endpoint_keeps_the_master_working(
    tmp_path: Path,
) -> None:
    cluster = EtcdCluster(tmp_path)
    cluster.start()
    m = Masters(tmp_path, cluster.endpoints, count=1)
    try:
        asyncio.run(_healthy(cluster.endpoints, 30))
        m.start(0)
        wait_for(lambda: m.leader(0) == "m1", 10, "m1 to lead")
        status, body = m.api(0, "PUT", "/v1/apps", spec("before", 0))
        assert status == 200, body
        cluster.kill(0)  # the member the master's first endpoint points at
        killed = time.monotonic()

        def applied() -> bool:
            return m.api(0, "PUT", "/v1/apps", spec("after", 0))[0] == 200

        wait_for(applied, 20, "an apply through the remaining members")
        print(f"\napply went through {time.monotonic() - killed:.1f}s after the kill")
        for app in ("before", "after"):
            status, body = m.api(0, "GET", f"/v1/apps/default/{app}")
            assert status == 200 and body["app"] == app, body
        wait_for(lambda: m.leader(0) == "m1", TTL + 5, "m1 leading on the other members")
        assert m.procs[0].poll() is None
    finally:
        m.close()
        cluster.stop()


# a scale-up across a failover


def test_the_standby_finishes_a_scale_up_when_the_leader_is_killed(
    tmp_path: Path, etcd: EtcdProcess, engine: EngineHost,
) -> None:
    m = Masters(tmp_path, [etcd.endpoint])
    node_config = tmp_path / "node.yaml"
    node_config.write_text(yaml.safe_dump({
        "name": "node-1", "engine": engine.url, "address": engine.address,
        "port_range": [31000, 31009], "heartbeat_ttl": 2,
        "etcd": {"endpoints": [etcd.endpoints[-1]], "prefix": m.prefix},
    }))
    agent: subprocess.Popen[bytes] | None = None
    try:
        m.start(0)
        m.start(1)
        assert wait_for(m.agreed, 10, "one leader") == "m1"
        with open(tmp_path / "node.log", "ab") as log:
            agent = subprocess.Popen(
                ["nsenter", f"--net=/var/run/netns/{engine.netns}", sys.executable, "-m",
                 "sigmad", "node", "--config", str(node_config)],
                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
            )
        wait_for(lambda: [n["status"] for n in m.api(1, "GET", "/v1/nodes")[1]["items"]]
                 == ["Ready"], 30, "node-1 Ready")
        assert m.api(0, "PUT", "/v1/apps", spec("scale", 1))[0] == 200
        running(m, 1, 1, 60)
        status, body = m.api(1, "PUT", "/v1/apps", spec("scale", 8))  # via the standby
        assert status == 200, body
        time.sleep(SCALE_KILL_AFTER)
        m.stop(0, signal.SIGKILL)  # the leader dies while it scales up
        killed = time.monotonic()
        items = running(m, 1, 8, 120)
        print(f"\n8 Running {time.monotonic() - killed:.1f}s after the leader was killed")
        assert m.leader(1) == "m2"
        assert sorted(i["index"] for i in items) == list(range(8))
        ips = [i["ip"] for i in items]
        assert all(ips) and len(set(ips)) == 8, ips

        def one_container_each() -> dict[str, int] | None:
            out = engine.docker("ps", "--filter", "label=sigma.app=scale", "--format",
                                '{{.Label "sigma.instance"}}').stdout.split()
            counts = Counter(out)
            return counts if len(counts) == 8 and set(counts.values()) == {1} else None

        counts = wait_for(one_container_each, 45, "one running container per instance")
        assert sorted(counts) == [f"default/scale-{i}" for i in range(8)]
    finally:
        m.close()
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(20)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        engine.clean()


def running(m: Masters, i: int, count: int, timeout: float) -> list[dict[str, Any]]:
    """The app `scale`'s instances once `count` of them are Running (asked to master `i`)."""

    def check() -> list[dict[str, Any]] | None:
        status, body = m.api(i, "GET", "/v1/instances?app=scale")
        if status != 200:
            return None
        items: list[dict[str, Any]] = body["items"]
        ok = len(items) == count and all(x["state"] == "Running" for x in items)
        return items if ok else None

    return wait_for(check, timeout, f"{count} Running instances of scale "
                    f"(logs in {m.root})")
