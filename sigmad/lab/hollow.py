"""A hollow Docker engine: containers kept in memory, answering like dockerd 20.10 (API 1.41).

kubemark's idea: a scale run needs thousands of engines, not thousands of processes. This is
the model (no HTTP): `HollowEngine` keeps containers, images, networks and execs, and its
methods return what the Engine API would (the JSON shapes of `docker inspect`, `docker ps`,
`docker events`) or raise `ApiError(status, message)` with dockerd's words. The HTTP side is
sigmad.lab.hollow_engine; tests/integration/test_hollow_compare.py checks both against a real
dockerd.

Invariants:
- A container's name is unique on its engine; its id is 64 hex digits; lookups take the id,
  the name (with or without "/") or a unique id prefix, like Docker.
- Every state change emits exactly the events dockerd emits for it, in the same order
  (stop: kill 15, die, stop; kill: kill, die; rm -f of a running one: kill 9, die, destroy).
- Answers are built from the container's state when asked; an inspect answer is cached as
  bytes until the container changes (most calls of a scale run are inspects).

Scripted behaviour, for tests (a container runs nothing, so these stand for what its
process would do; all are decided at start):
- command `["exit", "N"]` (or `["sh", "-c", "exit N"]`): exits with status N right after start;
- env `HOLLOW_OOM=1`: OOM-killed right after start (OOMKilled true, exit 137, events oom, die);
- env `HOLLOW_EXEC_EXIT=N`: every exec in it exits N (a readiness probe that fails);
- env `HOLLOW_MEMORY=BYTES`: the memory usage its stats report (default 1 MiB);
- otherwise it runs until stopped or killed (SIGTERM ends it with 143, SIGKILL with 137).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

API_VERSION = "1.41"
SERVER_VERSION = "20.10.24+dfsg1"
UNSET_TIME = "0001-01-01T00:00:00Z"
MIN_MEMORY = 6 * 1024 * 1024
DEFAULT_USAGE = 1 << 20
NAME_RE = re.compile(r"^/?[a-zA-Z0-9][a-zA-Z0-9_.-]+$")
EXIT_RE = re.compile(r"^exit (\d+)$")
SIGNALS = {"KILL": 9, "TERM": 15, "INT": 2, "HUP": 1, "QUIT": 3, "USR1": 10, "USR2": 12,
           "STOP": 19, "CONT": 18}
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_SPLICE = "<hollow:HostConfig>"  # stands for the HostConfig JSON while the rest is encoded
_SPLICED = json.dumps(_SPLICE)
_ids = itertools.count(1)


class ApiError(Exception):
    """An Engine API error answer: HTTP `status` and dockerd's `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def new_id(seed: str) -> str:
    """A fresh 64-hex-digit id (unique within this process)."""
    return hashlib.sha256(f"{seed}/{next(_ids)}/{time.time_ns()}".encode()).hexdigest()


def rfc3339(ns: int) -> str:
    """Go's RFC3339Nano of epoch nanoseconds (trailing zeros of the fraction dropped); the
    zero time for 0."""
    if not ns:
        return UNSET_TIME
    seconds, frac = divmod(ns, 1_000_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    digits = f"{frac:09d}".rstrip("0")
    return f"{stamp}.{digits}Z" if digits else f"{stamp}Z"


def human_duration(seconds: float) -> str:
    """Docker's units.HumanDuration (the "Up 5 minutes" of `docker ps`)."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = s // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(s / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // (24 * 7)} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // (24 * 30)} months"
    return f"{hours // (24 * 365)} years"


def normalize_ref(ref: str) -> str:
    """An image reference with its tag (`:latest` when none is given)."""
    if "@" in ref:
        return ref
    last = ref.rsplit("/", 1)[-1]
    return ref if ":" in last else f"{ref}:latest"


def signal_number(value: str) -> int:
    """A signal given as `KILL`, `SIGKILL` or `9`."""
    if value.isdigit():
        return int(value)
    name = value.upper().removeprefix("SIG")
    if name not in SIGNALS:
        raise ApiError(400, f"Invalid signal: {value}")
    return SIGNALS[name]


@dataclass
class Capacity:
    """What `docker info` reports for the host."""

    ncpu: int = 8
    memory: int = 32 << 30
    name: str = "hollow"


@dataclass
class Image:
    id: str
    ref: str
    created: str
    cmd: list[str] | None = None  # like sigma/busybox (FROM scratch): no default command


@dataclass
class Network:
    id: str
    name: str
    driver: str
    subnet: str
    gateway: str
    created: str
    options: dict[str, str]
    labels: dict[str, str]
    next_host: int = 2  # the next address handed out, as an offset into the subnet


@dataclass
class Exec:
    id: str
    container: str
    cmd: list[str]
    exit_code: int
    running: bool = False
    started: bool = False
    pid: int = 0


@dataclass
class Container:
    """One container's state; `body` is the create request as given (not copied)."""

    id: str
    name: str  # with the leading "/"
    body: dict[str, Any]
    host_config: dict[str, Any]
    image: Image
    created: int  # epoch ns
    network_mode: str
    ip: str = ""
    mac: str = ""
    status: str = "created"
    pid: int = 0
    exit_code: int = 0
    oom_killed: bool = False
    error: str = ""
    started_at: int = 0
    finished_at: int = 0
    restart_count: int = 0
    execs: list[str] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)  # labels + image + name, sorted
    cached: bytes = b""  # the inspect answer while nothing changed
    host_json: str = ""  # its HostConfig, encoded, while it does not change

    @property
    def labels(self) -> dict[str, str]:
        return self.body.get("Labels") or {}

    @property
    def env(self) -> list[str]:
        return self.body.get("Env") or []

    def command(self) -> list[str]:
        entry = self.body.get("Entrypoint") or []
        cmd = self.body.get("Cmd")
        if cmd is None and not entry:
            cmd = self.image.cmd
        return [*entry, *(cmd or [])]

    def env_value(self, key: str) -> str:
        prefix = key + "="
        return next((e[len(prefix):] for e in self.env if e.startswith(prefix)), "")


