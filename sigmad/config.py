"""Configuration files of `sigmad master` and `sigmad node` (see conf/*.yaml).

Every value is checked at load, with the field named: numbers are finite and within their
range (an `overcommit: .inf` would make every placement pass raise), names that become etcd
keys match their pattern as a whole."""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sigmad.errors import SpecError
from sigmad.models import DEFAULT_PORT_RANGE, MAX_OVERCOMMIT, Overcommit
from sigmad.spec import LABEL_RE, Fields, Resources, quantity, shown, string_map
from sigmad.tls import TlsFiles, endpoint_problem, take_tls, tls_section
from sigmad.tokens import weakness
from sigmad.units import parse_cpu, parse_size

DEFAULT_ETCD = "http://127.0.0.1:2379"
DEFAULT_PREFIX = "/sigma/v1"
DEFAULT_LISTEN = "127.0.0.1:7475"
DEFAULT_ENGINE = "unix:///var/run/docker.sock"
DEFAULT_OVERLAY_CIDR = "10.244.0.0/16"
DEFAULT_LEADER_TTL = 5
DEFAULT_FENCE_GRACE = 5.0
DEFAULT_DATA_DIR = "/var/lib/sigma"
# Devices the agent may format: stable names only (a /dev/sdX can name another disk after a
# reboot), and loop devices for test hosts.
SSD_PATH_RE = re.compile(r"/dev/(disk/by-(id|path|uuid|partuuid)/[A-Za-z0-9._:+@-]+|loop[0-9]+"
                         r"|mapper/[A-Za-z0-9._-]+)")  # fullmatch
MAX_SSDS = 64
MASTER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,62}")  # fullmatch
CGROUP_RE = re.compile(r"(/?[A-Za-z0-9_.-]{1,100}){0,16}")  # fullmatch ("" allowed)
NODE_NAME_RE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,251}[A-Za-z0-9])?")  # fullmatch


@dataclass
class EtcdConfig:
    endpoints: list[str] = field(default_factory=lambda: [DEFAULT_ETCD])
    prefix: str = DEFAULT_PREFIX
    tls: TlsFiles | None = None  # CA and client certificate of https:// endpoints


@dataclass
class MasterConfig:
    token: str
    listen: str = DEFAULT_LISTEN
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    reconcile_interval: float = 300.0  # every record re-checked this often (a safety net:
    # changes are followed as they happen, from etcd's watch and the engines' events)
    workers: int = 64  # instances driven at once
    engine_parallel: int = 8  # steps at once on one engine
    overlay_cidr: str = DEFAULT_OVERLAY_CIDR
    id: str = ""  # "" = HOSTNAME:PORT (see master_id)
    advertise: str = ""  # the API's URL for others; "" = http://LISTEN (see api_url)
    leader_ttl: int = DEFAULT_LEADER_TTL
    audit_log: str = ""  # a JSON-lines file every audit entry is appended to ("": etcd only)
    max_requests_per_token: int = 64  # API calls in flight at once per token
    max_streams_per_token: int = 8  # event streams open at once per token
    fence_grace: float = DEFAULT_FENCE_GRACE  # seconds after a node's heartbeat lease lapsed
    # before its instances' copies count as fenced when its engine cannot stop them (its
    # agent stops them itself before the lease can lapse: this covers a slow stop)
    header_timeout: float = 10.0  # seconds a connection has to send a request's head
    body_timeout: float = 30.0  # seconds a request's body has to arrive
    max_connections: int = 1024  # API connections served at once (more are answered 503)
    stream_heartbeat: float = 5.0  # seconds between heartbeats of an idle event stream
    exec_idle_timeout: float = 900.0  # seconds a terminal (exec -it) may pass without a byte
    history_keep: float = 300.0  # seconds of etcd history the leader keeps (compacting older)
    compact_interval: float = 60.0  # seconds between the leader's compactions
    tls: TlsFiles | None = None  # the API's certificate and key: HTTPS
    engine_tls: TlsFiles | None = None  # CA and client certificate for tcp:// engines

    def master_id(self) -> str:
        """This master's id: `id`, else this host's name and the listen port."""
        return self.id or f"{socket.gethostname()}:{self.listen.rpartition(':')[2]}"

    def api_url(self) -> str:
        """The URL others reach this master's API at: `advertise`, else http(s)://LISTEN
        (with this host's name for a wildcard listen address)."""
        if self.advertise:
            return self.advertise.rstrip("/")
        host, _, port = self.listen.rpartition(":")
        if host in ("", "0.0.0.0", "::", "[::]"):
            host = socket.gethostname()
        return f"{'https' if self.tls else 'http'}://{host}:{port}"


