"""What `sigmad lab up` checks before it creates anything."""

from __future__ import annotations

import shutil

from sigmad.lab import net, system
from sigmad.lab.config import RUN_ROOT, LabConfig, LabError
from sigmad.lab.state import STATE_FILE


def check(cfg: LabConfig) -> None:
    """Refuse to build over anything that exists: a lab, names, a busy subnet or port."""
    cfg.validate()
    if (cfg.root / STATE_FILE).exists():
        raise LabError(f"a lab named {cfg.name} exists ({cfg.root / STATE_FILE}): "
                       f"run 'sigmad lab down --name {cfg.name}' first")
    if cfg.root.exists() and any(cfg.root.iterdir()):
        raise LabError(f"{cfg.root} exists and is not empty: choose another --dir")
    tools = ("ip", "nsenter", "dockerd", "docker", "etcd", "docker-registry")
    for tool in (*tools, *(("losetup", "mkfs.ext4", "blkid") if cfg.ssds else ())):
        if shutil.which(tool) is None:
            raise LabError(f"`{tool}` is not installed")
    names = [cfg.bridge, *(f"{cfg.name}-h{i}" for i in range(1, cfg.hosts + 1))]
    for link in names:
        if net.link_exists(link) or net.netns_exists(link):
            raise LabError(f"{link} already exists (a link or netns): another lab named "
                           f"{cfg.name}? run 'sigmad lab down --name {cfg.name}' or pick "
                           "another --name")
    for i in range(1, cfg.hosts + 1):
        exec_root = RUN_ROOT / f"{cfg.name}-h{i}"
        if exec_root.exists() and any(exec_root.iterdir()):
            raise LabError(f"{exec_root} exists and is not empty (left by an earlier lab?)")
    used = net.addresses_in(cfg.subnet)
    if used:
        raise LabError(f"--subnet {cfg.subnet} is in use here ({'; '.join(used)})")
    masters = [("--listen" if i == 0 else f"--listen (master {i + 1} takes the next port)",
                (listen.rpartition(":")[0], int(listen.rpartition(":")[2])))
               for i, listen in enumerate(cfg.master_listens)]
    for option, addr in (("--etcd-port", ("127.0.0.1", cfg.etcd_port)),
                         ("--etcd-port (its peer port is the next one)",
                          ("127.0.0.1", cfg.etcd_port + 1)),
                         ("--registry-port", ("0.0.0.0", cfg.registry_port)),
                         *masters):
        if not system.port_free(*addr):
            raise LabError(f"{option}: port {addr[1]} is in use here")
