"""Real etcd and real dockerd for the integration tests, started by the test session.

dockerd runs in a network namespace of its own, so its bridge and iptables rules touch
nothing else on the machine; its socket is a file, so the master reaches it from here.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from sigmad.procs import DockerdProcess, EtcdProcess

REPO = Path(__file__).resolve().parents[2]
IMAGE = "sigma/busybox:latest"
# A /30 on a veth pair between this namespace and the test engine's: the test host's address
# (one subnet per test session, so sessions running side by side do not clash).
HOST_GATEWAY, HOST_ADDRESS = (f"10.199.{os.getpid() % 250}.{n}" for n in (1, 2))
T = TypeVar("T")


def free_port(pair: bool = False) -> int:
    """A free TCP port (with the next one free too when `pair`: etcd's peer port)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("0.0.0.0", 0))
            port = int(s.getsockname()[1])
        if not pair:
            return port
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port + 1))
                return port
            except OSError:
                continue
    raise AssertionError("no free port pair")


def call_api(url: str, method: str, token: str | None, body: str | None = None,
             timeout: float = 10) -> tuple[int, Any]:
    """(status, JSON body) of one call to a master's API (OSError if it does not answer)."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    req = urllib.request.Request(url, method=method, headers=headers,
                                 data=body.encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    """Send `sig` to a process we started and reap it (SIGKILL after 20 s)."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for(check: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll `check` until it returns something truthy; bounded by `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def start_etcd(root: Path) -> EtcdProcess:
    """etcd on 127.0.0.1 and on the veth's address, where agents in the test host reach it
    (the `underlay` fixture must be up)."""
    etcd = EtcdProcess(root, free_port(), free_port(), name="test", hosts=(HOST_GATEWAY,))
    etcd.start()
    asyncio.run(etcd.wait_ready())
    return etcd


@pytest.fixture(scope="session")
def underlay() -> Iterator[str]:
    """The test host's network namespace, joined to this one by a veth pair (a /30)."""
    if os.geteuid() != 0:
        pytest.skip("integration tests make network namespaces and need root")
    netns = f"sigmat{os.getpid()}"
    host_side = f"{netns}h"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    inside = ["nsenter", f"--net=/var/run/netns/{netns}"]
    try:
        for cmd in (
            [*inside, "ip", "link", "set", "lo", "up"],
            ["ip", "link", "add", host_side, "type", "veth", "peer", "name", "eth0", "netns",
             netns],
            ["ip", "addr", "add", f"{HOST_GATEWAY}/30", "dev", host_side],
            ["ip", "link", "set", host_side, "up"],
            [*inside, "ip", "addr", "add", f"{HOST_ADDRESS}/30", "dev", "eth0"],
            [*inside, "ip", "link", "set", "eth0", "up"],
            [*inside, "ip", "route", "add", "default", "via", HOST_GATEWAY],
        ):
            subprocess.run(cmd, check=True)
        yield netns
    finally:
        subprocess.run(["ip", "link", "del", host_side], check=False)
        subprocess.run(["ip", "netns", "del", netns], check=False)


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory, underlay: str) -> Iterator[EtcdProcess]:
    proc = start_etcd(tmp_path_factory.mktemp("etcd"))
    yield proc
    proc.stop()


class EngineHost:
    """The test session's dockerd and the namespace it lives in."""

    def __init__(self, proc: DockerdProcess, netns: str, address: str) -> None:
        self.proc = proc
        self.netns = netns
        self.url = proc.url
        self.address = address  # the test host's IP, reachable from the root namespace

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", "-H", self.url, *args], capture_output=True, text=True, check=check,
            timeout=60,
        )

    def inspect(self, container_id: str) -> dict[str, Any]:
        return json.loads(self.docker("inspect", container_id).stdout)[0]  # type: ignore[no-any-return]

    def sigma_containers(self, app: str | None = None) -> list[str]:
        label = f"sigma.app={app}" if app else "sigma.instance"
        out = self.docker("ps", "-aq", "--no-trunc", "--filter", f"label={label}").stdout
        return out.split()

    def fetch(self, url: str) -> str:
        """An HTTP GET from inside the engine's network namespace."""
        result = subprocess.run(
            # busybox wget's own -T crashes (Debian 12); `timeout` bounds it instead.
            ["nsenter", f"--net=/var/run/netns/{self.netns}", "timeout", "5", "busybox", "wget",
             "-qO-", url], capture_output=True, text=True, timeout=10,
        )
        return result.stdout

    def clean(self) -> None:
        ids = self.sigma_containers()
        if ids:
            self.docker("rm", "-f", *ids, check=False)


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory, underlay: str) -> Iterator[EngineHost]:
    netns = underlay
    exec_root = Path(f"/run/{netns}")
    proc = DockerdProcess(tmp_path_factory.mktemp("docker"), exec_root, netns=netns)
    proc.start()
    try:
        asyncio.run(proc.wait_ready())
        subprocess.run([str(REPO / "scripts" / "build-image.sh"), proc.url, IMAGE], check=True,
                       capture_output=True, timeout=120)
        eng = EngineHost(proc, netns, HOST_ADDRESS)
        yield eng
        eng.clean()
    finally:
        proc.stop()
        shutil.rmtree(exec_root, ignore_errors=True)


