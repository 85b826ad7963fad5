"""The lab as the tests use it: one 3-host lab per test session, sigmactl and engine helpers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sigmad.engine import LABEL_INSTANCE, DockerEngine
from sigmad.errors import EngineError
from sigmad.lab import Lab, LabConfig, trust
from sigmad.lab.services import PREFIX
from sigmad.leader import LeaderRecord
from sigmad.models import Owner
from sigmad.store import EtcdStore
from sigmad.tls import TlsFiles
from tests.integration.conftest import REPO, free_port, wait_for

HTTPD = ("mkdir -p /www && echo hello from $SIGMA_INSTANCE > /www/index.html && "
         "exec httpd -f -p 8080 -h /www")


class LabCluster:
    """The lab, with sigmactl and engine helpers for the tests."""

    def __init__(self, lab: Lab, root: Path) -> None:
        self.lab = lab
        self.env = {**os.environ, "SIGMA_SERVER": lab.server, "SIGMA_TOKEN": lab.token,
                    "SIGMA_CA": lab.ca, "SIGMA_CREDENTIALS": str(root / "none.json"),
                    "PYTHONPATH": str(REPO)}

    def ctl(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sigmactl", *args], capture_output=True,
                              text=True, env=self.env, input=stdin, timeout=120)

    def apply(self, spec: dict[str, Any]) -> None:
        result = self.ctl("apply", "-f", "-", stdin=yaml.safe_dump(spec))
        assert result.returncode == 0, result.stderr

    def delete(self, app: str) -> None:
        result = self.ctl("delete", "app", app, "--wait")
        assert result.returncode == 0, result.stderr

    def instances(self, app: str) -> list[dict[str, Any]]:
        result = self.ctl("get", "instances", "--app", app, "-o", "json")
        assert result.returncode == 0, result.stderr
        return yaml.safe_load(result.stdout)  # type: ignore[no-any-return]

    def running(self, app: str, count: int, timeout: float = 90) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []

        def check() -> list[dict[str, Any]] | None:
            seen[:] = items = self.instances(app)
            ok = len(items) == count and all(i["state"] == "Running" for i in items)
            return items if ok else None

        try:
            return wait_for(check, timeout, f"{count} Running instances of {app}", 0.1)
        except AssertionError as e:
            states = [(i["name"], i["state"], i.get("reason", "")) for i in seen]
            raise AssertionError(f"{e}; instances: {states}") from None

    def docker(self, node: str, *args: str, check: bool = True
               ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["docker", "-H", self.lab.engines[node], *args],
                              capture_output=True, text=True, check=check, timeout=60)

    def in_instance(self, inst: dict[str, Any], *command: str
                    ) -> subprocess.CompletedProcess[str]:
        """Run `command` in the instance's first container."""
        cid = inst["containers"][0]["id"]
        return self.docker(inst["node"], "exec", cid, *command, check=False)

    def fetch(self, inst: dict[str, Any], ip: str) -> str:
        """HTTP GET of IP:8080 from inside `inst` (over the overlay)."""
        return self.in_instance(inst, "timeout", "3", "wget", "-qO-", f"http://{ip}:8080").stdout

    def port_claims(self) -> dict[str, str]:
        """The host-port claims in the lab's etcd: `node/port` → owner instance."""
        async def read() -> dict[str, str]:
            store = self.etcd()
            try:
                claims, _ = await store.scan(store.keys.ports(), Owner)
            finally:
                await store.close()
            return {v.key.removeprefix(store.keys.ports()): v.value.owner for v in claims}

        return asyncio.run(read())

    def etcd(self, tls: TlsFiles | None = None) -> EtcdStore:
        """A store on the lab's etcd: as a master (or as `tls` says) when the lab has TLS."""
        port = self.lab.config.etcd_port
        if not self.lab.ca:
            return EtcdStore([f"http://127.0.0.1:{port}"], PREFIX)
        return EtcdStore([f"https://127.0.0.1:{port}"], PREFIX,
                         tls=tls or trust.master_etcd(self.lab.root, 1))

    def in_host(self, node: str, *command: str) -> str:
        return subprocess.run(
            ["nsenter", f"--net=/var/run/netns/{self.lab.netns[node]}", *command],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout


def web(lab: LabCluster, app: str, replicas: int, **extra: Any) -> dict[str, Any]:
    """An httpd app ("hello from APP-INDEX" on 8080) on the lab's image."""
    return {"app": app, "replicas": replicas, "containers": [{
        "name": "main", "image": lab.lab.image, "command": ["sh", "-c", HTTPD],
        "ready": {"tcp": 8080, "timeout": 20},
        "resources": {"request": {"cpu": "10m", "memory": "8Mi"},
                      "limit": {"memory": "64Mi"}},
    }], **extra}


HOST_CPU = 2000  # millicores of each lab host (the machine's 2 cores: no throttling)
HOST_MEMORY = 4 << 30  # bytes of each lab host


def build_lab(root: Path) -> Lab:
    """A 3-host lab on addresses and ports of its own (heartbeat TTL 2 s), 2 SSDs of 1 GiB
    (loop devices) per host, each host capped at HOST_CPU and HOST_MEMORY."""
    return Lab(LabConfig(
        hosts=3, name=f"o{os.getpid() % 100000}", dir=root / "lab",
        subnet=f"10.79.{os.getpid() % 250}.0/24", etcd_port=free_port(pair=True),
        registry_port=free_port(), listen=f"127.0.0.1:{free_port()}", heartbeat_ttl=2,
        ssds=2, ssd_size=1 << 30, cpu=HOST_CPU, memory=HOST_MEMORY,
    ))


def pair_config(root: Path, name: str, octet: int, heartbeat_ttl: float = 2,
                **extra: Any) -> LabConfig:
    """A 3-host lab with an HA pair of masters on addresses and ports of its own
    (10.OCTET.x.0/24, lab name NAME + pid)."""
    return LabConfig(
        hosts=3, masters=2, name=f"{name}{os.getpid() % 100000}", dir=root / "lab",
        subnet=f"10.{octet}.{os.getpid() % 250}.0/24", etcd_port=free_port(pair=True),
        registry_port=free_port(), listen=f"127.0.0.1:{free_port(pair=True)}",
        heartbeat_ttl=heartbeat_ttl, **extra)


def leader(lab: LabCluster) -> tuple[str, int]:
    """The leading master's API URL, as its etcd record says, and its pid (waits for one,
    bounded)."""
    async def read() -> str:
        store = lab.etcd()
        try:
            found = await store.get(store.keys.leader(), LeaderRecord)
        finally:
            await store.close()
        return found.value.api if found is not None else ""

    api = wait_for(lambda: asyncio.run(read()), 30, "a leader")
    pid = next(m.pid for m in lab.lab.masters
               if api.rstrip("/").endswith(":" + m.listen.rsplit(":", 1)[-1]))
    return api, pid


SAMPLE_EVERY = 0.1  # seconds between two samples of the holders
ANSWER_WITHIN = 0.3  # an engine whose last list is older than this is not answering


@dataclass(frozen=True)
class Holder:
    node: str
    container: str
    instance: str
    ip: str


@dataclass
class Sample:
    at: float  # seconds since sampling began
    holders: list[Holder]
    silent: list[str]  # engines that did not answer (their holders: by process liveness)

    def doubles(self) -> list[str]:
        """Instances and IPs with more than one running holder in this sample."""
        out = []
        for what, count in (("instance", Counter(h.instance for h in self.holders)),
                            ("IP", Counter(h.ip for h in self.holders if h.ip))):
            out += [f"{what} {k} held {n}x: {[h for h in self.holders if k in (h.instance, h.ip)]}"
                    for k, n in count.items() if n > 1]
        return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


@dataclass
class _Engine:
    node: str
    client: DockerEngine
    running: list[Holder] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)  # container → its init process
    listed: float = 0.0  # monotonic time of the last list the engine answered


