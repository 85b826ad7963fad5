"""The app spec: its typed shape and the validating parser for YAML/JSON input.

Validation happens before anything is written: every error names the field path and the
reason, e.g. `containers[0].resources.limit.memory: "8GG" is not a size`.

Invariants of `parse` (the API runs it off its event loop, on a body of at most 1 MiB):
- nothing but SpecError escapes it, whatever the text (tests/unit/test_spec_fuzz.py);
- its cost is bounded by the text's length: YAML aliases are never expanded (an alias is
  refused at the field it stands for), nesting stops at MAX_DEPTH, a number's digits at
  MAX_NUMBER_CHARS, documents at MAX_DOCUMENTS, list checks use sets;
- names match their pattern as a whole (`fullmatch`: "web\n" is not a name).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.composer import Composer, ComposerError
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode
from yaml.resolver import Resolver

from sigmad.errors import SpecError
from sigmad.units import parse_cpu, parse_size

try:
    from yaml._yaml import CParser as _Events  # libyaml's scanner and parser: fast
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Events(Reader, Scanner, Parser):  # type: ignore[no-redef]
        def __init__(self, stream: str) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)

# Patterns are used with fullmatch only.
NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
FILE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")  # a file of a config
LABEL_RE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?")
# Docker's image reference grammar (distribution/reference): [domain[:port]/]path[:tag][@digest]
# with lowercase path components joined by '.', '_', '__' or dashes.
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_PART = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?"
IMAGE_RE = re.compile(
    rf"(?P<name>(?:{_DOMAIN}/)?{_PATH_PART}(?:/{_PATH_PART})*)"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9A-Fa-f]{32,})?")
MAX_IMAGE = 512  # characters of a whole reference (Docker: 255 for the name)
MAX_IMAGE_NAME = 255
MAX_NAME = 40
MAX_DEPTH = 16  # nesting levels of a document (the spec itself needs 5)
MAX_NUMBER_CHARS = 24  # characters of an integer scalar (beyond 64 bits is never meant)
MAX_DOCUMENTS = 100  # apps in one file: one apply is one transaction (sigmad.api.apps)
MAX_REPLICAS = 10_000
RESTART_POLICIES = ("always", "on-failure", "never")
NETWORK_MODES = ("overlay", "host-compat")
STRATEGIES = ("spread", "binpack")
OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
MAX_READY_TIMEOUT = 3600
DURATION_RE = re.compile(r"([0-9]{1,7})([smh]?)")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}
PARALLEL_RE = re.compile(r"([0-9]{1,7})(%?)")
MAX_MIN_READY = 3600
MAX_PROGRESS_DEADLINE = 24 * 3600
MIGRATION_POLICIES = ("auto", "manual")
RECLAIM_POLICIES = ("wipe", "retain")
MAX_VOLUMES = 8
MAX_MOUNT = 256
# Container paths a disk may not be mounted onto (or under): the runtime's own.
RESERVED_MOUNTS = ("/proc", "/sys", "/dev", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf")
MAX_CONFIGS = 16  # configs (and env_from entries) of one app
MAX_VERSION = 10**9
SIGNALS = ("SIGHUP", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGTERM", "SIGQUIT", "SIGWINCH")
ON_CHANGE = ("none", "restart", *(f"signal:{s}" for s in SIGNALS))


@dataclass(slots=True)
class Resources:
    """CPU in millicores and memory in bytes; 0 means best effort (request) or no cap (limit)."""

    cpu_m: int = 0
    memory: int = 0


@dataclass(slots=True)
class ResourceSpec:
    request: Resources = field(default_factory=Resources)
    limit: Resources = field(default_factory=Resources)


@dataclass(slots=True)
class ReadyCheck:
    """When a started container counts as ready: a TCP port accepts, an HTTP path answers
    2xx/3xx, or a command exits 0 — within `timeout` seconds."""

    tcp: int = 0
    http: str = ""
    port: int = 0
    exec: list[str] = field(default_factory=list)
    timeout: float = 60.0


@dataclass(slots=True)
class ContainerSpec:
    name: str
    image: str
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    ready: ReadyCheck | None = None


@dataclass(slots=True)
class Expression:
    """A node label requirement: `key` In/NotIn `values`, or Exists/DoesNotExist."""

    key: str
    operator: str
    values: list[str] = field(default_factory=list)

    def matches(self, labels: dict[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        if self.operator == "In":
            return labels.get(self.key) in self.values
        return labels.get(self.key) not in self.values


@dataclass(slots=True)
class Placement:
    labels: dict[str, str] = field(default_factory=dict)
    expressions: list[Expression] = field(default_factory=list)
    spread: str = ""  # a node label key to spread the app's replicas over
    strategy: str = "spread"  # or binpack

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether a node with `labels` satisfies the selector."""
        return all(labels.get(k) == v for k, v in self.labels.items()) and all(
            e.matches(labels) for e in self.expressions
        )