class Cluster:
    """A master and a node agent (real processes) on a fresh key prefix of a real etcd."""

    def __init__(self, root: Path, etcd: EtcdProcess, engine: EngineHost) -> None:
        self.root = root
        self.engine = engine
        self.etcd = etcd
        self.port = free_port()
        self.server = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_hex(16)
        self.prefix = f"/sigma-test/{uuid.uuid4().hex[:8]}"
        self.node_name = "node-1"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.write_configs()
        self.env = {
            **os.environ, "SIGMA_SERVER": self.server, "SIGMA_TOKEN": self.token,
            "SIGMA_CREDENTIALS": str(root / "no-credentials.json"),
        }

    def write_configs(self) -> None:
        etcd = {"endpoints": [self.etcd.endpoint], "prefix": self.prefix}
        (self.root / "master.yaml").write_text(yaml.safe_dump({
            "listen": f"127.0.0.1:{self.port}", "token": self.token, "etcd": etcd,
            "reconcile_interval": 1,
        }))
        # The agent runs in the test host's namespace (its netlink work happens there).
        etcd = {"endpoints": [self.etcd.endpoints[-1]], "prefix": self.prefix}
        (self.root / "node.yaml").write_text(yaml.safe_dump({
            "name": self.node_name, "engine": self.engine.url, "labels": {"zone": "room-a"},
            "address": self.engine.address, "port_range": [31000, 31009],
            "heartbeat_ttl": 2, "etcd": etcd,
        }))

    def _start(self, role: str) -> None:
        log = open(self.root / f"{role}.log", "ab")  # noqa: SIM115 - closed with the process
        inside = ["nsenter", f"--net=/var/run/netns/{self.engine.netns}"] if role == "node" \
            else []
        self.procs[role] = subprocess.Popen(
            [*inside, sys.executable, "-m", "sigmad", role, "--config",
             str(self.root / f"{role}.yaml")],
            stdout=log, stderr=subprocess.STDOUT, env=self.env,
        )
        log.close()

    def start_master(self) -> None:
        self._start("master")
        wait_for(self._healthy, 20, "the master's API")

    def start_node(self) -> None:
        self._start("node")

    def stop(self, role: str, sig: int = signal.SIGTERM) -> None:
        stop_process(self.procs.pop(role, None), sig)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.server}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def api(self, method: str, path: str, body: str | None = None,
            token: str | None = "default") -> tuple[int, Any]:
        return call_api(f"{self.server}{path}", method,
                        self.token if token == "default" else token, body)

    def ctl(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sigmactl", *args], capture_output=True, text=True,
            env=self.env, input=stdin, timeout=120,
        )

    def apply(self, text: str) -> None:
        result = self.ctl("apply", "-f", "-", stdin=text)
        assert result.returncode == 0, result.stderr

    def instances(self, app: str | None = None) -> list[dict[str, Any]]:
        status, body = self.api("GET", "/v1/instances" + (f"?app={app}" if app else ""))
        assert status == 200, body
        return body["items"]  # type: ignore[no-any-return]

    def wait_running(self, app: str, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        def ready() -> list[dict[str, Any]] | None:
            items = self.instances(app)
            running = [i for i in items if i["state"] == "Running"]
            return items if len(items) == count and len(running) == count else None

        return wait_for(ready, timeout, f"{count} Running instances of {app} "
                        f"(master log: {self.root / 'master.log'})")

    def close(self) -> None:
        for role in list(self.procs):
            self.stop(role)
        self.engine.clean()


@pytest.fixture
def cluster(tmp_path: Path, etcd: EtcdProcess, engine: EngineHost) -> Iterator[Cluster]:
    c = Cluster(tmp_path, etcd, engine)
    c.start_master()
    c.start_node()
    yield c
    c.close()


HTTPD = ("mkdir -p /www && echo hello from $SIGMA_INSTANCE > /www/index.html && "
         "exec httpd -f -p 8080 -h /www")


def web_spec(replicas: int = 2, app: str = "web", script: str = HTTPD, **extra: Any) -> str:
    """The example httpd app (or another shell `script`), with any top-level overrides."""
    spec: dict[str, Any] = {
        "app": app, "replicas": replicas,
        "containers": [{
            "name": "main", "image": IMAGE, "command": ["sh", "-c", script],
            "resources": {"request": {"cpu": "100m", "memory": "64Mi"},
                          "limit": {"cpu": "500m", "memory": "128Mi"}},
        }],
    }
    spec.update(extra)
    return yaml.safe_dump(spec)


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One 3-host lab (tests.integration.labkit) for every lab test of the session; each
    test removes its apps and heals what it broke."""
    if os.geteuid() != 0:
        pytest.skip("the lab needs root")
    from tests.integration.labkit import LabCluster, build_lab  # it imports this module

    root = tmp_path_factory.mktemp("lab")
    built = build_lab(root)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SIGMA_CREDENTIALS", str(root / "credentials.json"))  # not the user's
        try:
            built.up()
            yield LabCluster(built, root)
        finally:
            built.down()