class Holders:
    """Samples every SAMPLE_EVERY s, from a thread of its own, the running sigma containers
    of every lab engine: each engine is listed by a task of its own, and an engine that does
    not answer (frozen) counts the containers it last listed whose init process still lives.
    Bounded: it stops by itself after `limit` seconds."""

    def __init__(self, engines: dict[str, str], limit: float = 240.0) -> None:
        self.engines = [_Engine(n, DockerEngine(url)) for n, url in engines.items()]
        self.limit = limit
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._listed = threading.Event()  # every engine answered once: sampling began
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Holders:
        """Start sampling, once every engine has answered a first list (bounded)."""
        self._thread.start()
        if not self._listed.wait(30):
            self.__exit__()
            raise AssertionError("the lab's engines did not all answer a first list in 30s")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def doubles(self) -> list[str]:
        """Every sample's doubles (one line each), or [] if none ever had two holders."""
        return [f"at {s.at:.1f}s: {d}" for s in self.samples for d in s.doubles()]

    def holders_of(self, instance: str) -> list[list[Holder]]:
        return [[h for h in s.holders if h.instance == instance] for s in self.samples]

    async def _run(self) -> None:
        listers = [asyncio.create_task(self._list(e)) for e in self.engines]
        began = time.monotonic()
        try:
            while not all(e.listed for e in self.engines):
                if self._stop.is_set() or time.monotonic() - began > 30:
                    return
                await asyncio.sleep(0.01)
            self._listed.set()
            began = time.monotonic()
            while not self._stop.is_set() and time.monotonic() - began < self.limit:
                now = time.monotonic()
                holders: list[Holder] = []
                silent: list[str] = []
                for e in self.engines:
                    if now - e.listed <= ANSWER_WITHIN:
                        holders += e.running
                    else:
                        silent.append(e.node)
                        holders += [h for h in e.running
                                    if h.container not in e.pids or _alive(e.pids[h.container])]
                self.samples.append(Sample(now - began, holders, silent))
                await asyncio.sleep(SAMPLE_EVERY)
        finally:
            for task in listers:
                task.cancel()
            await asyncio.gather(*listers, return_exceptions=True)
            for e in self.engines:
                await e.client.close()

    async def _list(self, e: _Engine) -> None:
        while True:
            try:
                found = await asyncio.wait_for(e.client.containers({LABEL_INSTANCE: ""}), 2.0)
                running = [c for c in found if c.running]
                for c in running:
                    if c.id not in e.pids:
                        state = await asyncio.wait_for(e.client.inspect(c.id), 2.0)
                        if state is not None and state.pid:
                            e.pids[c.id] = state.pid
                e.running = [Holder(e.node, c.id, c.labels[LABEL_INSTANCE], c.ip)
                             for c in running]
                e.listed = time.monotonic()
            except (EngineError, TimeoutError):
                pass  # not answering: the sampler judges its last list by process liveness
            await asyncio.sleep(SAMPLE_EVERY)
