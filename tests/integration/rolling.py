"""Restarting a lab's HA pair and agents one at a time under load, as an upgrade does: the
standby master, then the leader, then each host's agent, while a client keeps writing through
the API (following the pair) and an instance keeps fetching from the others over the overlay.
Shared by the rolling-restart, install and upgrade tests."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sigmactl.client import Client, CtlError
from sigmad.lab import Lab, services
from tests.integration.conftest import wait_for
from tests.integration.labkit import HOST_CPU, HOST_MEMORY, LabCluster, pair_config, web


@contextmanager
def pair_lab(root: Path, name: str, octet: int) -> Iterator[LabCluster]:
    """A 3-host lab with 2 masters, heartbeat TTL 5 s (the default: an agent restart takes
    1 to 2 s here, and a TTL shorter than a restart lets the lease lapse), on 10.OCTET.x.0/24."""
    lab = Lab(pair_config(root, name, octet, heartbeat_ttl=5, cpu=HOST_CPU,
                          memory=HOST_MEMORY))
    try:
        lab.up()
        yield LabCluster(lab, root)
    finally:
        lab.down()


class Writer(threading.Thread):
    """Creates a token every 50 ms through the API (sigmactl's client: both masters, first
    that answers); remembers the ones acknowledged and the errors."""

    def __init__(self, lab: Lab) -> None:
        super().__init__(daemon=True)
        urls = [services.master_url(m.listen, lab.ca) for m in lab.masters]
        self.client = Client(urls, lab.token, timeout=10, ca=lab.ca, say=lambda _: None)
        self.acked: list[str] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        prefix = uuid.uuid4().hex[:4]
        while not self.stop.is_set():
            name = f"roll-{prefix}-{n}"
            n += 1
            try:
                self.client.post_json("/v1/tokens", {"name": name, "role": "reader"})
                self.acked.append(name)
            except CtlError as exc:
                self.errors.append(f"{name}: {exc}")
            time.sleep(0.05)


class Fetcher(threading.Thread):
    """Fetches the other instances' pages from inside the first one, over the overlay."""

    def __init__(self, lab: LabCluster, instances: list[dict[str, Any]]) -> None:
        super().__init__(daemon=True)
        self.lab, self.source, self.targets = lab, instances[0], instances[1:]
        self.ok = 0
        self.failed: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for t in self.targets:
                got = self.lab.in_instance(self.source, "timeout", "3", "wget", "-qO-",
                                           f"http://{t['ip']}:8080")
                if t["name"] in got.stdout:
                    self.ok += 1
                else:
                    self.failed.append(f"{time.monotonic():.1f} {t['name']}: "
                                       f"{got.returncode} {got.stdout!r} {got.stderr!r}")


def heartbeat_lease(lab: LabCluster, node: str) -> int:
    """The lease of `node`'s heartbeat key (0: none): a new agent takes a new one."""
    async def read() -> int:
        store = lab.etcd()
        try:
            item = await store.get_raw(store.keys.heartbeat(node))
        finally:
            await store.close()
        return item.lease if item is not None else 0

    return asyncio.run(read())


def ready(lab: Lab, node: str) -> bool:
    return node in (services.ready_nodes(lab.server, lab.token, lab.ca) or set())


def roles(lab: Lab) -> dict[str, str]:
    return services.master_roles(lab.masters, lab.token, lab.ca)


def restart_master(lab: Lab, listen: str, sigmad: str = "") -> None:
    """Restart one master (with `sigmad`: that executable) and wait for a leader and a
    standby again."""
    lab.restart_master(listen, sigmad)
    wait_for(lambda: sorted(roles(lab).values()) == ["leader", "standby"], 30,
             "a leader and a standby again")


def restart_agent(pair: LabCluster, node: str, sigmad: str = "") -> None:
    """Restart one host's agent (with `sigmad`: that executable) and wait for its new
    heartbeat and the node Ready."""
    old = heartbeat_lease(pair, node)
    pair.lab.restart_agent(node, sigmad)
    wait_for(lambda: heartbeat_lease(pair, node) not in (0, old), 30,
             f"{node}'s new agent's heartbeat")
    wait_for(functools.partial(ready, pair.lab, node), 30, f"{node} Ready again")


def restart_all(pair: LabCluster, sigmad: str = "",
                between: Any = None) -> list[str]:
    """The standby master, the leader, then each agent, one at a time (with `sigmad`: that
    executable); `between()` runs after the masters, before the agents. The phases with
    their times."""
    lab = pair.lab
    phases = [f"{time.monotonic():.1f} start"]
    now = roles(lab)
    order = sorted(now, key=lambda listen: now[listen] == "leader")  # standby first
    assert [now[listen] for listen in order] == ["standby", "leader"]
    for listen in order:
        phases.append(f"{time.monotonic():.1f} master {listen}")
        restart_master(lab, listen, sigmad)
    if between is not None:
        phases.append(f"{time.monotonic():.1f} masters done")
        between()
    for h in lab.hosts:
        phases.append(f"{time.monotonic():.1f} agent {h.name}")
        restart_agent(pair, h.name, sigmad)
    phases.append(f"{time.monotonic():.1f} done")
    return phases


def under_load_nothing_lost(pair: LabCluster, sigmad: str = "", between: Any = None) -> None:
    """A 3-instance web app (one per host); `restart_all` under the Writer and the Fetcher;
    then: every acknowledged write is there, every fetch answered, no instance moved or
    restarted (same node, IP, container, restart count, StartedAt)."""
    app = f"rr{uuid.uuid4().hex[:6]}"
    pair.apply(web(pair, app, 3, placement={"spread": "host"}))
    before = {i["name"]: i for i in pair.running(app, 3)}
    started = {i["containers"][0]["id"]: pair.docker(i["node"], "inspect", "-f",
                                                      "{{.State.StartedAt}}",
                                                      i["containers"][0]["id"]).stdout
               for i in before.values()}
    writer, fetcher = Writer(pair.lab), Fetcher(pair, sorted(before.values(),
                                                             key=lambda i: i["name"]))
    writer.start()
    fetcher.start()
    try:
        time.sleep(1)
        phases = restart_all(pair, sigmad, between)
        time.sleep(2)
    finally:
        writer.stop.set()
        fetcher.stop.set()
        writer.join(20)
        fetcher.join(20)

    listed = {t["name"] for t in writer.client.get("/v1/tokens")["items"]}
    assert set(writer.acked) <= listed, set(writer.acked) - listed  # nothing acknowledged lost
    assert len(writer.acked) > 20 and len(writer.errors) <= 2, writer.errors
    assert fetcher.ok > 10 and not fetcher.failed, (fetcher.failed, phases)
    after = {i["name"]: i for i in pair.running(app, 3)}
    events = pair.ctl("events", "--limit", "200").stdout
    assert {n: (i["node"], i["ip"], i["containers"][0]["id"], i["restarts"])
            for n, i in after.items()} == \
        {n: (i["node"], i["ip"], i["containers"][0]["id"], i["restarts"])
         for n, i in before.items()}, (phases, events)
    for i in after.values():
        cid = i["containers"][0]["id"]
        assert pair.docker(i["node"], "inspect", "-f", "{{.State.StartedAt}}",
                           cid).stdout == started[cid]  # not restarted
    pair.delete(app)
