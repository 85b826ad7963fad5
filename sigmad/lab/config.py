"""The options of `sigmad lab up` and the names and addresses derived from them."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sigmad.config import DEFAULT_OVERLAY_CIDR
from sigmad.units import parse_cpu, parse_size

NAME_RE = re.compile(r"[a-z0-9]{1,8}")  # fullmatch
LAB_ROOT = Path("/var/lib/sigma-lab")
# Exec roots of the labs' dockerds: short, containerd's socket paths must fit 108 bytes.
RUN_ROOT = Path("/run/sigma-lab")
MAX_HOSTS = 40
MAX_MASTERS = 5
MAX_SSDS = 8
MIN_CPU = 100  # millicores of a host
MIN_MEMORY = 64 << 20  # bytes of a host


class LabError(Exception):
    """What went wrong, in words for the operator."""


def default_dir(name: str) -> Path:
    return LAB_ROOT / name


@dataclass
class LabConfig:
    """Everything `sigmad lab up` takes; `dir` defaults to /var/lib/sigma-lab/NAME."""

    hosts: int = 3
    name: str = "sigma"
    dir: Path | None = None
    subnet: str = "10.77.0.0/24"
    overlay_cidr: str = DEFAULT_OVERLAY_CIDR
    etcd_port: int = 12479
    registry_port: int = 5000
    listen: str = "127.0.0.1:7575"
    heartbeat_ttl: int = 5
    port_range: tuple[int, int] = (31000, 31099)
    masters: int = 1  # 2 for an HA pair: they listen on consecutive ports from --listen's
    tls: bool = True  # etcd, engines and the API over TLS with the lab's own CA
    ssds: int = 0  # loop devices (sparse files) per host, on its node's SSD allow-list
    ssd_size: int = 10 << 30  # bytes of each (sparse: only what is written takes space)
    cpu: int = 0  # millicores each host's engine may use (0: the machine's / hosts)
    memory: int = 0  # bytes each host's engine may use (0: the machine's / hosts)

    @property
    def root(self) -> Path:
        """The lab's directory, absolute."""
        return Path(self.dir or default_dir(self.name)).absolute()

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def bridge(self) -> str:
        return f"{self.name}-br"

    @property
    def bridge_ip(self) -> str:
        return str(self.network.network_address + 1)

    @property
    def registry_addr(self) -> str:
        return f"{self.bridge_ip}:{self.registry_port}"

    @property
    def image(self) -> str:
        return f"{self.registry_addr}/sigma/busybox:latest"

    @property
    def redis_image(self) -> str:
        return f"{self.registry_addr}/sigma/redis:latest"

    @property
    def master_listens(self) -> list[str]:
        """HOST:PORT of each master: --listen's port, then the next ones."""
        host, _, port = self.listen.rpartition(":")
        return [f"{host}:{int(port) + i}" for i in range(self.masters)]

    def host_capacity(self, machine: tuple[int, int]) -> tuple[int, int]:
        """(millicores, bytes) each host gets: --cpu/--memory, or an even share of
        `machine` (its millicores and bytes)."""
        return (self.cpu or max(machine[0] // self.hosts, MIN_CPU),
                self.memory or max(machine[1] // self.hosts, MIN_MEMORY))

    def host_address(self, index: int) -> str:
        """The underlay address of host `index` (1-based): .11, .12, ..."""
        return str(self.network.network_address + 10 + index)

    def validate(self) -> None:
        """Raise LabError naming the first bad option."""
        if not NAME_RE.fullmatch(self.name):
            raise LabError(f"--name {self.name!r}: use 1 to 8 lowercase letters or digits "
                           "(interface names NAME-br, NAME-h1 must fit 15 characters)")
        if not 1 <= self.hosts <= MAX_HOSTS:
            raise LabError(f"--hosts {self.hosts}: use 1 to {MAX_HOSTS}")
        try:
            net = ipaddress.IPv4Network(self.subnet)
        except ValueError as exc:
            raise LabError(f"--subnet {self.subnet!r}: {exc}") from None
        if net.num_addresses < 10 + self.hosts + 2:
            raise LabError(f"--subnet {self.subnet}: too small for {self.hosts} hosts "
                           "(they take .11 and up)")
        try:
            overlay = ipaddress.IPv4Network(self.overlay_cidr)
        except ValueError as exc:
            raise LabError(f"--overlay-cidr {self.overlay_cidr!r}: {exc}") from None
        if overlay.overlaps(net):
            raise LabError(f"--overlay-cidr {overlay} overlaps --subnet {net}")
        for option, port in (("--etcd-port", self.etcd_port),
                             ("--registry-port", self.registry_port)):
            if not 1 <= port <= 65534:
                raise LabError(f"{option} {port}: not a port")
        host, _, port_text = self.listen.rpartition(":")
        if not host or not port_text.isdigit():
            raise LabError(f"--listen {self.listen!r}: use HOST:PORT")
        if not 1 <= self.masters <= MAX_MASTERS:
            raise LabError(f"--masters {self.masters}: use 1 to {MAX_MASTERS}")
        if not 1 <= int(port_text) <= 65536 - self.masters:
            raise LabError(f"--listen {self.listen!r}: the masters need ports {port_text} and "
                           f"the {self.masters - 1} next ones")
        if self.heartbeat_ttl < 2:
            raise LabError("--heartbeat-ttl: at least 2 seconds")
        first, last = self.port_range
        if not 1024 <= first <= last <= 65535:
            raise LabError(f"--port-range {first}-{last}: use FIRST-LAST within 1024-65535")
        if not 0 <= self.ssds <= MAX_SSDS:
            raise LabError(f"--ssds {self.ssds}: use 0 to {MAX_SSDS} per host")
        if not 64 << 20 <= self.ssd_size <= 16 << 40:
            raise LabError(f"--ssd-size {self.ssd_size}: use 64Mi to 16Ti")
        if self.cpu and self.cpu < MIN_CPU:
            raise LabError(f"--cpu {self.cpu}m: at least {MIN_CPU}m per host")
        if self.memory and self.memory < MIN_MEMORY:
            raise LabError(f"--memory {self.memory}: at least 64Mi per host")
        socket = self.root / f"h{self.hosts}" / "docker.sock"
        if len(str(socket)) > 100:
            raise LabError(f"--dir {self.root}: too long for a unix socket path ({socket})")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["dir"] = str(self.root)
        data["port_range"] = list(self.port_range)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if values.get("dir"):
            values["dir"] = Path(values["dir"])
        if "port_range" in values:
            first, last = values["port_range"]
            values["port_range"] = (int(first), int(last))
        return cls(**values)


def parse_ssd_size(text: str) -> int:
    """`10Gi` → bytes."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise LabError(f"--ssd-size {text!r}: {exc}") from None


def parse_cpu_option(text: str) -> int:
    """`2` or `500m` → millicores; "" or 0 → 0 (the default share)."""
    try:
        return parse_cpu(text or 0)
    except ValueError as exc:
        raise LabError(f"--cpu {text!r}: {exc}") from None


def parse_memory_option(text: str) -> int:
    """`4Gi` → bytes; "" or 0 → 0 (the default share)."""
    try:
        return parse_size(text or 0)
    except ValueError as exc:
        raise LabError(f"--memory {text!r}: {exc}") from None


def parse_port_range(text: str) -> tuple[int, int]:
    """`31000-31099` → (31000, 31099)."""
    first, sep, last = text.partition("-")
    if not sep or not first.strip().isdigit() or not last.strip().isdigit():
        raise LabError(f"--port-range {text!r}: use FIRST-LAST, e.g. 31000-31099")
    return int(first), int(last)