@dataclass(slots=True)
class Port:
    """A named port that gets a host port from the node's range. `container` is the port the
    overlay instance serves on; 0 in host-compat mode, where the instance serves on the host
    port itself (`SIGMA_HOST_PORT_<NAME>`)."""

    name: str
    container: int
    protocol: str = "tcp"

    @property
    def env(self) -> str:
        """`SIGMA_HOST_PORT_<NAME>`."""
        return "SIGMA_HOST_PORT_" + self.name.upper().replace("-", "_")


@dataclass(slots=True)
class NetworkSpec:
    mode: str = "overlay"
    ports: list[Port] = field(default_factory=list)
    ips: list[str] = field(default_factory=list)  # fixed overlay IPs: instance i gets ips[i]

    def fixed_ip(self, index: int) -> str:
        """The fixed overlay IP of instance `index` ("" for one the cluster picks)."""
        return self.ips[index] if index < len(self.ips) else ""


@dataclass(slots=True)
class VolumeSpec:
    """A whole local SSD of at least `min_size` bytes for each instance, mounted at `mount`
    in every container; `reclaim` says what happens to it when the instance goes: wiped
    (then free for anyone) or retained (until `sigmactl ssd release`)."""

    name: str
    mount: str
    ssd: int = 1
    min_size: int = 0
    reclaim: str = "wipe"


@dataclass(slots=True)
class ConfigMount:
    """A config of the app's namespace mounted read-only at `mount` in every container:
    `version` 0 follows the latest; `on_change` says what a running instance does when its
    version moves (none, restart, or signal:SIG to every container)."""

    name: str
    mount: str
    version: int = 0
    on_change: str = "none"


@dataclass(slots=True)
class EnvFrom:
    """The KEY=VALUE lines of `file` of config `config` become environment variables of
    every container when it is made."""

    config: str
    file: str


@dataclass(slots=True)
class UpdateSpec:
    """How a new revision rolls out (`update:`; defaults: one at a time, revert on)."""

    max_parallel: int = 1  # instances, or a percentage of replicas when `percent`
    percent: bool = False
    canary: int = 0
    min_ready: float = 10.0  # seconds an instance must be ready before its step counts done
    progress_deadline: float = 600.0  # seconds an instance may take to become ready
    auto_revert: bool = True
    auto_promote: bool = False


@dataclass(slots=True)
class AppSpec:
    app: str
    containers: list[ContainerSpec]
    namespace: str = "default"
    replicas: int = 1
    placement: Placement = field(default_factory=Placement)
    network: NetworkSpec = field(default_factory=NetworkSpec)
    restart: str = "always"
    depends_on: list[str] = field(default_factory=list)
    migration: str = "auto"  # when its node is lost: move at once, or wait for `migrate`
    volumes: list[VolumeSpec] = field(default_factory=list)
    configs: list[ConfigMount] = field(default_factory=list)
    env_from: list[EnvFrom] = field(default_factory=list)
    update: UpdateSpec = field(default_factory=UpdateSpec)

    @property
    def key(self) -> str:
        """`namespace/app`."""
        return f"{self.namespace}/{self.app}"

    def limit(self) -> Resources:
        """One instance's caps summed over its containers; 0 if any container is uncapped."""
        cpu = [c.resources.limit.cpu_m for c in self.containers]
        memory = [c.resources.limit.memory for c in self.containers]
        return Resources(sum(cpu) if all(cpu) else 0, sum(memory) if all(memory) else 0)

    def request(self) -> Resources:
        """What one instance reserves from the pool: the sum over its containers."""
        return Resources(
            sum(c.resources.request.cpu_m for c in self.containers),
            sum(c.resources.request.memory for c in self.containers),
        )


