"""sigmactl follows the HA pair, and scoped tokens hold across it, on a real lab with
`--masters 2` (real etcd, dockerd, masters and agent), through the real command lines:
`sigmad lab up` writes a context naming both masters; a reader token cannot apply; a token
revoked through one master is refused by the other; every change is in the audit log; once
the first master is SIGKILLed, sigmactl still works through the second and says so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import REPO, free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


class PairLab:
    """`sigmad lab` with two masters, and `sigmactl` with the credentials `up` wrote."""

    def __init__(self, tmp_path: Path) -> None:
        self.name = f"tp{os.getpid() % 0x100000:x}"[:8]
        self.dir = tmp_path / "lab"
        self.subnet = f"10.76.{os.getpid() % 250}.0/24"
        self.credentials = tmp_path / "credentials.json"
        self.env = {**os.environ, "SIGMA_CREDENTIALS": str(self.credentials),
                    "PYTHONPATH": str(REPO)}
        for name in ("SIGMA_SERVER", "SIGMA_TOKEN", "SIGMA_CONTEXT"):
            self.env.pop(name, None)

    def lab(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sigmad", "lab", *args, "--name", self.name,
             "--dir", str(self.dir)], capture_output=True, text=True, env=self.env,
            timeout=timeout)

    def ctl(self, *args: str, stdin: str | None = None, token: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        env = {**self.env, **({"SIGMA_TOKEN": token} if token else {})}
        return subprocess.run([sys.executable, "-m", "sigmactl", *args], input=stdin,
                              capture_output=True, text=True, env=env, timeout=60)

    def ok(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        done = self.ctl(*args, stdin=stdin)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done

    def status(self) -> dict[str, Any]:
        done = self.lab("status", "-o", "json", timeout=30)
        assert done.returncode == 0, done.stderr
        report: dict[str, Any] = json.loads(done.stdout)
        return report


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[PairLab]:
    if os.geteuid() != 0:
        pytest.skip("sigmad lab needs root")
    run = PairLab(tmp_path)
    try:
        yield run
    finally:
        run.lab("down", timeout=120)


def spec(image: str, app: str, namespace: str = "default") -> str:
    return json.dumps({"app": app, "namespace": namespace, "replicas": 1, "containers": [{
        "name": "main", "image": image, "command": ["sleep", "3600"],
        "resources": {"request": {"cpu": "10m", "memory": "8Mi"}}}]})


def test_sigmactl_follows_the_pair_and_tokens_hold_across_it(pair: PairLab) -> None:
    up = pair.lab("up", "--hosts", "1", "--masters", "2", "--subnet", pair.subnet,
                  "--etcd-port", str(free_port(pair=True)), "--registry-port", str(free_port()),
                  "--listen", f"127.0.0.1:{free_port(pair=True)}", timeout=240)
    assert up.returncode == 0, up.stdout + up.stderr
    status = pair.status()
    scheme = status["server"].partition("://")[0]
    assert scheme == "https"  # the lab runs TLS by default: failover is over HTTPS
    first, second = (f"{scheme}://{m['listen']}" for m in status["masters"])
    creds = json.loads(pair.credentials.read_text())
    context = creds["contexts"][creds["current-context"]]
    assert creds["current-context"] == f"lab-{pair.name}"
    assert context["servers"] == [first, second]

    def both() -> subprocess.CompletedProcess[str] | None:  # the standby registers in turn
        listed = pair.ok("get", "masters", "-o", "json")
        return listed if len(json.loads(listed.stdout)) == 2 else None

    masters = wait_for(both, 30, "both masters listed")
    assert "did not answer" not in masters.stderr

    # a reader reads, and cannot apply; an operator of ns a cannot touch ns b
    reader = pair.ok("token", "create", "viewer", "--role", "reader").stdout.strip()
    operator = pair.ok("token", "create", "team-a", "--role", "operator", "-n", "a"
                       ).stdout.strip()
    assert pair.ctl("get", "nodes", token=reader).returncode == 0
    refused = pair.ctl("apply", "-f", "-", stdin=spec(status["image"], "web"), token=reader)
    assert refused.returncode == 1 and "read-only" in refused.stderr
    refused = pair.ctl("apply", "-f", "-", stdin=spec(status["image"], "web", "b"),
                       token=operator)
    assert refused.returncode == 1 and "not 'b'" in refused.stderr
    applied = pair.ctl("apply", "-f", "-", stdin=spec(status["image"], "web", "a"),
                       token=operator)
    assert applied.returncode == 0, applied.stderr

    # revoked through the first master: the second refuses it too (it learns through etcd)
    listed = json.loads(pair.ok("token", "list", "-o", "json").stdout)
    viewer = next(t["id"] for t in listed if t["name"] == "viewer")
    assert reader not in json.dumps(listed) and operator not in json.dumps(listed)
    pair.ok("token", "revoke", viewer)
    wait_for(lambda: pair.ctl("--server", second, "get", "nodes", token=reader
                              ).returncode == 1, 10, "the second master refusing the token")
    assert "revoked" in pair.ctl("--server", second, "get", "nodes", token=reader).stderr

    audit = json.loads(pair.ok("audit", "-o", "json").stdout)
    seen = {(e["name"], e["method"], e["status"], tuple(e["apps"])) for e in audit}
    # (a reader's apply is refused before its body is read: no apps named)
    assert {("viewer", "PUT", 403, ()), ("team-a", "PUT", 403, ("b/web",)),
            ("team-a", "PUT", 200, ("a/web",))} <= seen

    # the first master dies: sigmactl goes on through the second and says so
    os.kill(status["masters"][0]["pid"], signal.SIGKILL)
    wait_for(lambda: not pair.status()["masters"][0]["alive"], 10, "the first master gone")
    nodes = pair.ok("get", "nodes", "-o", "json")
    assert [n["name"] for n in json.loads(nodes.stdout)] == ["h1"]
    assert f"sigmactl: {first} (" in nodes.stderr
    assert nodes.stderr.strip().endswith(f"did not answer: using {second}")
    applied = pair.ok("apply", "-f", "-", stdin=spec(status["image"], "db"))
    assert "app default/db created" in applied.stdout
    assert f"using {second}" in applied.stderr
    apps = json.loads(pair.ok("get", "apps", "-o", "json").stdout)
    assert sorted(a["app"] for a in apps) == ["db", "web"]

    down = pair.lab("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert not pair.credentials.exists()  # its context removed, and the file with it
