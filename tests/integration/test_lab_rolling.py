"""A rolling restart of a lab with an HA pair of masters, as an upgrade does it: the standby
master, then the leader, then each host's agent, one at a time, while a client keeps writing
through the API (following the pair) and an instance keeps fetching from the others over the
overlay. Nothing acknowledged is lost, no instance is restarted or moved.

The lab's heartbeat TTL is 5 s (the default): an agent restart takes 1 to 2 s here, and a TTL
shorter than a restart lets the node's lease lapse, which fences its instances
(docs/operations.md, Upgrade)."""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sigmactl.client import Client, CtlError
from sigmad import schema
from sigmad.lab import Lab, LabConfig, services
from sigmad.lab.net import inside
from tests.integration.conftest import REPO, free_port, wait_for
from tests.integration.labkit import HOST_CPU, HOST_MEMORY, LabCluster, web

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabCluster]:
    root = tmp_path_factory.mktemp("rolling")
    lab = Lab(LabConfig(
        hosts=3, masters=2, name=f"rr{os.getpid() % 100000}", dir=root / "lab",
        subnet=f"10.75.{os.getpid() % 250}.0/24", etcd_port=free_port(pair=True),
        registry_port=free_port(), listen=f"127.0.0.1:{free_port(pair=True)}",
        heartbeat_ttl=5, cpu=HOST_CPU, memory=HOST_MEMORY,
    ))
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
        while not self.stop.is_set():
            name = f"roll-{n}"
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


def test_rolling_restart_of_masters_then_agents_loses_nothing(pair: LabCluster) -> None:
    lab = pair.lab
    app = f"rr{uuid.uuid4().hex[:6]}"
    pair.apply(web(pair, app, 3, placement={"spread": "host"}))
    before = {i["name"]: i for i in pair.running(app, 3)}
    started = {i["containers"][0]["id"]: pair.docker(i["node"], "inspect", "-f",
                                                      "{{.State.StartedAt}}",
                                                      i["containers"][0]["id"]).stdout
               for i in before.values()}
    writer, fetcher = Writer(lab), Fetcher(pair, sorted(before.values(),
                                                        key=lambda i: i["name"]))
    phases = [f"{time.monotonic():.1f} start"]
    writer.start()
    fetcher.start()
    try:
        time.sleep(1)
        now = roles(lab)
        order = sorted(now, key=lambda listen: now[listen] == "leader")  # standby first
        assert [now[listen] for listen in order] == ["standby", "leader"]
        for listen in order:
            phases.append(f"{time.monotonic():.1f} master {listen}")
            lab.restart_master(listen)
            wait_for(lambda: sorted(roles(lab).values()) == ["leader", "standby"], 30,
                     "a leader and a standby again")
        for h in lab.hosts:
            phases.append(f"{time.monotonic():.1f} agent {h.name}")
            old = heartbeat_lease(pair, h.name)
            lab.restart_agent(h.name)
            wait_for(lambda: heartbeat_lease(pair, h.name) not in (0, old), 30,  # noqa: B023
                     f"{h.name}'s new agent's heartbeat")
            wait_for(functools.partial(ready, lab, h.name), 30, f"{h.name} Ready again")
        phases.append(f"{time.monotonic():.1f} done")
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


