"""`sigmad dev`: etcd child process + master + node agent for the local engine, one command."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from pathlib import Path

from sigmactl import contexts
from sigmad.config import EtcdConfig, MasterConfig, NodeConfig
from sigmad.master import run_master
from sigmad.node.agent import run_agent
from sigmad.procs import EtcdProcess

log = logging.getLogger(__name__)
DEV_CONTEXT = "dev"  # the credentials context `sigmad dev` writes


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
        path = contexts.remember(DEV_CONTEXT, [server], token)
        print(f"sigma dev is up\n  server: {server}\n  token:  {token}\n"
              f"  sigmactl reads both from {path} (context {DEV_CONTEXT})\n"
              f"  etcd:   {etcd.endpoint} "
              f"(data in {etcd.data_dir})\nPress Ctrl-C to stop.", flush=True)
        await asyncio.gather(run_master(master), run_agent(node))
    finally:
        etcd.stop()