class Fields:
    """A mapping being validated: takes known keys, then rejects whatever is left."""

    def __init__(self, path: str, value: object, generic: str) -> None:
        if not isinstance(value, dict):
            raise SpecError(path, f"must be a mapping, got {_kind(value)}")
        self.path = path
        self.generic = generic
        self.left = dict(value)

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def take(self, key: str, default: Any = None, required: bool = False) -> Any:
        if key not in self.left:
            if required:
                raise SpecError(self.at(key), "is required")
            return default
        return self.left.pop(key)

    def done(self) -> None:
        for key in self.left:
            raise SpecError(self.at(key), "unknown field")


def shown(value: object, width: int = 60) -> str:
    """`value` as an error message quotes it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= width else text[:width] + "…"


def _kind(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _name(path: str, value: object) -> str:
    if not isinstance(value, str) or len(value) > MAX_NAME or not NAME_RE.fullmatch(value):
        raise SpecError(
            path,
            f"{shown(value)} is not a valid name (lowercase letters, digits and '-', "
            f"at most {MAX_NAME} characters, starting and ending with a letter or digit)",
        )
    return value


def quantity(path: str, value: object, parse: Callable[[object], int]) -> int:
    try:
        return parse(value)
    except ValueError as exc:
        raise SpecError(path, str(exc)) from None


def _resources(path: str, value: object) -> Resources:
    fields = Fields(path, value or {}, "")
    res = Resources(
        quantity(fields.at("cpu"), fields.take("cpu", 0), parse_cpu),
        quantity(fields.at("memory"), fields.take("memory", 0), parse_size),
    )
    fields.done()
    return res


def _resource_spec(path: str, value: object) -> ResourceSpec:
    fields = Fields(path, value or {}, "")
    spec = ResourceSpec(
        _resources(fields.at("request"), fields.take("request")),
        _resources(fields.at("limit"), fields.take("limit")),
    )
    fields.done()
    for attr, key in (("cpu_m", "cpu"), ("memory", "memory")):
        limit, request = getattr(spec.limit, attr), getattr(spec.request, attr)
        if limit and limit < request:
            raise SpecError(
                f"{path}.limit.{key}", "is below the request (the limit is the cap; it may "
                "exceed the request but not fall under it)"
            )
    return spec


def string_map(path: str, value: object, key_re: re.Pattern[str], what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(path, f"must be a mapping, got {_kind(value)}")
    out: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key_re.fullmatch(key):
            raise SpecError(f"{path}.{key}", f"is not a valid {what} name")
        if isinstance(item, dict | list) or item is None:
            raise SpecError(f"{path}.{key}", f"must be a string, got {_kind(item)}")
        out[key] = str(item).lower() if isinstance(item, bool) else str(item)
    return out


def _container(path: str, value: object) -> ContainerSpec:
    fields = Fields(path, value, "containers[]")
    name = _name(fields.at("name"), fields.take("name", required=True))
    image = image_reference(fields.at("image"), fields.take("image", required=True))
    command = fields.take("command", [])
    if not isinstance(command, list) or not all(isinstance(a, str | int) for a in command):
        raise SpecError(fields.at("command"), "must be a list of strings, e.g. [httpd, -f]")
    spec = ContainerSpec(
        name=name,
        image=image,
        command=[str(a) for a in command],
        env=string_map(fields.at("env"), fields.take("env"), ENV_RE, "environment variable"),
        resources=_resource_spec(fields.at("resources"), fields.take("resources")),
        ready=_ready(fields.at("ready"), fields.take("ready")),
    )
    fields.done()
    return spec


def image_reference(path: str, value: object) -> str:
    """`value` if it is a Docker image reference, e.g. `lab-registry:5000/sigma/busybox:1.36`
    or `busybox@sha256:<hex>` (see IMAGE_RE)."""
    match = IMAGE_RE.fullmatch(value) if isinstance(value, str) and len(value) <= MAX_IMAGE \
        else None
    if not isinstance(value, str) or match is None or len(match["name"]) > MAX_IMAGE_NAME:
        raise SpecError(path, f"{shown(value)} is not an image reference "
                        "(REPOSITORY[:TAG][@DIGEST], lowercase, e.g. registry:5000/team/app:1.2)")
    return value


def _port_number(path: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise SpecError(path, f"{shown(value)} is not a port number (1-65535)")
    return value


def _ready(path: str, value: object) -> ReadyCheck | None:
    if value is None:
        return None
    fields = Fields(path, value, "")
    check = ReadyCheck()
    kinds = [k for k in ("tcp", "http", "exec") if k in fields.left]
    if len(kinds) != 1:
        raise SpecError(path, "needs exactly one of tcp, http or exec")
    if "tcp" in fields.left:
        check.tcp = _port_number(fields.at("tcp"), fields.take("tcp"))
    if "http" in fields.left:
        check.http = fields.take("http")
        if not isinstance(check.http, str) or not check.http.startswith("/"):
            raise SpecError(fields.at("http"), "must be a path starting with /")
        check.port = _port_number(fields.at("port"), fields.take("port", required=True))
    if "exec" in fields.left:
        check.exec = fields.take("exec")
        if not isinstance(check.exec, list) or not check.exec or not all(
            isinstance(a, str) for a in check.exec
        ):
            raise SpecError(fields.at("exec"), "must be a non-empty list of strings")
    timeout = fields.take("timeout", 60)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not (
        0 < timeout <= MAX_READY_TIMEOUT
    ):
        raise SpecError(fields.at("timeout"), f"must be seconds, from 1 to {MAX_READY_TIMEOUT}")
    check.timeout = float(timeout)
    fields.done()
    return check


def _mount(path: str, value: object) -> str:
    """An absolute container path, normalised, not / and not one of the runtime's own."""
    if not isinstance(value, str) or not value.startswith("/") or len(value) > MAX_MOUNT:
        raise SpecError(path, f"{shown(value)} is not an absolute path (e.g. /data, at most "
                        f"{MAX_MOUNT} characters)")
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if ".." in parts or any(ch.isspace() or ch in ":," for ch in value):
        raise SpecError(path, f"{shown(value)} may not hold '..', spaces, ':' or ','")
    mount = "/" + "/".join(parts)
    if mount == "/":
        raise SpecError(path, "cannot mount a disk onto / (the container's root): use a "
                        "directory such as /data")
    for reserved in RESERVED_MOUNTS:
        if mount == reserved or mount.startswith(reserved + "/"):
            raise SpecError(path, f"{mount} is the container runtime's own ({reserved})")
    return mount


