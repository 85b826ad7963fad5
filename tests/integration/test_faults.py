"""Broken hosts on the lab: a host that dies or is cut off loses its instances to healthy
hosts, with the same names and IPs, reachable from a peer within 15 s, once their old copies
are fenced; when it comes back it removes its stale copies before it is Ready, so no IP ever
has two live holders (tests/integration/test_fence.py samples that every 100 ms)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from typing import Any

import pytest

from tests.integration.conftest import wait_for
from tests.integration.labkit import LabCluster, web

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
MOVE_BOUND = 15.0  # seconds from the fault until a peer reaches the moved instance


def one_per_host(lab: LabCluster) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A client on h1 and an app `svc` with one instance on each host."""
    lab.apply(web(lab, "client", 1, placement={"labels": {"host": "h1"}}))
    lab.apply(web(lab, "svc", 3, placement={"spread": "host"}))
    (client,) = lab.running("client", 1)
    by_node = {i["node"]: i for i in lab.running("svc", 3)}
    assert set(by_node) == {"h1", "h2", "h3"}
    return client, by_node


def node_ready(lab: LabCluster, name: str) -> bool:
    nodes = lab.ctl("get", "nodes", "-o", "json").stdout
    return any(n["name"] == name and n["status"] == "Ready" for n in _json(nodes))


def _json(text: str) -> list[dict[str, Any]]:
    import json

    return json.loads(text)  # type: ignore[no-any-return]


def live_ips(lab: LabCluster) -> Counter[str]:
    """How many running sigma containers hold each overlay IP, over every host."""
    held: Counter[str] = Counter()
    for node in lab.lab.engines:
        ids = lab.docker(node, "ps", "-q", "--filter", "label=sigma.instance").stdout.split()
        for cid in ids:
            ip = lab.docker(node, "inspect", "--format",
                            "{{.NetworkSettings.Networks.sigma.IPAddress}}", cid).stdout.strip()
            held[ip] += 1
    return held


def moved_and_reachable(lab: LabCluster, client: dict[str, Any], lost: dict[str, Any],
                        since: float) -> float:
    """Wait until the instance `lost` (on the broken host) runs on another host with its IP
    and the client reaches it; seconds from `since`."""
    def check() -> bool:
        now = next(i for i in lab.instances("svc") if i["index"] == lost["index"])
        return (now["state"] == "Running" and now["node"] != lost["node"]
                and now["ip"] == lost["ip"]
                and lab.fetch(client, lost["ip"]).strip() == f"hello from svc-{lost['index']}")

    wait_for(check, MOVE_BOUND - (time.monotonic() - since), "the lost instance moved and "
             "reachable again", 0.1)
    return time.monotonic() - since


@pytest.mark.parametrize(("fault", "host"), [("kill-host", "h3"), ("partition", "h2")])
def test_a_broken_host_loses_its_instances_and_rejoins_without_a_second_holder(
    lab: LabCluster, fault: str, host: str,
) -> None:
    """A killed host (agent, dockerd, containers) or a cut-off one (its agent stops its old
    copy): its instance runs elsewhere with its IP; back, the host removes its copy."""
    client, by_node = one_per_host(lab)
    lost = by_node[host]
    try:
        start = time.monotonic()
        (lab.lab.kill_host if fault == "kill-host" else lab.lab.partition)(host)
        took = moved_and_reachable(lab, client, lost, start)
        print(f"{fault}: svc-{lost['index']} reachable on its IP again after {took:.1f}s")
        events = lab.ctl("events", "--app", "svc").stdout
        assert f"NeedMigration: NodeLost: node {host} is NotReady" in events, events
        if fault == "partition":  # the old copy is fenced: nothing of it runs there
            assert lab.docker(host, "ps", "-q", "--filter", "label=sigma.app=svc").stdout == ""
        # (a self-fenced copy may be gone already: the master saw it end while the host's
        # lease still lived, and removed it to restart it; a killed host's engine is dead)
        left = fault == "kill-host" or lab.docker(host, "ps", "-aq", "--filter",
                                                   "label=sigma.app=svc").stdout.strip()
        lab.lab.heal(host)
        wait_for(lambda: node_ready(lab, host), 30, f"{host} Ready again")
        assert lab.docker(host, "ps", "-aq", "--filter", "label=sigma.app=svc").stdout == ""
        assert max(live_ips(lab).values()) == 1
        assert lab.fetch(client, lost["ip"]).strip() == f"hello from svc-{lost['index']}"
        events = lab.ctl("events", "--app", "svc").stdout
        if left:
            assert f"removed on {host}: KilledBySigma(migrated)" in events, events
    finally:
        lab.lab.heal(host)
        lab.delete("svc")
        lab.delete("client")


