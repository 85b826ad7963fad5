"""The overlay on a 3-host lab: real dockerd per host in its own namespace, real VXLAN.

One lab (the session's `lab` fixture) serves every lab test; each cleans its apps up.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from typing import Any

import pytest
import yaml

from sigmad.errors import StoreUnavailable
from sigmad.lab import trust
from sigmad.lab.services import PREFIX
from sigmad.network.ipam import VXLAN_PORT
from sigmad.store import EtcdStore
from tests.integration.conftest import wait_for
from tests.integration.labkit import LabCluster, web

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
GATEWAY = "10.244.0.1"


def test_the_lab_runs_over_tls(lab: LabCluster) -> None:
    """The API is HTTPS (sigmactl verifies it with the lab's CA), the masters reach every
    engine over TLS, etcd refuses plain text, and h1's agent may not write h2's keys."""
    assert lab.lab.server.startswith("https://") and lab.lab.ca
    nodes = yaml.safe_load(lab.ctl("get", "nodes", "-o", "json").stdout)
    assert {n["name"]: n["engine"] for n in nodes} == {
        h.name: f"tcp://{h.address}:2376" for h in lab.lab.hosts}
    assert all(n["status"] == "Ready" for n in nodes)  # so the masters reach them

    async def check() -> None:
        h1 = lab.etcd(trust.node_files(lab.lab.root, "h1"))
        plain = EtcdStore([f"http://127.0.0.1:{lab.lab.config.etcd_port}"], PREFIX,
                          retry_for=1.0, rpc_timeout=0.5)
        try:
            assert await h1.get_raw(h1.keys.node("h2")) is not None  # it reads
            for key in (h1.keys.node("h2"), h1.keys.heartbeat("h2")):
                with pytest.raises(StoreUnavailable, match="permission denied"):
                    await h1.create(key, {"forged": True})
            with pytest.raises(StoreUnavailable, match="unreachable"):
                await plain.ping()
        finally:
            await h1.close()
            await plain.close()

    asyncio.run(check())


def test_six_replicas_spread_over_three_hosts_reach_each_other(lab: LabCluster) -> None:
    # A tag no host has yet: the engines of h2 and h3 pull it, with progress in the events.
    image = f"{lab.lab.image.rsplit(':', 1)[0]}:mesh-{uuid.uuid4().hex[:8]}"
    lab.docker("h1", "tag", lab.lab.image, image)
    lab.docker("h1", "push", image)
    spec = web(lab, "mesh", 6)
    spec["containers"][0]["image"] = image
    lab.apply(spec)
    items = lab.running("mesh", 6)
    try:
        assert {i["node"] for i in items} == {"h1", "h2", "h3"}
        events = lab.ctl("events", "--app", "mesh").stdout
        assert f"pull {image}: Pulling from" in events, events
        assert f"pull {image}: Status: Downloaded newer image" in events, events
        ips = [i["ip"] for i in items]
        assert len(set(ips)) == 6 and all(ip.startswith("10.244.") for ip in ips)
        wide = lab.ctl("get", "instances", "--app", "mesh", "-o", "wide")
        assert wide.returncode == 0, wide.stderr
        for i in items:
            row = next(line for line in wide.stdout.splitlines() if f"mesh-{i['index']} " in line)
            assert i["node"] in row.split() and i["ip"] in row.split(), wide.stdout
        for src in items:
            for dst in items:
                if src is not dst:
                    got = lab.fetch(src, dst["ip"])
                    assert got.strip() == f"hello from mesh-{dst['index']}", (src, dst, got)
    finally:
        lab.delete("mesh")


def test_replaced_containers_keep_the_ip_and_deletion_releases_it(lab: LabCluster) -> None:
    spec = web(lab, "keep", 2)
    lab.apply(spec)
    before = {i["index"]: (i["ip"], i["containers"][0]["id"]) for i in lab.running("keep", 2)}
    spec["containers"][0]["env"] = {"RELEASE": "2"}  # a new template: containers replaced
    lab.apply(spec)

    def replaced() -> dict[int, tuple[str, str]] | None:
        now = {i["index"]: (i["ip"], i["containers"][0]["id"] if i["containers"] else "")
               for i in lab.instances("keep") if i["state"] == "Running"}
        done = len(now) == 2 and all(now[k][1] != before[k][1] for k in before)
        return now if done else None

    after = wait_for(replaced, 90, "containers replaced")
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}
    lab.delete("keep")
    status = lab.ctl("get", "instances", "-o", "json")
    held = {i["ip"] for i in yaml.safe_load(status.stdout)}
    assert not held & {ip for ip, _ in before.values()}


def test_recreated_elsewhere_with_the_same_ip_is_reachable_within_2s(lab: LabCluster) -> None:
    ip = "10.244.77.7"
    client = web(lab, "client", 1, placement={"labels": {"host": "h3"}})
    db = web(lab, "db", 1, network={"ip": ip}, placement={"labels": {"host": "h1"}})
    lab.apply(client)
    lab.apply(db)
    (peer,) = lab.running("client", 1)
    (first,) = lab.running("db", 1)
    try:
        assert first["node"] == "h1" and first["ip"] == ip
        assert lab.fetch(peer, ip).strip() == "hello from db-0"
        lab.delete("db")
        db["placement"]["labels"]["host"] = "h2"
        lab.apply(db)
        (moved,) = lab.running("db", 1)
        assert moved["node"] == "h2" and moved["ip"] == ip
        start = time.monotonic()
        wait_for(lambda: lab.fetch(peer, ip).strip() == "hello from db-0", 2.0,
                 "the re-created instance reachable from its peer", 0.05)
        print(f"reachable {time.monotonic() - start:.2f}s after it was Running")
    finally:
        lab.delete("db")
        lab.delete("client")


def test_agent_restart_keeps_traffic_flowing(lab: LabCluster) -> None:
    lab.apply(web(lab, "flow", 2, placement={"spread": "host"}))
    items = lab.running("flow", 2)
    try:
        src, dst = items
        fdb = lab.in_host(dst["node"], "bridge", "fdb", "show", "dev", "sigma-vx")
        device = lab.in_host(dst["node"], "ip", "-o", "link", "show", "sigma-vx").split(":")[0]
        pinger = subprocess.Popen(
            ["docker", "-H", lab.lab.engines[src["node"]], "exec", src["containers"][0]["id"],
             "ping", "-c", "60", "-i", "0.1", "-W", "1", dst["ip"]],
            stdout=subprocess.PIPE, text=True,
        )
        time.sleep(0.5)
        lab.lab.restart_agent(dst["node"])
        out, _ = pinger.communicate(timeout=30)
        assert "60 packets transmitted, 60 packets received" in out, out
        assert lab.in_host(dst["node"], "ip", "-o", "link", "show", "sigma-vx").split(":")[0] \
            == device  # not re-created
        assert lab.in_host(dst["node"], "bridge", "fdb", "show", "dev", "sigma-vx") == fdb
    finally:
        lab.delete("flow")


def test_the_gateway_answers_on_each_host_even_cut_off(lab: LabCluster) -> None:
    lab.apply(web(lab, "gw", 3, placement={"spread": "host"}))
    items = lab.running("gw", 3)
    try:
        assert {i["node"] for i in items} == {"h1", "h2", "h3"}
        cut = next(i for i in items if i["node"] == "h3")
        # Cut h3's tunnel only (its agent still reaches etcd: a cut-off host would fence
        # its instances, DESIGN.md §6).
        drops = [[chain, "-p", "udp", "--dport", str(VXLAN_PORT), "-j", "DROP"]
                 for chain in ("INPUT", "OUTPUT")]
        for rule in drops:
            lab.in_host("h3", "iptables", "-w", "10", "-I", *rule)
        try:
            for inst in items:
                result = lab.in_instance(inst, "ping", "-c", "2", "-W", "1", GATEWAY)
                assert result.returncode == 0, (inst["node"], result.stdout, result.stderr)
                neigh = lab.in_instance(inst, "ip", "neigh", "show", GATEWAY).stdout
                assert "0a:58:0a:f4:00:01" in neigh, neigh
            others = [i for i in items if i is not cut]
            assert lab.fetch(cut, others[0]["ip"]) == ""  # the tunnel really is cut
        finally:
            for rule in drops:
                lab.in_host("h3", "iptables", "-w", "10", "-D", *rule)
    finally:
        lab.delete("gw")


def test_an_image_the_registry_lacks_is_a_clear_failure_retried(lab: LabCluster) -> None:
    spec = web(lab, "ghost", 1)
    missing = lab.lab.image.replace("busybox", "nothing")
    spec["containers"][0]["image"] = missing
    lab.apply(spec)
    try:
        def failed() -> dict[str, Any] | None:
            (inst,) = lab.instances("ghost") or [None]
            return inst if inst and inst["state"] == "FailedToStart" else None

        inst = wait_for(failed, 60, "FailedToStart")
        assert inst["reason"].startswith(f"FailedToStart(image {missing} not found"), inst
        assert inst["next_start"] > 0  # retried after a back-off
    finally:
        lab.delete("ghost")