def _volume(path: str, value: object) -> VolumeSpec:
    fields = Fields(path, value, "volumes[]")
    name = _name(fields.at("name"), fields.take("name", required=True))
    ssd = fields.take("ssd", required=True)
    if isinstance(ssd, bool) or ssd != 1:
        raise SpecError(fields.at("ssd"), f"{shown(ssd)}: must be 1 (a volume is one whole disk; "
                        "list more volumes for more disks)")
    volume = VolumeSpec(
        name=name, mount=_mount(fields.at("mount"), fields.take("mount", required=True)),
        min_size=quantity(fields.at("min_size"), fields.take("min_size", 0), parse_size),
        reclaim=_choice(fields.at("reclaim"), fields.take("reclaim", "wipe"), RECLAIM_POLICIES),
    )
    fields.done()
    return volume


def _volumes(value: object) -> list[VolumeSpec]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_VOLUMES:
        raise SpecError("volumes", f"must be a list of at most {MAX_VOLUMES} volumes")
    volumes = [_volume(f"volumes[{i}]", v) for i, v in enumerate(value)]
    for i, v in enumerate(volumes):
        for earlier in volumes[:i]:
            if v.name == earlier.name:
                raise SpecError(f"volumes[{i}].name", f"{v.name!r} is used twice")
            if v.mount == earlier.mount or v.mount.startswith(earlier.mount + "/") \
                    or earlier.mount.startswith(v.mount + "/"):
                raise SpecError(f"volumes[{i}].mount", f"{v.mount} overlaps volume "
                                f"{earlier.name}'s mount {earlier.mount}")
    return volumes