def test_manual_migration_waits_for_migrate(lab: LabCluster) -> None:
    lab.apply(web(lab, "pinned", 1, migration="manual", placement={"labels": {"zone": "room-a"}},
                  network={"mode": "host-compat", "ports": [{"name": "http"}]}))
    (inst,) = lab.running("pinned", 1)
    first = inst["node"]
    try:
        lab.lab.kill_host(first)

        def waiting() -> dict[str, Any] | None:
            (now,) = lab.instances("pinned")
            return now if now["state"] == "NeedMigration" else None

        wait_for(waiting, 15, "NeedMigration")
        other = "h3" if first == "h1" else "h1"  # room-a holds h1 and h3
        early = lab.ctl("migrate", "pinned-0", "--to", other)  # its engine is dead too: the
        assert early.returncode == 1 and "not fenced yet" in early.stderr  # lease + grace
        fenced = wait_for(lambda: lab.instances("pinned")[0]["fence"], 30, "the fence")
        assert "lapsed" in fenced
        assert lab.instances("pinned")[0]["state"] == "NeedMigration"  # nothing moves it
        result = lab.ctl("migrate", "pinned-0", "--to", other)
        assert result.returncode == 0, result.stderr
        (moved,) = lab.running("pinned", 1, timeout=30)
        assert moved["node"] == other and moved["ip"] == inst["ip"]
        booked = lab.port_claims()  # the lost node's host port is released, the new one held
        assert booked == {f"{other}/{moved['host_ports']['http']}": "default/pinned-0"}, booked
        refused = lab.ctl("migrate", "pinned-0")
        assert refused.returncode == 1 and "not NeedMigration" in refused.stderr
    finally:
        lab.lab.heal(first)
        lab.delete("pinned")


def test_drain_under_traffic_fails_no_request(lab: LabCluster) -> None:
    client, by_node = one_per_host(lab)
    moving = by_node["h2"]
    ips = " ".join(i["ip"] for i in by_node.values())
    # The client asks every instance in turn, 5 requests a second, for ~12 s.
    loop = (f"for n in $(seq 1 20); do for ip in {ips}; do "
            "timeout 3 wget -qO- http://$ip:8080 >/dev/null && echo ok || echo FAIL $ip; "
            "sleep 0.2; done; done")
    traffic = subprocess.Popen(
        ["docker", "-H", lab.lab.engines["h1"], "exec", client["containers"][0]["id"],
         "sh", "-c", loop], stdout=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(1)
        drained = lab.ctl("drain", "h2", "--timeout", "60")
        assert drained.returncode == 0, drained.stderr
        assert "node h2 is drained" in drained.stdout
        out, _ = traffic.communicate(timeout=60)
        assert out.count("ok") == 60 and "FAIL" not in out, out
        (now,) = [i for i in lab.instances("svc") if i["index"] == moving["index"]]
        assert now["node"] != "h2" and now["ip"] == moving["ip"] and now["state"] == "Running"
        assert now["terminations"][-1]["reason"] == "KilledBySigma(migrated)"
        wait_for(lambda: lab.docker("h2", "ps", "-aq", "--filter",  # stopped after the flip
                                    "label=sigma.app=svc").stdout == "", 20, "old copy gone")
        nodes = {n["name"]: n["status"] for n in _json(lab.ctl("get", "nodes", "-o",
                                                               "json").stdout)}
        assert nodes["h2"] == "Draining"
    finally:
        traffic.kill()
        lab.ctl("uncordon", "h2")
        lab.delete("svc")
        lab.delete("client")
    nodes = {n["name"]: n["status"] for n in _json(lab.ctl("get", "nodes", "-o", "json").stdout)}
    assert nodes["h2"] == "Ready"


def test_a_step_hung_on_a_frozen_engine_waits_for_it_without_a_second_copy(
        lab: LabCluster) -> None:
    """The engine freezes while the instance starts: its container may run on, so no copy
    starts elsewhere; it goes on where it is once the engine answers."""
    spec = web(lab, "slow", 1, placement={"labels": {"zone": "room-a"}})  # h1 or h3
    spec["containers"][0]["ready"] = {"exec": ["test", "-f", "/go"], "timeout": 300}
    lab.apply(spec)

    def starting() -> dict[str, Any] | None:
        (inst,) = lab.instances("slow")
        return inst if inst["state"] == "Starting" and inst["containers"] else None

    first = wait_for(starting, 60, "slow-0 Starting (readiness probed every step)")
    dockerd = lab.lab.host(first["node"]).dockerd_pid
    try:
        os.kill(dockerd, signal.SIGSTOP)  # the next probe's engine call hangs

        def waiting() -> dict[str, Any] | None:
            (inst,) = lab.instances("slow")
            return inst if "waiting for a fence" in inst["reason"] else None

        now = wait_for(waiting, 30, "slow-0 waiting for a fence")
        assert now["node"] == first["node"] and now["state"] == "NeedMigration", now
        other = "h3" if first["node"] == "h1" else "h1"
        assert lab.docker(other, "ps", "-aq", "--filter", "label=sigma.app=slow").stdout == ""
        os.kill(dockerd, signal.SIGCONT)
        wait_for(lambda: node_ready(lab, first["node"]), 30, "the frozen host Ready again")
        now = wait_for(lambda: lab.instances("slow")[0]["containers"] and
                       lab.instances("slow")[0], 30, "slow-0 resumed")
        assert lab.in_instance(now, "touch", "/go").returncode == 0
        (done,) = lab.running("slow", 1, timeout=30)
        assert done["node"] == first["node"] and done["ip"] == first["ip"]
    finally:
        os.kill(dockerd, signal.SIGCONT)
        wait_for(lambda: node_ready(lab, first["node"]), 30, "the frozen host Ready again")
        lab.delete("slow")
