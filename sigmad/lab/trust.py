"""The lab's TLS (on unless `--no-tls`): a CA under DIR/pki, certificates for its etcd, masters,
agents and engines, and etcd's users (each agent may write only its own node keys).

What it sets up is what a production cluster runs (docs in README "TLS"): etcd serves https
only with --client-cert-auth, each dockerd serves tcp://ADDRESS:2376 with --tlsverify, the
masters' API is HTTPS; so every lab test goes through it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from sigmad.errors import SigmaError
from sigmad.etcd_access import plan
from sigmad.lab.config import LabConfig, LabError
from sigmad.lab.state import HostState
from sigmad.pki import PkiError, init_ca, issue
from sigmad.store import EtcdStore, Keys
from sigmad.tls import TlsFiles

ENGINE_PORT = 2376  # Docker's port for TLS


def pki_dir(root: Path) -> Path:
    return root / "pki"


def _files(root: Path, stem: str) -> TlsFiles:
    d = pki_dir(root)
    return TlsFiles(str(d / "ca.crt"), str(d / f"{stem}.crt"), str(d / f"{stem}.key"))


def ca_file(root: Path) -> str:
    return str(pki_dir(root) / "ca.crt")


def etcd_name(config: LabConfig) -> str:
    return f"lab-{config.name}"


def make_pki(config: LabConfig, hosts: list[HostState]) -> None:
    """The CA and every certificate of the lab (a fresh CA: the lab is new)."""
    root, d = config.root, pki_dir(config.root)
    listen_hosts = sorted({m.rpartition(":")[0] for m in config.master_listens} |
                          {"127.0.0.1", "localhost"})
    try:
        init_ca(d, force=True, name=f"sigma lab {config.name}")
        issue(d, "etcd", etcd_name(config), ("127.0.0.1", "localhost", config.bridge_ip))
        issue(d, "root")
        for i in range(1, config.masters + 1):
            issue(d, "master", f"m{i}", tuple(listen_hosts))
        for host in hosts:
            issue(d, "node", host.name, (host.address,))
    except PkiError as exc:
        raise LabError(f"cannot make the lab's certificates in {root}: {exc}") from None


def etcd_tls(config: LabConfig) -> tuple[TlsFiles, TlsFiles]:
    """etcd's server and peer files."""
    name = etcd_name(config)
    return (_files(config.root, f"etcd-{name}-server"), _files(config.root, f"etcd-{name}-peer"))


def master_etcd(root: Path, index: int) -> TlsFiles:
    return _files(root, f"master-m{index}-etcd")


def master_sections(root: Path, index: int) -> dict[str, Any]:
    """The TLS parts of master `index`'s config: its API's certificate, its engine client."""
    api, engine = _files(root, f"master-m{index}-api"), _files(root, f"master-m{index}-engine")
    return {"tls": {"cert": api.cert, "key": api.key},
            "engine_tls": {"ca": engine.ca, "cert": engine.cert, "key": engine.key}}


def node_files(root: Path, host: str) -> TlsFiles:
    """The agent's client files (etcd user sigma-node-HOST; its engine's client)."""
    return _files(root, f"node-{host}")


def dockerd_args(root: Path, host: HostState) -> tuple[str, ...]:
    """dockerd's TLS listener on the host's address, client certificates required."""
    server = _files(root, f"engine-{host.name}")
    return ("-H", f"tcp://{host.address}:{ENGINE_PORT}", "--tlsverify",
            "--tlscacert", server.ca, "--tlscert", server.cert, "--tlskey", server.key)


def engine_url(host: HostState) -> str:
    return f"tcp://{host.address}:{ENGINE_PORT}"


def section(files: TlsFiles) -> dict[str, str]:
    """`files` as a config's ca, cert and key."""
    return {"ca": files.ca, "cert": files.cert, "key": files.key}


def setup_access(config: LabConfig, endpoint: str, prefix: str, hosts: list[str]) -> list[str]:
    """Make etcd's users and roles and enable auth, as root; the steps taken."""
    root = _files(config.root, "root")

    async def apply() -> list[str]:
        store = EtcdStore([endpoint], prefix, retry_for=10.0, tls=root)
        try:
            return await store.apply_access(plan(Keys(prefix), hosts))
        finally:
            await store.close()

    try:
        return asyncio.run(apply())
    except (SigmaError, ValueError, OSError) as exc:
        raise LabError(f"cannot set up etcd's users: {getattr(exc, 'message', exc)}") from None