def _config_mount(path: str, value: object) -> ConfigMount:
    fields = Fields(path, value, "configs[]")
    name = _name(fields.at("name"), fields.take("name", required=True))
    mount = _mount(fields.at("mount"), fields.take("mount", required=True))
    version = fields.take("version", "latest")
    if version == "latest":
        version = 0
    elif isinstance(version, bool) or not isinstance(version, int) or \
            not 1 <= version <= MAX_VERSION:
        raise SpecError(fields.at("version"), f"{shown(version)} is not 'latest' or a version "
                        "number (1, 2, …)")
    on_change = _choice(fields.at("on_change"), fields.take("on_change", "none"), ON_CHANGE)
    fields.done()
    return ConfigMount(name, mount, version, on_change)


def _configs(value: object, volumes: list[VolumeSpec]) -> list[ConfigMount]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_CONFIGS:
        raise SpecError("configs", f"must be a list of at most {MAX_CONFIGS} configs, e.g. "
                        "[{name: web-conf, mount: /etc/web}]")
    configs = [_config_mount(f"configs[{i}]", c) for i, c in enumerate(value)]
    taken = [(f"volume {v.name}", v.mount) for v in volumes]
    for i, c in enumerate(configs):
        if any(c.name == earlier.name for earlier in configs[:i]):
            raise SpecError(f"configs[{i}].name", f"{c.name!r} is mounted twice")
        for what, mount in taken:
            if c.mount == mount or c.mount.startswith(mount + "/") or \
                    mount.startswith(c.mount + "/"):
                raise SpecError(f"configs[{i}].mount", f"{c.mount} overlaps {what}'s mount "
                                f"{mount}")
        taken.append((f"config {c.name}", c.mount))
    return configs


def _env_from(value: object) -> list[EnvFrom]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_CONFIGS:
        raise SpecError("env_from", f"must be a list of at most {MAX_CONFIGS} entries, e.g. "
                        "[{config: web-env, file: env}]")
    out = []
    for i, item in enumerate(value):
        fields = Fields(f"env_from[{i}]", item, "")
        config = _name(fields.at("config"), fields.take("config", required=True))
        file = fields.take("file", required=True)
        if not isinstance(file, str) or not FILE_RE.fullmatch(file) or len(file) > 128 or \
                file.startswith(".."):
            raise SpecError(fields.at("file"), f"{shown(file)} is not a file name of the "
                            "config (letters, digits, '.', '_', '-')")
        fields.done()
        out.append(EnvFrom(config, file))
    return out



