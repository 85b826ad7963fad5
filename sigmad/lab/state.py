"""DIR/lab.json: what a lab has created so far, written as it goes so `down` can undo a
half-built lab."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sigmad import records
from sigmad.lab.config import RUN_ROOT, LabError, default_dir

STATE_FILE = "lab.json"


@dataclass
class LoopDisk:
    """A test host's SSD: a loop device over a sparse file under the host's directory."""

    file: str
    device: str = ""  # /dev/loopN once attached


@dataclass
class HostState:
    name: str
    netns: str
    veth: str
    address: str
    root: str            # DIR/hI: data root, socket, logs, node.yaml
    engine: str          # unix://DIR/hI/docker.sock
    exec_root: str
    cgroup_parent: str
    cpu_m: int = 0       # the cap of its cgroup parent and its node's capacity (0: none)
    memory: int = 0
    cgroups: list[str] = field(default_factory=list)  # the capped directories `up` made
    dockerd_pid: int = 0
    agent_pid: int = 0
    killed: bool = False
    partitioned: bool = False
    ssds: list[LoopDisk] = field(default_factory=list)  # its loop devices, attached by `up`

    @property
    def socket(self) -> str:
        return self.engine.removeprefix("unix://")

    @property
    def node_config(self) -> str:
        return str(Path(self.root) / "node.yaml")


@dataclass
class EtcdState:
    pid: int
    client_port: int
    peer_port: int
    endpoints: list[str]
    data_dir: str


@dataclass
class RegistryState:
    pid: int
    addr: str
    config: str


@dataclass
class MasterState:
    pid: int
    listen: str
    config: str



def lab_context(name: str) -> str:
    """The credentials context (sigmactl.contexts) a lab's `up` writes: every master's URL."""
    return f"lab-{name}"

@dataclass
class LabState:
    name: str
    dir: str
    subnet: str
    bridge_ip: str
    config: dict[str, Any] = field(default_factory=dict)
    bridge: str | None = None
    iptables_rule: list[str] | None = None   # the args after `iptables -I`
    hosts: list[HostState] = field(default_factory=list)
    etcd: EtcdState | None = None
    registry: RegistryState | None = None
    masters: list[MasterState] = field(default_factory=list)
    image: str = ""
    redis_image: str = ""  # "" when this host has no redis-server
    token: str = ""
    server: str = ""
    credentials: str = ""  # the credentials file `up` wrote
    ca: str = ""           # the lab's CA certificate ("" for a lab without TLS)
    ready: bool = False    # `up` finished

    @property
    def path(self) -> Path:
        return Path(self.dir) / STATE_FILE

    def host(self, name: str) -> HostState:
        for host in self.hosts:
            if host.name == name:
                return host
        names = ", ".join(h.name for h in self.hosts) or "none"
        raise LabError(f"lab {self.name} has no host {name!r} (hosts: {names})")

    def save(self) -> None:
        """Write lab.json atomically (mode 600: it holds the token)."""
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(records.to_dict(self), f, indent=2)
            f.write("\n")
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, root: Path) -> LabState | None:
        """The state under `root`, or None when there is no lab there."""
        try:
            text = (root / STATE_FILE).read_text()
        except FileNotFoundError:
            return None
        try:
            return records.from_dict(cls, json.loads(text))
        except (ValueError, TypeError) as exc:
            raise LabError(f"{root / STATE_FILE} is not a lab state file: {exc}") from None


def span(hosts: list[HostState]) -> str:
    """`h1..h3` (or `h1`) for progress lines."""
    if not hosts:
        return "no hosts"
    return hosts[0].name if len(hosts) == 1 else f"{hosts[0].name}..{hosts[-1].name}"


def pointer(name: str) -> Path:
    """A file naming the directory of lab NAME, so `--name` alone finds a lab made with --dir."""
    return RUN_ROOT / f"{name}.dir"


def resolve_dir(name: str, directory: Path | None) -> Path:
    """The lab's directory: --dir if given, else where `up` said it is, else the default."""
    if directory is not None:
        return directory.absolute()
    try:
        return Path(pointer(name).read_text().strip())
    except OSError:
        return default_dir(name)