@dataclass
class NodeConfig:
    name: str = field(default_factory=socket.gethostname)
    engine: str = DEFAULT_ENGINE
    address: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    reserved: Resources = field(default_factory=Resources)
    # What the node record reports instead of the engine's figures (0: the engine's): for a
    # host whose engine's cgroup parent is capped below the machine (the lab's hosts).
    capacity: Resources = field(default_factory=Resources)
    overcommit: Overcommit = field(default_factory=Overcommit)
    port_range: list[int] = field(default_factory=lambda: list(DEFAULT_PORT_RANGE))
    heartbeat_ttl: int = 5
    overlay_cidr: str = DEFAULT_OVERLAY_CIDR
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    engine_tls: TlsFiles | None = None  # CA and client certificate of a tcp:// engine
    data_dir: str = DEFAULT_DATA_DIR  # the agent's own files (SSDs mounted under ssds/)
    ssds: list[str] = field(default_factory=list)  # the only devices sigma ever formats
    usage_interval: float = 5.0  # seconds between usage samples (0: none; sigmad.node.usage)
    usage_cgroup: str = ""  # the engine's cgroup parent, measured as the host ("": machine)
    metrics_listen: str = ""  # HOST:PORT of the agent's /metrics ("": not served)
    overlay_netfilter: bool = False  # frames bridged between instances through iptables


def _etcd(fields: Fields) -> EtcdConfig:
    raw = Fields(fields.at("etcd"), fields.take("etcd") or {}, "")
    endpoints = raw.take("endpoints", [DEFAULT_ETCD])
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    if not endpoints or not all(isinstance(e, str) and "://" in e for e in endpoints):
        raise SpecError(raw.at("endpoints"), "must be a list of URLs like http://127.0.0.1:2379")
    prefix = raw.take("prefix", DEFAULT_PREFIX)
    if not isinstance(prefix, str) or not prefix.startswith("/"):
        raise SpecError(raw.at("prefix"), "must be a key prefix starting with /")
    tls = take_tls(raw)
    raw.done()
    if problem := endpoint_problem(endpoints, tls):
        raise SpecError(raw.at("endpoints"), problem)
    return EtcdConfig(endpoints, prefix, tls)


def _api_tls(fields: Fields) -> TlsFiles | None:
    """The API's certificate and key (`tls`): the API is then served over HTTPS."""
    tls = tls_section(fields, "tls", ca=False, cert=True)
    if tls is not None and tls.ca:
        raise SpecError("tls.ca", "is not used: clients prove who they are with tokens "
                        "(remove it; sigmactl takes the CA as ca or SIGMA_CA)")
    return tls


def _engine(fields: Fields) -> tuple[str, TlsFiles | None]:
    """The node's engine URL and the TLS files of a tcp:// one (required: a plain TCP
    engine gives root on its host to whoever reaches the port)."""
    engine = fields.take("engine", DEFAULT_ENGINE)
    if not isinstance(engine, str) or not engine.startswith(("unix://", "tcp://")):
        raise SpecError("engine", "must be unix:///path/docker.sock or tcp://HOST:PORT "
                        "(with engine_tls)")
    tls = tls_section(fields, "engine_tls", ca=True, cert=True)
    if engine.startswith("tcp://") and tls is None:
        raise SpecError("engine_tls", f"is required for the remote engine {engine}: a "
                        "plain TCP engine gives root on this host to anyone who reaches it. "
                        "Set ca, cert and key (sigmad pki issue node NAME) and run dockerd "
                        "with --tlsverify, or use the unix socket")
    if engine.startswith("unix://") and tls is not None:
        raise SpecError("engine_tls", f"is only for tcp:// engines ({engine} is a unix "
                        "socket): remove it")
    return engine, tls


def _number(fields: Fields, key: str, default: float, minimum: float,
            maximum: float) -> float:
    value = fields.take(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and minimum <= value <= maximum):
        raise SpecError(fields.at(key), f"must be a number of at least {minimum:g} and at "
                        f"most {maximum:g}")
    return float(value)


def _flag(fields: Fields, key: str) -> bool:
    value = fields.take(key, False)
    if not isinstance(value, bool):
        raise SpecError(fields.at(key), "must be true or false")
    return value