def _choice(path: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise SpecError(path, f"{shown(value)} is not one of {', '.join(choices)}")
    return str(value)


def _placement(value: object) -> Placement:
    fields = Fields("placement", value or {}, "placement")
    labels = string_map("placement.labels", fields.take("labels"), LABEL_RE, "label")
    raw = fields.take("expressions") or []
    if not isinstance(raw, list):
        raise SpecError("placement.expressions", "must be a list")
    expressions = []
    for i, item in enumerate(raw):
        ex = Fields(f"placement.expressions[{i}]", item, "")
        key = ex.take("key", required=True)
        if not isinstance(key, str) or not LABEL_RE.fullmatch(key):
            raise SpecError(ex.at("key"), f"{shown(key)} is not a label name")
        op = _choice(ex.at("operator"), ex.take("operator", required=True), OPERATORS)
        values = ex.take("values", [])
        if not isinstance(values, list) or not all(isinstance(v, str | int) for v in values):
            raise SpecError(ex.at("values"), "must be a list of strings")
        if op in ("In", "NotIn") and not values:
            raise SpecError(ex.at("values"), f"must not be empty with {op}")
        if op in ("Exists", "DoesNotExist") and values:
            raise SpecError(ex.at("values"), f"must be empty with {op}")
        ex.done()
        expressions.append(Expression(key, op, [str(v) for v in values]))
    spread = fields.take("spread", "")
    if not isinstance(spread, str) or (spread and not LABEL_RE.fullmatch(spread)):
        raise SpecError("placement.spread", f"{shown(spread)} is not a label name")
    strategy = _choice("placement.strategy", fields.take("strategy", "spread"), STRATEGIES)
    fields.done()
    return Placement(labels, expressions, spread, strategy)


def _network(value: object, replicas: int) -> NetworkSpec:
    fields = Fields("network", value or {}, "network")
    mode = _choice("network.mode", fields.take("mode", "overlay"), NETWORK_MODES)
    raw = fields.take("ports") or []
    if not isinstance(raw, list):
        raise SpecError("network.ports", "must be a list")
    ports: list[Port] = []
    names: set[str] = set()
    for i, item in enumerate(raw):
        pf = Fields(f"network.ports[{i}]", item, "")
        name = _name(pf.at("name"), pf.take("name", required=True))
        if mode == "host-compat":
            if pf.take("container") is not None:
                raise SpecError(pf.at("container"), "a host-compat instance serves on its host "
                                f"port itself ({Port(name, 0).env}): remove `container`")
            container = 0
        else:
            container = _port_number(pf.at("container"), pf.take("container", required=True))
        port = Port(name, container,
                    _choice(pf.at("protocol"), pf.take("protocol", "tcp"), ("tcp", "udp")))
        pf.done()
        if port.name in names:
            raise SpecError(pf.at("name"), f"{port.name!r} is used twice")
        names.add(port.name)
        ports.append(port)
    ips = _fixed_ips(fields.take("ip"), replicas)
    fields.done()
    return NetworkSpec(mode, ports, ips)


def _fixed_ips(value: object, replicas: int) -> list[str]:
    """`network.ip`: one IPv4 address (one replica) or a list, exactly one per replica in
    index order, no address twice."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise SpecError("network.ip", "must be an IPv4 address, or a list of them (one per "
                        "replica)")
    if len(items) != replicas:
        raise SpecError("network.ip", f"{len(items)} fixed IP(s) for {replicas} replicas: "
                        "give one per replica, or drop network.ip to let the cluster pick")
    ips: list[str] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        where = "network.ip" if isinstance(value, str) else f"network.ip[{i}]"
        try:
            ip = str(ipaddress.IPv4Address(item if isinstance(item, str) else ""))
        except ValueError:
            raise SpecError(where, f"{shown(item)} is not an IPv4 address") from None
        if ip in seen:
            raise SpecError(where, f"{ip} is listed twice")
        seen.add(ip)
        ips.append(ip)
    return ips


def _depends_on(value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SpecError("depends_on", "must be a list of app names")
    for i, name in enumerate(value):
        _name(f"depends_on[{i}]", name)
    return list(value)


def _duration(path: str, value: object, most: float) -> float:
    """Seconds from `30`, `10s`, `10m` or `1h`, from 0 to `most`."""
    text = str(value) if isinstance(value, int | str) and not isinstance(value, bool) else ""
    match = DURATION_RE.fullmatch(text)
    seconds = int(match[1]) * DURATION_UNITS[match[2] or "s"] if match else -1
    if not 0 <= seconds <= most:
        raise SpecError(path, f"{shown(value)} is not a duration from 0 to {most:g}s "
                        "(e.g. 10s, 10m, 1h)")
    return float(seconds)


def update_spec(value: object, replicas: int) -> UpdateSpec:
    """The `update:` block (validated field by field)."""
    if value is None:
        return UpdateSpec()
    fields = Fields("update", value, "update")
    parallel = fields.take("max_parallel", 1)
    text = str(parallel) if isinstance(parallel, int | str) and not isinstance(parallel, bool) \
        else ""
    match = PARALLEL_RE.fullmatch(text)
    number = int(match[1]) if match else 0
    if not match or number < 1 or (match[2] and number > 100):
        raise SpecError(fields.at("max_parallel"), f"{shown(parallel)} is not a number of "
                        "instances (1 or more) or a percentage of replicas (1% to 100%)")
    canary = fields.take("canary", 0)
    if isinstance(canary, bool) or not isinstance(canary, int) or not 0 <= canary <= replicas:
        raise SpecError(fields.at("canary"), f"{shown(canary)} is not a whole number from 0 "
                        f"to the replicas ({replicas})")
    flags = {}
    for name in ("auto_revert", "auto_promote"):
        flag = fields.take(name, name == "auto_revert")
        if not isinstance(flag, bool):
            raise SpecError(fields.at(name), f"{shown(flag)} is not true or false")
        flags[name] = flag
    min_ready = _duration(fields.at("min_ready"), fields.take("min_ready", 10), MAX_MIN_READY)
    deadline = _duration(fields.at("progress_deadline"), fields.take("progress_deadline", 600),
                         MAX_PROGRESS_DEADLINE)
    if deadline < 1:
        raise SpecError(fields.at("progress_deadline"), "must be at least 1s")
    fields.done()
    return UpdateSpec(number, bool(match[2]), canary, min_ready, deadline, **flags)


def validate(doc: object) -> AppSpec:
    """An AppSpec from one parsed YAML/JSON document, or SpecError naming the bad field."""
    fields = Fields("", doc, "")
    app = _name("app", fields.take("app", required=True))
    namespace = _name("namespace", fields.take("namespace", "default"))
    replicas = fields.take("replicas", 1)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or not (
        0 <= replicas <= MAX_REPLICAS
    ):
        raise SpecError("replicas",
                        f"{shown(replicas)} is not a whole number from 0 to {MAX_REPLICAS}")
    raw = fields.take("containers", required=True)
    if not isinstance(raw, list) or not raw:
        raise SpecError("containers", "must be a non-empty list")
    containers = [_container(f"containers[{i}]", c) for i, c in enumerate(raw)]
    seen: set[str] = set()
    for i, c in enumerate(containers):
        if c.name in seen:
            raise SpecError(f"containers[{i}].name", f"{c.name!r} is used twice")
        seen.add(c.name)
    placement = _placement(fields.take("placement"))
    network = _network(fields.take("network"), replicas)
    restart = _choice("restart", fields.take("restart", "always"), RESTART_POLICIES)
    depends_on = _depends_on(fields.take("depends_on"))
    migration = _choice("migration", fields.take("migration", "auto"), MIGRATION_POLICIES)
    volumes = _volumes(fields.take("volumes"))
    configs = _configs(fields.take("configs"), volumes)
    env_from = _env_from(fields.take("env_from"))
    update = update_spec(fields.take("update"), replicas)
    if app in depends_on:
        raise SpecError("depends_on", f"an app cannot depend on itself ({app})")
    fields.done()
    return AppSpec(
        app=app, namespace=namespace, replicas=replicas, containers=containers,
        placement=placement, network=network, restart=restart, depends_on=depends_on,
        migration=migration, volumes=volumes, configs=configs, env_from=env_from,
        update=update,
    )


class Refused:
    """What the loader builds instead of a value it will not build (an alias, a number too
    long); validation refuses it at its field (`_refused`)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return "<refused>"


_ALIAS = "tag:sigma,2026:alias"


class _Loader(Composer, _Events, SafeConstructor, Resolver):
    """PyYAML's safe loader (libyaml's parser when present) bounded as the module docstring
    says: an alias composes to a node of its own (never the anchored one), nesting stops at
    MAX_DEPTH, long integers and values that fail their tag become `Refused`."""

    def __init__(self, text: str) -> None:
        _Events.__init__(self, text)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self.depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        if self.check_event(AliasEvent):
            event: Any = self.get_event()
            return ScalarNode(_ALIAS, event.anchor, event.start_mark, event.end_mark)
        if self.depth >= MAX_DEPTH:
            following: Any = self.peek_event()
            raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                following.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, AttributeError, IndexError, KeyError, OverflowError):
            # e.g. `!!int abc`, `!!timestamp now`: PyYAML lets these escape unconverted
            return Refused(f"is not a valid {node.tag.rpartition(':')[2]} value")

    def flatten_mapping(self, node: MappingNode) -> None:
        for key, value in node.value:
            if key.tag == "tag:yaml.org,2002:merge" and any(
                    n.tag == _ALIAS for n in [value, *getattr(value, "value", [])]
                    if isinstance(n, Node)):
                raise ConstructorError(None, None, "a merge key (<<) takes a YAML alias: "
                                       "aliases are not accepted, write the values out",
                                       key.start_mark)
        super().flatten_mapping(node)

    def construct_alias(self, node: ScalarNode) -> Refused:
        return Refused(f"is a YAML alias (*{node.value}): aliases are not accepted, write "
                       "the value out")

    def construct_yaml_int(self, node: ScalarNode) -> Any:
        if len(node.value) > MAX_NUMBER_CHARS:
            return Refused(f"is a number of {len(node.value)} characters: too large")
        return super().construct_yaml_int(node)


