"""`sigmad dev`: etcd child process + master + node agent for the local engine, one command."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from pathlib import Path

from sigmad.config import EtcdConfig, MasterConfig, NodeConfig
from sigmad.master import run_master
from sigmad.node.agent import run_agent
from sigmad.procs import EtcdProcess

log = logging.getLogger(__name__)


def credentials_path() -> Path:
    """Where sigmactl finds the server and token (`$SIGMA_CREDENTIALS` overrides)."""
    return Path(os.environ.get("SIGMA_CREDENTIALS", Path.home() / ".sigma" / "credentials.json"))


def write_credentials(server: str, token: str, ca: str = "") -> Path:
    """The file sigmactl reads: the server, the token and the CA of an https:// server."""
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"server": server, "token": token, **({"ca": ca} if ca else {})}, f)
    return path


def dev_token(data_dir: Path) -> str:
    """The dev cluster's token: made once, then reused so sigmactl keeps working."""
    path = data_dir / "token"
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_hex(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return token


async def run_dev(data_dir: Path, listen: str, engine: str, etcd_port: int, name: str) -> None:
    """Run everything until cancelled; state lives under `data_dir` and survives restarts."""
    data_dir.mkdir(parents=True, exist_ok=True)
    token = dev_token(data_dir)
    etcd = EtcdProcess(data_dir / "etcd", etcd_port, etcd_port + 1, name="sigma-dev")
    etcd.start()
    try:
        await etcd.wait_ready()
        etcd_config = EtcdConfig([etcd.endpoint])
        master = MasterConfig(token=token, listen=listen, etcd=etcd_config, reconcile_interval=2)
        # Published host ports bind every address of this machine; 127.0.0.1 reaches them.
        node = NodeConfig(name=name, engine=engine, address="127.0.0.1", etcd=etcd_config)
        server = f"http://{listen}"
        path = write_credentials(server, token)
        print(f"sigma dev is up\n  server: {server}\n  token:  {token}\n"
              f"  sigmactl reads both from {path}\n  etcd:   {etcd.endpoint} "
              f"(data in {etcd.data_dir})\nPress Ctrl-C to stop.", flush=True)
        await asyncio.gather(run_master(master), run_agent(node))
    finally:
        etcd.stop()