def _whole(fields: Fields, key: str, default: int, low: int, high: int) -> int:
    value = fields.take(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError(fields.at(key), f"must be a whole number from {low} to {high}")
    return value


def _cidr(fields: Fields) -> str:
    """The overlay's cluster CIDR: an IPv4 network of /8 to /24 (masters and agents agree)."""
    value = fields.take("overlay_cidr", DEFAULT_OVERLAY_CIDR)
    try:
        net = ipaddress.IPv4Network(value) if isinstance(value, str) else None
    except ValueError:
        net = None
    if net is None or not 8 <= net.prefixlen <= 24:
        raise SpecError("overlay_cidr", "must be an IPv4 network like 10.244.0.0/16 "
                        "(prefix length 8 to 24)")
    return str(net)


def _ssds(fields: Fields) -> list[str]:
    """The SSD allow-list: stable device paths, each once (nothing else is ever formatted)."""
    value = fields.take("ssds", [])
    if not isinstance(value, list) or len(value) > MAX_SSDS:
        raise SpecError("ssds", f"must be a list of at most {MAX_SSDS} device paths")
    for i, path in enumerate(value):
        if not isinstance(path, str) or not SSD_PATH_RE.fullmatch(path) \
                or path.endswith(("/.", "/..")):
            raise SpecError(f"ssds[{i}]", f"{shown(path)} is not a stable device path: use "
                            "/dev/disk/by-id/NAME (or by-path, by-uuid), /dev/mapper/NAME "
                            "or /dev/loopN (a /dev/sdX name can change at reboot)")
        if value.index(path) != i:
            raise SpecError(f"ssds[{i}]", f"{path} is listed twice")
    return list(value)


def _cgroup(fields: Fields) -> str:
    value = fields.take("usage_cgroup", "")
    if not isinstance(value, str) or not CGROUP_RE.fullmatch(value) or ".." in value:
        raise SpecError("usage_cgroup", "must be a cgroup path like sigma-lab-h1 or "
                        "system.slice/docker (letters, digits, '-', '_', '.', '/'; no '..')")
    return value


def _listen(fields: Fields, key: str, default: str) -> str:
    value = fields.take(key, default)
    if not isinstance(value, str) or (value and ":" not in value):
        raise SpecError(key, "must be HOST:PORT")
    return value


def _data_dir(fields: Fields) -> str:
    value = fields.take("data_dir", DEFAULT_DATA_DIR)
    if not isinstance(value, str) or not value.startswith("/") or value.rstrip("/") == "":
        raise SpecError("data_dir", "must be an absolute directory path other than /")
    return value.rstrip("/")
def _address(fields: Fields) -> str:
    """The node's underlay (VTEP) address: an IPv4 address, or "" to leave it unset."""
    value = fields.take("address") or ""
    try:
        return str(ipaddress.IPv4Address(value if isinstance(value, str) else "")) \
            if value else ""
    except ValueError:
        raise SpecError("address", f"{shown(value)} is not an IPv4 address") from None


def _read(path: str | Path) -> Fields:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SpecError("", f"cannot read config {path}: {exc.strerror}") from None
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise SpecError("", f"config {path} is not valid YAML: {exc}") from None
    return Fields("", doc, "")


def _token_file(path: str) -> str:
    """The token in the file at `path`, which only its owner may read."""
    try:
        with open(path) as f:
            mode = os.fstat(f.fileno()).st_mode
            if mode & 0o077:
                raise SpecError("token_file", f"{path} can be read by others (mode "
                                f"{mode & 0o777:o}): chmod 600 {path}")
            return f.read().strip()
    except OSError as exc:
        raise SpecError("token_file", f"cannot read {path}: {exc.strerror}") from None


def master_config(fields: Fields) -> MasterConfig:
    """A MasterConfig from a parsed mapping (see conf/master.yaml)."""
    token = fields.take("token")
    token_file = fields.take("token_file")
    if token_file is not None and not isinstance(token_file, str):
        raise SpecError("token_file", "must be the path of a file holding the token")
    if token_file and not token:
        token = _token_file(token_file)
    if not isinstance(token, str) or len(token) < 16:
        raise SpecError("token", "is required: a secret of at least 16 characters "
                        "(or token_file: a file holding one)")
    if why := weakness(token):
        raise SpecError("token_file" if token_file else "token",
                        f"{why}: generate one with 'openssl rand -hex 24'")
    audit_log = fields.take("audit_log", "")
    if not isinstance(audit_log, str) or (audit_log and not audit_log.startswith("/")):
        raise SpecError("audit_log", "must be the absolute path of a file (JSON lines)")
    listen = fields.take("listen", DEFAULT_LISTEN)
    if not isinstance(listen, str) or ":" not in listen:
        raise SpecError("listen", "must be HOST:PORT")
    master_id = fields.take("id", "")
    if not isinstance(master_id, str) or (master_id and not MASTER_ID_RE.fullmatch(master_id)):
        raise SpecError("id", "must be 1 to 63 letters, digits, '.', '_', ':' or '-' "
                        "(default: HOSTNAME:PORT)")
    advertise = fields.take("advertise", "")
    if not isinstance(advertise, str) or (
        advertise and not advertise.startswith(("http://", "https://"))
    ):
        raise SpecError("advertise", "must be a URL like http://10.0.0.1:7475")
    ttl = fields.take("leader_ttl", DEFAULT_LEADER_TTL)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 2:
        raise SpecError("leader_ttl", "must be a whole number of seconds, at least 2")
    config = MasterConfig(
        token=token, listen=listen, etcd=_etcd(fields),
        reconcile_interval=_number(fields, "reconcile_interval", 300.0, 0.1, 86400.0),
        workers=_whole(fields, "workers", 64, 1, 4096),
        engine_parallel=_whole(fields, "engine_parallel", 8, 1, 256),
        overlay_cidr=_cidr(fields), id=master_id, advertise=advertise, leader_ttl=ttl,
        audit_log=audit_log,
        max_requests_per_token=_whole(fields, "max_requests_per_token", 64, 1, 100_000),
        max_streams_per_token=_whole(fields, "max_streams_per_token", 8, 1, 10_000),
        fence_grace=_number(fields, "fence_grace", DEFAULT_FENCE_GRACE, 0.0, 3600.0),
        header_timeout=_number(fields, "header_timeout", 10.0, 0.1, 3600.0),
        body_timeout=_number(fields, "body_timeout", 30.0, 0.1, 3600.0),
        max_connections=_whole(fields, "max_connections", 1024, 1, 1_000_000),
        stream_heartbeat=_number(fields, "stream_heartbeat", 5.0, 0.1, 3600.0),
        exec_idle_timeout=_number(fields, "exec_idle_timeout", 900.0, 1.0, 86400.0),
        history_keep=_number(fields, "history_keep", 300.0, 1.0, 30 * 86400.0),
        compact_interval=_number(fields, "compact_interval", 60.0, 0.1, 86400.0),
        tls=_api_tls(fields),
        engine_tls=tls_section(fields, "engine_tls", ca=True, cert=True),
    )
    fields.done()
    return config


def node_config(fields: Fields) -> NodeConfig:
    """A NodeConfig from a parsed mapping (see conf/node.yaml)."""
    defaults = NodeConfig()
    name = fields.take("name") or defaults.name
    if not isinstance(name, str) or not NODE_NAME_RE.fullmatch(name):
        raise SpecError("name", "must be a host name: 1 to 253 letters, digits, '-', '_' or "
                        "'.', starting and ending with a letter or digit")
    engine, engine_tls = _engine(fields)
    reserved = Fields("reserved", fields.take("reserved") or {}, "")
    reserve = Resources(
        quantity("reserved.cpu", reserved.take("cpu", 0), parse_cpu),
        quantity("reserved.memory", reserved.take("memory", 0), parse_size),
    )
    reserved.done()
    capacity = Fields("capacity", fields.take("capacity") or {}, "")
    override = Resources(
        quantity("capacity.cpu", capacity.take("cpu", 0), parse_cpu),
        quantity("capacity.memory", capacity.take("memory", 0), parse_size),
    )
    capacity.done()
    ratios = Fields("overcommit", fields.take("overcommit") or {}, "")
    overcommit = Overcommit(
        _number(ratios, "cpu", 1.0, 1.0, MAX_OVERCOMMIT),
        _number(ratios, "memory", 1.0, 1.0, MAX_OVERCOMMIT),
    )
    ratios.done()
    port_range = fields.take("port_range", DEFAULT_PORT_RANGE)
    if not (
        isinstance(port_range, list) and len(port_range) == 2
        and all(isinstance(p, int) and not isinstance(p, bool) for p in port_range)
        and 1024 <= port_range[0] <= port_range[1] <= 65535
    ):
        raise SpecError("port_range", "must be [FIRST, LAST] with 1024 <= FIRST <= LAST <= 65535")
    config = NodeConfig(
        name=name,
        engine=engine,
        address=_address(fields),
        labels=string_map("labels", fields.take("labels"), LABEL_RE, "label"),
        reserved=reserve,
        capacity=override,
        overcommit=overcommit,
        port_range=list(port_range),
        heartbeat_ttl=int(_number(fields, "heartbeat_ttl", 5, 2, 3600)),
        overlay_cidr=_cidr(fields),
        etcd=_etcd(fields),
        engine_tls=engine_tls,
        data_dir=_data_dir(fields),
        ssds=_ssds(fields),
        usage_interval=_number(fields, "usage_interval", 5.0, 0.0, 3600.0),
        usage_cgroup=_cgroup(fields),
        metrics_listen=_listen(fields, "metrics_listen", ""),
        overlay_netfilter=_flag(fields, "overlay_netfilter"),
    )
    fields.done()
    return config


def load_master(path: str | Path) -> MasterConfig:
    return master_config(_read(path))


def load_node(path: str | Path) -> NodeConfig:
    return node_config(_read(path))