_Loader.add_constructor(_ALIAS, _Loader.construct_alias)  # type: ignore[type-var]
_Loader.add_constructor("tag:yaml.org,2002:int",  # type: ignore[type-var]
                        _Loader.construct_yaml_int)


def _refused(doc: object) -> None:
    """SpecError at the first `Refused` value (or key) in `doc` (in document order), naming
    its field."""
    stack: list[tuple[object, str]] = [(doc, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, Refused):
            raise SpecError(path, value.reason)
        if isinstance(value, dict):
            for key in value:
                if isinstance(key, Refused):
                    raise SpecError(f"{path}.{key}" if path else str(key), key.reason)
            stack.extend((value[key], f"{path}.{key}" if path else str(key))
                         for key in reversed(value))
        elif isinstance(value, list | tuple | set | frozenset):
            items = list(value)
            stack.extend((items[i], f"{path}[{i}]") for i in reversed(range(len(items))))


def load(text: str) -> list[object]:
    """The documents of a YAML (or JSON) text, bounded as the module docstring says; empty
    documents left out. SpecError for text that is not YAML or holds a refused value."""
    try:
        loader = _Loader(text)
    except UnicodeError:  # a lone surrogate: no UTF-8 text can hold it
        raise SpecError("spec", "is not valid Unicode text") from None
    docs: list[object] = []
    count = 0
    try:
        while loader.check_data():
            count += 1
            if count > MAX_DOCUMENTS:
                raise SpecError("spec", f"more than {MAX_DOCUMENTS} documents in one file: one "
                                "apply is one transaction; split the file")
            doc = loader.get_data()
            _refused(doc)
            if doc is not None:
                docs.append(doc)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or exc
        raise SpecError("spec", f"is not valid YAML{where}: {problem}") from None
    except RecursionError:  # pragma: no cover - nesting is bounded above
        raise SpecError("spec", f"is nested deeper than {MAX_DEPTH} levels") from None
    finally:
        loader.dispose()
    return docs


def parse(text: str) -> list[AppSpec]:
    """Every app in a YAML (or JSON) text of one or more documents; all valid or SpecError."""
    docs = load(text)
    if not docs:
        raise SpecError("spec", "holds no app")
    specs = []
    for n, doc in enumerate(docs):
        try:
            specs.append(validate(doc))
        except SpecError as exc:
            if len(docs) > 1:
                exc.message = f"document {n + 1}: {exc.message}"
            raise
    seen: set[str] = set()
    for s in specs:
        if s.key in seen:
            raise SpecError("app", f"{s.key} appears more than once in the file")
        seen.add(s.key)
    return specs
