"""The lab as the tests use it: one 3-host lab per test session, sigmactl and engine helpers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from sigmad.lab import Lab, LabConfig, trust
from sigmad.lab.services import PREFIX
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
        def check() -> list[dict[str, Any]] | None:
            items = self.instances(app)
            ok = len(items) == count and all(i["state"] == "Running" for i in items)
            return items if ok else None

        return wait_for(check, timeout, f"{count} Running instances of {app}", 0.1)

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


def build_lab(root: Path) -> Lab:
    """A 3-host lab on addresses and ports of its own (heartbeat TTL 2 s)."""
    return Lab(LabConfig(
        hosts=3, name=f"o{os.getpid() % 100000}", dir=root / "lab",
        subnet=f"10.79.{os.getpid() % 250}.0/24", etcd_port=free_port(pair=True),
        registry_port=free_port(), listen=f"127.0.0.1:{free_port()}", heartbeat_ttl=2,
    ))