def test_check_passes_on_the_labs_masters_and_hosts(pair: LabCluster) -> None:
    """`sigmad master --check` and `sigmad node --check` against real etcd, engines and
    certificates: nothing to fix; the schema is the leader's, version 1."""
    lab = pair.lab
    env = services.sigma_env()
    for m in lab.masters:
        done = subprocess.run([sys.executable, "-m", "sigmad", "master", "--check",
                               "--config", m.config], capture_output=True, text=True,
                              timeout=60, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"ok    schema under /sigma/v1: version {schema.VERSION}" in done.stdout
        assert "WARN  listen" in done.stdout  # the master runs there
    for h in lab.hosts:
        done = subprocess.run([*inside(h.netns), sys.executable, "-m", "sigmad", "node",
                               "--check", "--config", h.node_config], capture_output=True,
                              text=True, timeout=60, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "ok    engine tcp://" in done.stdout and "FAIL" not in done.stdout


@pytest.mark.timeout(900)
def test_the_install_path_on_a_lab_host_offline_then_its_agent_and_a_master_run_it(
        pair: LabCluster, tmp_path: Path) -> None:
    """scripts/install.sh run inside a lab host's own network namespace with no package
    index (the wheel of `make dist` and its pinned dependencies carried in as files, as on a
    host without internet); the installed `sigmad node --check` passes there; that host's
    agent and the standby master are replaced by the installed sigmad (an upgrade): the node
    is Ready again with the same containers running, and the pair has a leader again."""
    lab = pair.lab
    host = lab.hosts[0]
    app = f"ri{uuid.uuid4().hex[:6]}"
    pair.apply(web(pair, app, 3, placement={"spread": "host"}))
    here = {i["containers"][0]["id"] for i in pair.running(app, 3) if i["node"] == host.name}
    assert len(here) == 1

    dist, wheels = tmp_path / "dist", tmp_path / "wheels"
    built = subprocess.run(["make", "-s", "dist", f"DIST={dist}"], capture_output=True,
                           text=True, cwd=REPO, timeout=300)
    assert built.returncode == 0, built.stderr
    [wheel] = dist.glob("sigma_orchestrator-*.whl")
    constraints = tmp_path / "constraints.txt"  # the lock's versions, as install.sh takes them
    constraints.write_text("".join(line.split(" \\")[0].rstrip() + "\n" for line in
                                   (REPO / "requirements.lock").read_text().splitlines()
                                   if "--hash" not in line))
    fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet",
                              "--disable-pip-version-check", "-d", str(wheels),
                              "-c", str(constraints), str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert fetched.returncode == 0, fetched.stderr

    root = tmp_path / "host"
    prefix, bin_dir, etc = root / "opt/sigma", root / "usr/local/bin", root / "etc/sigma"
    installed = subprocess.run(
        [*inside(host.netns), "bash", str(REPO / "scripts/install.sh"), "--wheel", str(wheel),
         "--pip-args", f"--no-index --find-links {wheels}", "--prefix", str(prefix),
         "--bin-dir", str(bin_dir), "--etc-dir", str(etc),
         "--unit-dir", str(root / "etc/systemd/system")],
        capture_output=True, text=True, timeout=300, env=_without_pythonpath())
    assert installed.returncode == 0, installed.stdout + installed.stderr
    sigmad = str(bin_dir / "sigmad")
    checked = subprocess.run([*inside(host.netns), sigmad, "node", "--check", "--config",
                              host.node_config], capture_output=True, text=True, timeout=60,
                             env=_without_pythonpath())
    assert checked.returncode == 0 and "FAIL" not in checked.stdout, \
        checked.stdout + checked.stderr

    old = heartbeat_lease(pair, host.name)
    lab.restart_agent(host.name, sigmad)
    wait_for(lambda: heartbeat_lease(pair, host.name) not in (0, old), 30,
             f"{host.name}'s installed agent's heartbeat")
    wait_for(functools.partial(ready, lab, host.name), 30, f"{host.name} Ready again")
    agent = lab.host(host.name).agent_pid
    assert str(prefix) in Path(f"/proc/{agent}/cmdline").read_text()  # the installed one runs
    assert {i["containers"][0]["id"] for i in pair.running(app, 3)
            if i["node"] == host.name} == here  # its instance kept running, untouched

    now = roles(lab)
    standby = next(listen for listen, role in now.items() if role == "standby")
    lab.restart_master(standby, sigmad)
    wait_for(lambda: sorted(roles(lab).values()) == ["leader", "standby"], 30,
             "a leader and a standby again")
    pid = next(m.pid for m in lab.masters if m.listen == standby)
    assert str(prefix) in Path(f"/proc/{pid}/cmdline").read_text()
    pair.delete(app)


def _without_pythonpath() -> dict[str, str]:
    """This environment without the test's PYTHONPATH: an installed sigmad imports its own."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
