"""`sigmad dev`: etcd child + master + agent in one command; Ctrl-C stops all; state survives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.integration.conftest import EngineHost, free_port, wait_for, web_spec


def _dev(tmp_path: Path, engine: EngineHost, port: int, etcd_port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SIGMA_CREDENTIALS": str(tmp_path / "creds.json")}
    env.pop("SIGMA_SERVER", None)
    env.pop("SIGMA_TOKEN", None)
    return subprocess.Popen(
        [sys.executable, "-m", "sigmad", "dev", "--data-dir", str(tmp_path / "dev"),
         "--listen", f"127.0.0.1:{port}", "--engine", engine.url,
         "--etcd-port", str(etcd_port), "--name", "devnode"],
        stdout=open(tmp_path / "dev.log", "ab"), stderr=subprocess.STDOUT, env=env,
    )


def _ports() -> tuple[int, int]:
    """The API port and etcd's client port; `sigmad dev` takes the next one as etcd's peer port."""
    etcd_port = free_port(pair=True)
    port = free_port()
    while port in (etcd_port, etcd_port + 1):
        port = free_port()
    return port, etcd_port


def _alive(proc: subprocess.Popen[bytes], tmp_path: Path) -> bool:
    """True while `sigmad dev` runs; its log in the failure when it has exited."""
    if proc.poll() is not None:
        log = (tmp_path / "dev.log").read_text(errors="replace")[-3000:]
        raise AssertionError(f"sigmad dev exited with {proc.returncode}:\n{log}")
    return True


def _ctl(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SIGMA_CREDENTIALS": str(tmp_path / "creds.json")}
    env.pop("SIGMA_SERVER", None)
    env.pop("SIGMA_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "sigmactl", *args], capture_output=True,
                          text=True, env=env, timeout=60)


def _dev_token(tmp_path: Path) -> str:
    """The token of the credentials context `sigmad dev` writes (and makes current)."""
    creds = json.loads((tmp_path / "creds.json").read_text())
    assert creds["current-context"] == "dev"
    assert len(creds["contexts"]["dev"]["servers"]) == 1
    return str(creds["contexts"]["dev"]["token"])


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGINT)
    return proc.wait(30)


def test_dev_runs_everything_and_keeps_state(tmp_path: Path, engine: EngineHost) -> None:
    port, etcd_port = _ports()
    proc = _dev(tmp_path, engine, port, etcd_port)
    try:
        creds = wait_for(lambda: _alive(proc, tmp_path) and (tmp_path / "creds.json").exists(),
                         30, "credentials file")
        assert creds
        token = _dev_token(tmp_path)

        def node_ready() -> bool:
            out = _ctl(tmp_path, "get", "nodes", "-o", "json")
            return out.returncode == 0 and [n["status"] for n in json.loads(out.stdout)] == \
                ["Ready"]

        wait_for(node_ready, 30, "the dev node Ready")
        applied = subprocess.run(
            [sys.executable, "-m", "sigmactl", "apply", "-f", "-"], input=web_spec(1),
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "SIGMA_CREDENTIALS": str(tmp_path / "creds.json")},
        )
        assert applied.returncode == 0, applied.stderr

        def running() -> bool:
            out = _ctl(tmp_path, "get", "instances", "-o", "json")
            return out.returncode == 0 and [i["state"] for i in json.loads(out.stdout)] == \
                ["Running"]

        wait_for(running, 60, "web-0 Running under sigmad dev")
        assert _stop(proc) == 0
        etcd_pid = wait_for(lambda: _etcd_gone(tmp_path), 10, "the etcd child stopped")
        assert etcd_pid

        proc = _dev(tmp_path, engine, port, etcd_port)
        wait_for(node_ready, 30, "the dev node Ready after a restart")
        assert _dev_token(tmp_path) == token
        out = _ctl(tmp_path, "get", "apps", "-o", "json")
        assert [a["app"] for a in json.loads(out.stdout)] == ["web"]
        wait_for(running, 30, "web-0 still Running after a restart")
    finally:
        if proc.poll() is None:
            _stop(proc)
        engine.clean()


def _etcd_gone(tmp_path: Path) -> bool:
    data_dir = str(tmp_path / "dev" / "etcd")
    out = subprocess.run(["pgrep", "-f", data_dir], capture_output=True, text=True)
    return out.stdout.strip() == ""