Emit = Callable[[dict[str, Any]], None]
Defer = Callable[[Callable[[], None]], Any]

HOST_CONFIG_DEFAULTS: dict[str, Any] = {
    "Binds": None, "ContainerIDFile": "", "LogConfig": {"Type": "json-file", "Config": {}},
    "NetworkMode": "default", "PortBindings": {}, "RestartPolicy": {"Name": "",
                                                                    "MaximumRetryCount": 0},
    "AutoRemove": False, "VolumeDriver": "", "VolumesFrom": None, "CapAdd": None,
    "CapDrop": None, "CgroupnsMode": "host", "Dns": [], "DnsOptions": [], "DnsSearch": [],
    "ExtraHosts": None, "GroupAdd": None, "IpcMode": "private", "Cgroup": "", "Links": None,
    "OomScoreAdj": 0, "PidMode": "", "Privileged": False, "PublishAllPorts": False,
    "ReadonlyRootfs": False, "SecurityOpt": None, "UTSMode": "", "UsernsMode": "",
    "ShmSize": 67108864, "Runtime": "runc", "ConsoleSize": [0, 0], "Isolation": "",
    "CpuShares": 0, "Memory": 0, "NanoCpus": 0, "CgroupParent": "", "BlkioWeight": 0,
    "BlkioWeightDevice": [], "BlkioDeviceReadBps": None, "BlkioDeviceWriteBps": None,
    "BlkioDeviceReadIOps": None, "BlkioDeviceWriteIOps": None, "CpuPeriod": 0, "CpuQuota": 0,
    "CpuRealtimePeriod": 0, "CpuRealtimeRuntime": 0, "CpusetCpus": "", "CpusetMems": "",
    "Devices": [], "DeviceCgroupRules": None, "DeviceRequests": None, "KernelMemory": 0,
    "KernelMemoryTCP": 0, "MemoryReservation": 0, "MemorySwap": 0, "MemorySwappiness": None,
    "OomKillDisable": False, "PidsLimit": None, "Ulimits": None, "CpuCount": 0,
    "CpuPercent": 0, "IOMaximumIOps": 0, "IOMaximumBandwidth": 0,
    "MaskedPaths": ["/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys",
                    "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                    "/proc/sched_debug", "/proc/scsi", "/sys/firmware"],
    "ReadonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                      "/proc/sysrq-trigger"],
}
RESOURCE_KEYS = ("NanoCpus", "Memory", "MemorySwap", "MemorySwappiness", "MemoryReservation",
                 "PidsLimit", "CpuShares", "CpuPeriod", "CpuQuota", "CpusetCpus", "CpusetMems",
                 "BlkioWeight", "KernelMemory", "KernelMemoryTCP", "OomKillDisable",
                 "CpuRealtimePeriod", "CpuRealtimeRuntime", "RestartPolicy")


class HollowEngine:
    """One fake host's engine. `emit` gets every event (the dict `docker events` streams);
    `defer` runs what a container's process does right after start (the HTTP server passes
    `loop.call_soon`, so a start answers before the container dies, as with dockerd)."""

    def __init__(self, capacity: Capacity | None = None, emit: Emit | None = None,
                 defer: Defer | None = None) -> None:
        self.capacity = capacity or Capacity()
        self.emit: Emit = emit or (lambda _: None)
        self.defer: Defer = defer or (lambda fn: fn())
        self.containers: dict[str, Container] = {}  # id → container
        self.names: dict[str, str] = {}  # "/name" → id
        self.images: dict[str, Image] = {}  # normalized ref → image
        self.registry: set[str] | None = set()  # refs a pull finds (None: every ref)
        self.networks: dict[str, Network] = {}  # name → network
        self.execs: dict[str, Exec] = {}
        self.pids = itertools.count(1000)
        self.started = time.time_ns()
        for name, driver, subnet in (("bridge", "bridge", "172.17.0.0/16"),
                                     ("host", "host", ""), ("none", "null", "")):
            self._add_network(name, driver, subnet, subnet.replace("0.0/16", "0.1"), {}, {})

    # -- images and networks ---------------------------------------------------------------

    def add_image(self, ref: str) -> Image:
        """An image as if pulled (or built) already."""
        ref = normalize_ref(ref)
        image = self.images.get(ref)
        if image is None:
            image = self.images[ref] = Image("sha256:" + new_id(ref), ref,
                                             rfc3339(time.time_ns()))
        return image

    def image(self, ref: str) -> Image:
        """The image `ref` (a name or an id); ApiError 404 like image inspect."""
        found = self.images.get(normalize_ref(ref))
        if found is None:
            found = next((i for i in self.images.values()
                          if i.id == ref or i.id.removeprefix("sha256:").startswith(ref)), None)
        if found is None:
            raise ApiError(404, f"no such image: {ref}: No such image: {normalize_ref(ref)}")
        return found

    def image_view(self, ref: str) -> dict[str, Any]:
        image = self.image(ref)
        config = {
            "Hostname": "", "Domainname": "", "User": "", "AttachStdin": False,
            "AttachStdout": False, "AttachStderr": False, "Tty": False, "OpenStdin": False,
            "StdinOnce": False, "Env": [PATH_ENV], "Cmd": image.cmd, "Image": "",
            "Volumes": None, "WorkingDir": "", "Entrypoint": None, "OnBuild": None,
            "Labels": None,
        }
        return {
            "Id": image.id, "RepoTags": [image.ref], "RepoDigests": [], "Parent": "",
            "Comment": "", "Created": image.created, "Container": "", "ContainerConfig": config,
            "DockerVersion": SERVER_VERSION, "Author": "", "Config": config,
            "Architecture": "amd64", "Os": "linux", "Size": 1_200_000,
            "VirtualSize": 1_200_000,
            "GraphDriver": {"Data": {}, "Name": "overlay2"},
            "RootFS": {"Type": "layers", "Layers": ["sha256:" + "0" * 64]},
            "Metadata": {"LastTagTime": image.created},
        }

    def pull(self, from_image: str, tag: str) -> list[dict[str, Any]]:
        """`docker pull`: the progress lines; ApiError 404 if the registry lacks the image."""
        repo = from_image
        if not tag and "@" not in repo:
            last = repo.rsplit("/", 1)[-1]
            repo, _, tag = repo.rpartition(":") if ":" in last else (repo, "", "latest")
        ref = f"{repo}:{tag}" if tag else repo
        if self.registry is not None and ref not in self.registry and ref not in self.images:
            raise ApiError(404, f"manifest for {ref} not found: manifest unknown: "
                           "manifest unknown")
        fresh = ref not in self.images
        image = self.add_image(ref)
        layer = image.id[7:19]
        digest = "sha256:" + hashlib.sha256(ref.encode()).hexdigest()
        lines: list[dict[str, Any]] = [{"status": f"Pulling from {repo}", "id": tag}]
        if fresh:
            lines += [
                {"status": "Pulling fs layer", "progressDetail": {}, "id": layer},
                {"status": "Downloading", "progressDetail": {"current": 1_200_000,
                                                             "total": 1_200_000},
                 "progress": "[==================================================>]  1.2MB/1.2MB",
                 "id": layer},
                {"status": "Download complete", "progressDetail": {}, "id": layer},
                {"status": "Extracting", "progressDetail": {"current": 1_200_000,
                                                            "total": 1_200_000},
                 "progress": "[==================================================>]  1.2MB/1.2MB",
                 "id": layer},
                {"status": "Pull complete", "progressDetail": {}, "id": layer},
            ]
        lines.append({"status": f"Digest: {digest}"})
        lines.append({"status": f"Status: Downloaded newer image for {ref}" if fresh
                      else f"Status: Image is up to date for {ref}"})
        return lines

    def _add_network(self, name: str, driver: str, subnet: str, gateway: str,
                     options: dict[str, str], labels: dict[str, str]) -> Network:
        net = Network(new_id(name), name, driver, subnet, gateway, rfc3339(time.time_ns()),
                      options, labels)
        self.networks[name] = net
        return net

    def create_network(self, body: dict[str, Any]) -> dict[str, str]:
        name = str(body.get("Name") or "")
        if not name:
            raise ApiError(400, "network name cannot be empty")
        if name in self.networks:
            raise ApiError(409, f"network with name {name} already exists")
        config = ((body.get("IPAM") or {}).get("Config") or [{}])[0]
        subnet = config.get("Subnet") or "172.18.0.0/16"
        gateway = config.get("Gateway") or subnet.rsplit(".", 2)[0] + ".0.1"
        net = self._add_network(name, body.get("Driver") or "bridge", subnet, gateway,
                                body.get("Options") or {}, body.get("Labels") or {})
        return {"Id": net.id, "Warning": ""}

    def network(self, ref: str) -> Network:
        net = self.networks.get(ref) or next(
            (n for n in self.networks.values() if n.id.startswith(ref)), None)
        if net is None:
            raise ApiError(404, f"network {ref} not found")
        return net

    def network_view(self, ref: str) -> dict[str, Any]:
        net = self.network(ref)
        members = {
            c.id: {"Name": c.name[1:], "EndpointID": c.id[::-1], "MacAddress": c.mac,
                   "IPv4Address": f"{c.ip}/{net.subnet.rsplit('/', 1)[-1]}",
                   "IPv6Address": ""}
            for c in self.containers.values()
            if c.status == "running" and c.network_mode == net.name and c.ip
        }
        ipam = [{"Subnet": net.subnet, "Gateway": net.gateway}] if net.subnet else []
        return {
            "Name": net.name, "Id": net.id, "Created": net.created, "Scope": "local",
            "Driver": net.driver, "EnableIPv6": False,
            "IPAM": {"Driver": "default", "Options": None, "Config": ipam},
            "Internal": False, "Attachable": False, "Ingress": False,
            "ConfigFrom": {"Network": ""}, "ConfigOnly": False, "Containers": members,
            "Options": net.options, "Labels": net.labels,
        }

    def _address(self, net: Network, wanted: str) -> str:
        if wanted or not net.subnet:
            return wanted
        base = [int(p) for p in net.subnet.split("/")[0].split(".")]
        n = (base[0] << 24 | base[1] << 16 | base[2] << 8 | base[3]) + net.next_host
        net.next_host += 1
        return f"{n >> 24 & 255}.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"

    # -- containers ------------------------------------------------------------------------

    def get(self, ref: str) -> Container:
        """A container by id, name or unique id prefix; ApiError 404 like dockerd."""
        c = self.containers.get(ref)
        if c is not None:
            return c
        cid = self.names.get(ref if ref.startswith("/") else "/" + ref)
        if cid is not None:
            return self.containers[cid]
        if ref and len(ref) < 64:
            found = [c for i, c in self.containers.items() if i.startswith(ref)]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise ApiError(400, f"multiple IDs found with provided prefix: {ref}")
        raise ApiError(404, f"No such container: {ref}")

    def create(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """`POST /containers/create`: the new id; 409 if the name is taken, 404 if the image
        is not here, 400 for what dockerd refuses."""
        if name and not NAME_RE.match(name):
            raise ApiError(400, f"Invalid container name ({name}), only "
                           "[a-zA-Z0-9][a-zA-Z0-9_.-] are allowed")
        ref = str(body.get("Image") or "")
        image = self.images.get(normalize_ref(ref)) if ref else None
        if image is None:
            raise ApiError(404, f"No such image: {normalize_ref(ref)}")
        host_config = body.get("HostConfig") or {}
        self._check_resources(host_config, host_config)
        if host_config.get("PortBindings"):
            host_config = {**host_config, "PortBindings": {
                port: [{"HostIp": b.get("HostIp", ""), "HostPort": b.get("HostPort", "")}
                       for b in bindings or []]
                for port, bindings in host_config["PortBindings"].items()}}
        cid = new_id(name)
        full = "/" + (name.lstrip("/") or cid[:12])
        taken = self.names.get(full)
        if taken is not None:
            raise ApiError(409, f'Conflict. The container name "{full}" is already in use by '
                           f'container "{taken}". You have to remove (or rename) that '
                           "container to be able to reuse that name.")
        mode = host_config.get("NetworkMode") or "default"
        if mode.startswith("container:"):
            self.get(mode.partition(":")[2])
        c = Container(cid, full, body, host_config, image, time.time_ns(), mode)
        if not c.command():
            raise ApiError(400, "No command specified")
        c.attributes = dict(sorted({**c.labels, "image": ref, "name": full[1:]}.items()))
        self.containers[cid] = c
        self.names[full] = cid
        self._event(c, "create")
        return {"Id": cid, "Warnings": []}

    def _check_resources(self, new: dict[str, Any], merged: dict[str, Any]) -> None:
        memory = merged.get("Memory") or 0
        swap = merged.get("MemorySwap") or 0
        if memory and memory < MIN_MEMORY:
            raise ApiError(400, "Minimum memory limit allowed is 6MB")
        if memory and swap > 0 and swap < memory:
            raise ApiError(400, "Minimum memoryswap limit should be larger than memory "
                           "limit, see usage")
        nano = new.get("NanoCpus") or 0
        if nano and (nano < 10_000_000 or nano > self.capacity.ncpu * 1_000_000_000):
            raise ApiError(400, f"Range of CPUs is from 0.01 to {self.capacity.ncpu:.2f}, as "
                           f"there are only {self.capacity.ncpu} CPUs available")

    def _event(self, c: Container, action: str, **extra: str) -> None:
        c.cached = b""
        ns = time.time_ns()
        attributes = {**c.attributes, **extra} if extra else c.attributes
        if extra:
            attributes = dict(sorted(attributes.items()))
        self.emit({
            "status": action, "id": c.id, "from": c.body.get("Image", ""), "Type": "container",
            "Action": action, "Actor": {"ID": c.id, "Attributes": attributes},
            "scope": "local", "time": ns // 1_000_000_000, "timeNano": ns,
        })

    def start(self, ref: str) -> bool:
        """`POST /containers/{id}/start`: False if it already runs (304)."""
        c = self.get(ref)
        if c.status == "running":
            return False
        mode = c.network_mode
        if mode.startswith("container:"):
            owner = self.get(mode.partition(":")[2])
            if owner.status != "running":
                raise ApiError(409, f"cannot join network of a non running container: "
                               f"{owner.id}")
        elif mode not in ("default", "host", "none"):
            net = self.network(mode)
            endpoint = ((c.body.get("NetworkingConfig") or {}).get("EndpointsConfig") or {})
            wanted = ((endpoint.get(mode) or {}).get("IPAMConfig") or {}).get("IPv4Address", "")
            c.ip = c.ip or self._address(net, wanted or "")
        elif mode == "default":
            c.ip = c.ip or self._address(self.networks["bridge"], "")
        if c.ip and not c.mac:
            c.mac = c.body.get("MacAddress") or "02:42:" + ":".join(
                f"{int(p):02x}" for p in c.ip.split("."))
        c.status, c.pid, c.exit_code, c.oom_killed, c.error = "running", next(self.pids), 0, \
            False, ""
        c.started_at, c.finished_at = time.time_ns(), 0
        self._event(c, "start")
        self.defer(lambda: self._run(c))
        return True

    def _run(self, c: Container) -> None:
        """What the container's process does right after start (see the module doc)."""
        if c.status != "running" or self.containers.get(c.id) is not c:
            return
        if c.env_value("HOLLOW_OOM") == "1":
            c.oom_killed = True
            self._event(c, "oom")
            self._died(c, 137)
            return
        command = c.command()
        script = command[2] if command[:2] == ["sh", "-c"] and len(command) == 3 else \
            " ".join(command)
        match = EXIT_RE.match(script)
        if match:
            self._died(c, int(match.group(1)))

    def _died(self, c: Container, code: int) -> None:
        c.status, c.pid, c.exit_code, c.finished_at = "exited", 0, code, time.time_ns()
        self._event(c, "die", exitCode=str(code))

    def kill(self, ref: str, signal: str = "KILL") -> None:
        """`POST /containers/{id}/kill`: 409 if it does not run."""
        c = self.get(ref)
        number = signal_number(signal or "KILL")
        if c.status != "running":
            raise ApiError(409, f"Cannot kill container: {ref}: Container {c.id} is not "
                           "running")
        self._event(c, "kill", signal=str(number))
        if number in (9, 15, 2, 1, 3):
            self._died(c, 128 + number)

    def stop(self, ref: str) -> bool:
        """`POST /containers/{id}/stop`: False if it was not running (304)."""
        c = self.get(ref)
        if c.status != "running":
            return False
        self._event(c, "kill", signal="15")
        self._died(c, 143)
        self._event(c, "stop")
        return True

    def restart(self, ref: str) -> None:
        c = self.get(ref)
        if c.status == "running":
            self._event(c, "kill", signal="15")
            self._died(c, 143)
            self._event(c, "stop")
        self.start(c.id)
        self._event(c, "restart")

    def remove(self, ref: str, force: bool = False) -> None:
        """`DELETE /containers/{id}`: 409 for a running one without force."""
        c = self.get(ref)
        if c.status == "running":
            if not force:
                raise ApiError(409, f"You cannot remove a running container {c.id}. Stop the "
                               "container before attempting removal or force remove")
            self._event(c, "kill", signal="9")
            self._died(c, 137)
        del self.containers[c.id]
        self.names.pop(c.name, None)
        for exec_id in c.execs:
            self.execs.pop(exec_id, None)
        self._event(c, "destroy")

    def update(self, ref: str, body: dict[str, Any]) -> dict[str, Any]:
        """`POST /containers/{id}/update`: resources changed in place, validated like dockerd."""
        c = self.get(ref)
        merged = {**c.host_config, **{k: v for k, v in body.items() if k in RESOURCE_KEYS}}
        if body.get("Memory") and "MemorySwap" not in body and (c.host_config.get(
                "MemorySwap") or 0) > 0 and body["Memory"] > c.host_config["MemorySwap"]:
            raise ApiError(409, f"Cannot update container {c.id}: Memory limit should be "
                           "smaller than already set memoryswap limit, update the memoryswap "
                           "at the same time")
        self._check_resources(body, merged)
        c.host_config, c.host_json = merged, ""
        self._event(c, "update")
        return {"Warnings": None}

    def power_loss(self) -> None:
        """The host lost power: every running container is dead (exit 255, as dockerd
        reports after a crash), no events (nobody was there to send them)."""
        now = time.time_ns()
        for c in self.containers.values():
            if c.status == "running":
                c.status, c.pid, c.exit_code, c.finished_at = "exited", 0, 255, now
                c.cached = b""
        self.execs.clear()

    # -- exec ------------------------------------------------------------------------------

    def exec_create(self, ref: str, body: dict[str, Any]) -> dict[str, str]:
        c = self.get(ref)
        if c.status != "running":
            raise ApiError(409, f"Container {c.id} is not running")
        cmd = [str(a) for a in body.get("Cmd") or []]
        code = int(c.env_value("HOLLOW_EXEC_EXIT") or 0)
        e = Exec(new_id(c.id), c.id, cmd, code)
        self.execs[e.id] = e
        c.execs.append(e.id)
        c.cached = b""
        self._event(c, f"exec_create: {' '.join(cmd)} ", execID=e.id)
        return {"Id": e.id}

    def _exec(self, exec_id: str) -> Exec:
        e = self.execs.get(exec_id)
        if e is None:
            raise ApiError(404, f"No such exec instance: {exec_id}")
        return e

    def exec_start(self, exec_id: str) -> None:
        e = self._exec(exec_id)
        if e.started:
            raise ApiError(409, f"Error: Exec command {exec_id} has already run")
        c = self.containers.get(e.container)
        if c is None or c.status != "running":
            raise ApiError(409, f"Container {e.container} is not running")
        e.started, e.pid = True, next(self.pids)
        self._event(c, f"exec_start: {' '.join(e.cmd)} ", execID=e.id)
        self._event(c, "exec_die", execID=e.id, exitCode=str(e.exit_code))

    def exec_view(self, exec_id: str) -> dict[str, Any]:
        e = self._exec(exec_id)
        return {
            "ID": e.id, "Running": e.running, "ExitCode": e.exit_code if e.started else None,
            "ProcessConfig": {"tty": False, "entrypoint": e.cmd[0] if e.cmd else "",
                              "arguments": e.cmd[1:], "privileged": False},
            "OpenStdin": False, "OpenStderr": False, "OpenStdout": False, "CanRemove": False,
            "ContainerID": e.container, "DetachKeys": "", "Pid": e.pid,
        }

    # -- views -----------------------------------------------------------------------------

    def _networks(self, c: Container) -> dict[str, Any]:
        mode = c.network_mode
        if mode.startswith("container:") or mode in ("host", "none"):
            return {}
        name = "bridge" if mode == "default" else mode
        net = self.networks.get(name)
        endpoint = ((c.body.get("NetworkingConfig") or {}).get("EndpointsConfig") or {})
        wanted = (endpoint.get(name) or {}).get("IPAMConfig")
        running = c.status == "running"
        return {name: {
            "IPAMConfig": wanted, "Links": None, "Aliases": None,
            "NetworkID": net.id if net else "", "EndpointID": c.id[::-1] if running else "",
            "Gateway": net.gateway if net and running else "",
            "IPAddress": c.ip if running else "",
            "IPPrefixLen": int(net.subnet.rsplit("/", 1)[-1]) if net and running else 0,
            "IPv6Gateway": "", "GlobalIPv6Address": "", "GlobalIPv6PrefixLen": 0,
            "MacAddress": c.mac if running else "", "DriverOpts": None,
        }}

    def _status_text(self, c: Container) -> str:
        if c.status == "running":
            return "Up " + human_duration((time.time_ns() - c.started_at) / 1e9)
        if c.status == "exited":
            ago = human_duration((time.time_ns() - c.finished_at) / 1e9)
            return f"Exited ({c.exit_code}) {ago} ago"
        return "Created"

    def _ports(self, c: Container) -> list[dict[str, Any]]:
        ports = []
        for key, bindings in (c.host_config.get("PortBindings") or {}).items():
            private, _, proto = key.partition("/")
            for b in bindings or []:
                if c.status == "running":
                    ports += [{"IP": ip, "PrivatePort": int(private),
                               "PublicPort": int(b.get("HostPort") or 0), "Type": proto or "tcp"}
                              for ip in ("0.0.0.0", "::")]
        return ports

    def summary(self, c: Container) -> dict[str, Any]:
        """One item of `GET /containers/json`."""
        command = c.command()
        return {
            "Id": c.id, "Names": [c.name], "Image": c.body.get("Image", ""),
            "ImageID": c.image.id, "Command": " ".join(command), "Created": c.created // 10**9,
            "Ports": self._ports(c), "Labels": c.labels, "State": c.status,
            "Status": self._status_text(c),
            "HostConfig": {"NetworkMode": c.network_mode},
            "NetworkSettings": {"Networks": self._networks(c)}, "Mounts": [],
        }

    def list_containers(self, all_: bool, filters: dict[str, list[str]]) -> list[dict[str, Any]]:
        """`GET /containers/json`: running ones (every one with `all_`), newest first, that
        pass every filter (label k / k=v, status, name, id)."""
        labels = [(f.partition("=")[0], f.partition("=")[2], "=" in f)
                  for f in filters.get("label", [])]
        statuses = filters.get("status", [])
        names = filters.get("name", [])
        ids = filters.get("id", [])
        out = []
        for c in reversed(self.containers.values()):
            if not all_ and c.status != "running" and not statuses:
                continue
            own = c.labels
            if labels and not all(k in own and (not has or own[k] == v)
                                  for k, v, has in labels):
                continue
            if statuses and c.status not in statuses:
                continue
            if names and not any(re.search(n, c.name) for n in names):
                continue
            if ids and not any(c.id.startswith(i) for i in ids):
                continue
            out.append(self.summary(c))
        return out

    def inspect(self, ref: str) -> bytes:
        """`GET /containers/{id}/json` as JSON bytes (cached until the container changes;
        its HostConfig, two thirds of it, is encoded again only when it changes)."""
        c = self.get(ref)
        if not c.cached:
            if not c.host_json:
                c.host_json = json.dumps({**HOST_CONFIG_DEFAULTS, **c.host_config,
                                          "NetworkMode": c.network_mode})
            view = self.inspect_view(c)
            view["HostConfig"] = _SPLICE
            c.cached = json.dumps(view).replace(_SPLICED, c.host_json, 1).encode()
        return c.cached

    def inspect_view(self, c: Container) -> dict[str, Any]:
        body = c.body
        command = c.command()
        env = list(c.env)
        if not any(e.startswith("PATH=") for e in env):
            env.append(PATH_ENV)
        config = {
            "Hostname": body.get("Hostname") or c.id[:12], "Domainname": "", "User": "",
            "AttachStdin": False, "AttachStdout": False, "AttachStderr": False,
            "ExposedPorts": body.get("ExposedPorts"), "Tty": False, "OpenStdin": False,
            "StdinOnce": False, "Env": env, "Cmd": body.get("Cmd") if body.get("Cmd") is not
            None or body.get("Entrypoint") else c.image.cmd, "Image": body.get("Image", ""),
            "Volumes": None, "WorkingDir": "", "Entrypoint": body.get("Entrypoint"),
            "MacAddress": body.get("MacAddress", ""), "OnBuild": None, "Labels": c.labels,
        }
        if config["ExposedPorts"] is None:
            del config["ExposedPorts"]
        if not config["MacAddress"]:
            del config["MacAddress"]
        running = c.status == "running"
        ports = {k: [{"HostIp": ip, "HostPort": b.get("HostPort", "")} for b in v or []
                     for ip in ("0.0.0.0", "::")]
                 for k, v in (c.host_config.get("PortBindings") or {}).items()} \
            if running else {}
        return {
            "Id": c.id, "Created": rfc3339(c.created), "Path": command[0] if command else "",
            "Args": command[1:],
            "State": {
                "Status": c.status, "Running": running, "Paused": False, "Restarting": False,
                "OOMKilled": c.oom_killed, "Dead": False, "Pid": c.pid,
                "ExitCode": c.exit_code, "Error": c.error,
                "StartedAt": rfc3339(c.started_at), "FinishedAt": rfc3339(c.finished_at),
            },
            "Image": c.image.id, "ResolvConfPath": f"/hollow/containers/{c.id}/resolv.conf",
            "HostnamePath": f"/hollow/containers/{c.id}/hostname",
            "HostsPath": f"/hollow/containers/{c.id}/hosts",
            "LogPath": f"/hollow/containers/{c.id}/{c.id}-json.log", "Name": c.name,
            "RestartCount": c.restart_count, "Driver": "overlay2", "Platform": "linux",
            "MountLabel": "", "ProcessLabel": "", "AppArmorProfile": "",
            "ExecIDs": list(c.execs) or None,
            "HostConfig": {**HOST_CONFIG_DEFAULTS, **c.host_config,
                           "NetworkMode": c.network_mode},
            "GraphDriver": {"Data": {}, "Name": "overlay2"}, "Mounts": [], "Config": config,
            "NetworkSettings": {
                "Bridge": "", "SandboxID": c.id[::-1] if running else "", "HairpinMode": False,
                "LinkLocalIPv6Address": "", "LinkLocalIPv6PrefixLen": 0, "Ports": ports,
                "SandboxKey": f"/var/run/docker/netns/{c.id[:12]}" if running else "",
                "SecondaryIPAddresses": None, "SecondaryIPv6Addresses": None,
                "EndpointID": "", "Gateway": "", "GlobalIPv6Address": "",
                "GlobalIPv6PrefixLen": 0, "IPAddress": "", "IPPrefixLen": 0,
                "IPv6Gateway": "", "MacAddress": "", "Networks": self._networks(c),
            },
        }

    def stats(self, ref: str) -> dict[str, Any]:
        """`GET /containers/{id}/stats?stream=false` (memory is what sigma reads)."""
        c = self.get(ref)
        usage = int(c.env_value("HOLLOW_MEMORY") or DEFAULT_USAGE) \
            if c.status == "running" else 0
        limit = c.host_config.get("Memory") or self.capacity.memory
        cpu = {"cpu_usage": {"total_usage": 0, "usage_in_kernelmode": 0,
                             "usage_in_usermode": 0},
               "system_cpu_usage": 0, "online_cpus": self.capacity.ncpu,
               "throttling_data": {"periods": 0, "throttled_periods": 0, "throttled_time": 0}}
        now = rfc3339(time.time_ns())
        return {
            "read": now, "preread": UNSET_TIME,
            "pids_stats": {"current": 1 if usage else 0,
                           "limit": c.host_config.get("PidsLimit") or 0},
            "blkio_stats": {k: [] for k in (
                "io_service_bytes_recursive", "io_serviced_recursive", "io_queue_recursive",
                "io_service_time_recursive", "io_wait_time_recursive", "io_merged_recursive",
                "io_time_recursive", "sectors_recursive")},
            "num_procs": 0, "storage_stats": {}, "cpu_stats": cpu, "precpu_stats": cpu,
            "memory_stats": {"usage": usage, "max_usage": usage,
                             "stats": {"total_inactive_file": 0, "inactive_file": 0,
                                       "total_rss": usage, "rss": usage, "total_cache": 0,
                                       "cache": 0, "hierarchical_memory_limit": limit},
                             "limit": limit} if usage else {},
            "name": c.name, "id": c.id,
            "networks": {"eth0": {k: 0 for k in (
                "rx_bytes", "rx_packets", "rx_errors", "rx_dropped", "tx_bytes", "tx_packets",
                "tx_errors", "tx_dropped")}} if usage else {},
        }

    # -- host ------------------------------------------------------------------------------

    def version(self) -> dict[str, Any]:
        details = {"ApiVersion": API_VERSION, "Arch": "amd64", "BuildTime": "",
                   "Experimental": "false", "GitCommit": "hollow", "GoVersion": "go1.19.8",
                   "KernelVersion": "hollow", "MinAPIVersion": "1.12", "Os": "linux"}
        return {
            "Platform": {"Name": ""},
            "Components": [{"Name": "Engine", "Version": SERVER_VERSION, "Details": details}],
            "Version": SERVER_VERSION, "ApiVersion": API_VERSION, "MinAPIVersion": "1.12",
            "GitCommit": "hollow", "GoVersion": "go1.19.8", "Os": "linux", "Arch": "amd64",
            "KernelVersion": "hollow", "BuildTime": "",
        }

    def info(self) -> dict[str, Any]:
        running = sum(1 for c in self.containers.values() if c.status == "running")
        return {
            "ID": self.capacity.name, "Containers": len(self.containers),
            "ContainersRunning": running, "ContainersPaused": 0,
            "ContainersStopped": len(self.containers) - running, "Images": len(self.images),
            "Driver": "overlay2", "DriverStatus": [], "Plugins": {
                "Volume": ["local"], "Network": ["bridge", "host", "null"],
                "Authorization": None, "Log": ["json-file", "local"]},
            "MemoryLimit": True, "SwapLimit": True, "KernelMemory": True,
            "KernelMemoryTCP": True, "CpuCfsPeriod": True, "CpuCfsQuota": True,
            "CPUShares": True, "CPUSet": True, "PidsLimit": True, "IPv4Forwarding": True,
            "BridgeNfIptables": True, "BridgeNfIp6tables": True, "Debug": False, "NFd": 20,
            "OomKillDisable": True, "NGoroutines": 40, "SystemTime": rfc3339(time.time_ns()),
            "LoggingDriver": "json-file", "CgroupDriver": "cgroupfs", "CgroupVersion": "1",
            "NEventsListener": 0, "KernelVersion": "hollow",
            "OperatingSystem": "Debian GNU/Linux 12 (bookworm)", "OSVersion": "12",
            "OSType": "linux", "Architecture": "x86_64",
            "IndexServerAddress": "https://index.docker.io/v1/", "RegistryConfig": {
                "AllowNondistributableArtifactsCIDRs": [],
                "AllowNondistributableArtifactsHostnames": [], "InsecureRegistryCIDRs": [],
                "IndexConfigs": {}, "Mirrors": []},
            "NCPU": self.capacity.ncpu, "MemTotal": self.capacity.memory,
            "GenericResources": None, "DockerRootDir": "/hollow", "HttpProxy": "",
            "HttpsProxy": "", "NoProxy": "", "Name": self.capacity.name, "Labels": [],
            "ExperimentalBuild": False, "ServerVersion": SERVER_VERSION,
            "Runtimes": {"runc": {"path": "runc"}}, "DefaultRuntime": "runc",
            "Swarm": {"NodeID": "", "NodeAddr": "", "LocalNodeState": "inactive",
                      "ControlAvailable": False, "Error": "", "RemoteManagers": None},
            "LiveRestoreEnabled": False, "Isolation": "", "InitBinary": "docker-init",
            "ContainerdCommit": {"ID": "hollow", "Expected": "hollow"},
            "RuncCommit": {"ID": "hollow", "Expected": "hollow"},
            "InitCommit": {"ID": "", "Expected": ""},
            "SecurityOptions": ["name=seccomp,profile=default"], "Warnings": None,
        }
