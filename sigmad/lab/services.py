"""The lab's processes: etcd, the registry, a dockerd and an agent per host, the masters;
and the image every host pulls."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import yaml

import sigmad
from sigmad.lab import trust
from sigmad.lab.config import LabConfig, LabError
from sigmad.lab.net import inside
from sigmad.lab.state import EtcdState, HostState, MasterState, RegistryState
from sigmad.lab.system import alive, cap_cgroup, engine_ping, http_get, run, spawn, tail
from sigmad.procs import DockerdProcess, EtcdProcess

PREFIX = "/sigma/v1"
DOCKERFILE = ('FROM scratch\nCOPY busybox /bin/busybox\n'
              'RUN ["/bin/busybox","--install","-s","/bin"]\n')
BUSYBOX = Path("/bin/busybox")
REDIS = "redis-server"  # the lab's second image, when this host has it (apt-get install)


def sigma_env() -> dict[str, str]:
    """The environment of sigmad children: this sigmad importable whatever their cwd."""
    source = str(Path(sigmad.__file__).resolve().parents[1])
    paths = [source, *(p for p in os.environ.get("PYTHONPATH", "").split(":") if p)]
    return {**os.environ, "PYTHONPATH": ":".join(dict.fromkeys(paths))}


def write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def start_etcd(config: LabConfig) -> tuple[EtcdProcess, EtcdState]:
    server, peer = trust.etcd_tls(config) if config.tls else (None, None)
    etcd = EtcdProcess(config.root / "etcd", config.etcd_port, config.etcd_port + 1,
                       name=trust.etcd_name(config), hosts=(config.bridge_ip,), tls=server,
                       peer_tls=peer)
    etcd.start()
    assert etcd.proc is not None
    state = EtcdState(etcd.proc.pid, etcd.client_port, etcd.peer_port, etcd.endpoints,
                      str(etcd.data_dir))
    return etcd, state


def start_registry(config: LabConfig) -> RegistryState:
    if shutil.which("docker-registry") is None:
        raise LabError("docker-registry is not installed: apt-get install docker-registry")
    root = config.root
    path = root / "registry.yml"
    path.write_text(yaml.safe_dump({
        "version": 0.1,
        "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(root / "registry" / "data")}},
        "http": {"addr": config.registry_addr},
    }))
    pid = spawn(["docker-registry", "serve", str(path)], root / "registry.log")
    return RegistryState(pid, config.registry_addr, str(path))


def wait_registry(reg: RegistryState, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(reg.pid):
            raise LabError(f"the registry exited: {tail(log, 3)} (log: {log})")
        answer = http_get(f"http://{reg.addr}/v2/", timeout=2)
        if answer is not None and answer[0] == 200:
            return
        time.sleep(0.2)
    raise LabError(f"the registry did not answer on http://{reg.addr}/v2/ in {timeout:.0f}s "
                   f"(log: {log})")


def cap_host(host: HostState) -> None:
    """Make the host's cgroup parent, capped at its cpu and memory, and remember where (a
    lab from before caps has none: left alone). The caller saves the state."""
    if host.cpu_m and host.memory:
        try:
            made = cap_cgroup(host.cgroup_parent, host.cpu_m, host.memory)
            host.cgroups = sorted({*host.cgroups, *map(str, made)})
        except OSError as exc:
            raise LabError(f"cannot cap cgroup {host.cgroup_parent}: {exc}") from None


def dockerd(host: HostState, registry: str, tls_root: Path | None = None) -> DockerdProcess:
    """Host `host`'s dockerd: its unix socket (for the tests and the docker CLI), and with
    `tls_root` (the lab's directory) tcp://ADDRESS:2376 with --tlsverify, which the masters
    and the agent use."""
    tls = trust.dockerd_args(tls_root, host) if tls_root else ()
    return DockerdProcess(
        Path(host.root), Path(host.exec_root), netns=host.netns,
        extra_args=("--cgroup-parent", host.cgroup_parent, "--userland-proxy=false",
                    "--insecure-registry", registry, *tls),
    )


def wait_dockerds(procs: list[DockerdProcess], timeout: float = 60.0) -> None:
    async def all_ready() -> None:
        await asyncio.gather(*(p.wait_ready(timeout) for p in procs))

    try:
        asyncio.run(all_ready())
    except RuntimeError as exc:
        raise LabError(str(exc)) from None


def docker(engine: str, *args: str, timeout: float = 120.0) -> str:
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    return run(["docker", "-H", engine, *args], timeout=timeout, env=env).stdout


def build_and_push(engine: str, image: str, workdir: Path) -> None:
    """Build the busybox image (FROM scratch + the static busybox) on `engine`, push it."""
    if not BUSYBOX.exists():
        raise LabError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    if shutil.which("docker") is None:
        raise LabError("the docker client is missing: apt-get install docker.io")
    with tempfile.TemporaryDirectory(dir=workdir, prefix="image-") as context:
        (Path(context) / "Dockerfile").write_text(DOCKERFILE)
        shutil.copy(BUSYBOX, Path(context) / "busybox")
        docker(engine, "build", "-q", "-t", image, context)
    docker(engine, "push", image)


def build_from_host(engine: str, image: str, binary: str, entrypoint: list[str],
                    workdir: Path, base: str = "scratch") -> None:
    """Build an image FROM `base` holding this host's `binary` and the libraries it links (at
    the same paths), with `entrypoint`, on `engine`; push it."""
    found = shutil.which(binary)
    if found is None:
        raise LabError(f"{binary} is missing on this host: install it (apt-get)")
    libs = [p for line in run(["ldd", found]).stdout.splitlines() for p in line.split()
            if p.startswith("/")]
    with tempfile.TemporaryDirectory(dir=workdir, prefix="image-") as context:
        lines = [f"FROM {base}"]
        for i, path in enumerate([found, *libs]):
            shutil.copy(os.path.realpath(path), Path(context) / f"f{i}")
            lines.append(f"COPY f{i} {path}")
        lines.append(f"ENTRYPOINT {json.dumps(entrypoint or [found])}")
        (Path(context) / "Dockerfile").write_text("\n".join(lines) + "\n")
        docker(engine, "build", "-q", "-t", image, context)
    docker(engine, "push", image)


def master_config_path(config: LabConfig, index: int) -> Path:
    """DIR/master.yaml for the first master, DIR/masterN.yaml for master N."""
    return config.root / ("master.yaml" if index == 1 else f"master{index}.yaml")


def write_master_config(config: LabConfig, token: str, listen: str, path: Path,
                        index: int, master_id: str = "") -> None:
    etcd: dict[str, object] = {"endpoints": [f"http://127.0.0.1:{config.etcd_port}"],
                               "prefix": PREFIX}
    tls: dict[str, object] = {}
    if config.tls:
        etcd = {"endpoints": [f"https://127.0.0.1:{config.etcd_port}"], "prefix": PREFIX,
                **trust.section(trust.master_etcd(config.root, index))}
        tls = trust.master_sections(config.root, index)
    write_private(path, yaml.safe_dump({
        **({"id": master_id} if master_id else {}),
        "listen": listen,
        "token": token,
        "etcd": etcd,
        "reconcile_interval": 1,
        "overlay_cidr": config.overlay_cidr,
        **tls,
    }))


def start_master(config: LabConfig, token: str, listen: str, path: Path, index: int,
                 master_id: str = "") -> MasterState:
    write_master_config(config, token, listen, path, index, master_id)
    return MasterState(spawn_master(path), listen, str(path))


def sigmad_command(sigmad: str = "") -> tuple[list[str], dict[str, str]]:
    """How to run sigmad and its environment: this source tree's (the default), or the
    executable `sigmad` (an installed one, e.g. /opt/sigma/venv/bin/sigmad), which then
    imports its own package, not this tree."""
    if not sigmad:
        return [sys.executable, "-m", "sigmad"], sigma_env()
    return [sigmad], {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def spawn_master(config: Path, sigmad: str = "") -> int:
    """`sigmad master --config CONFIG` (`sigmad_command`), detached, logging beside its
    config; its pid."""
    command, env = sigmad_command(sigmad)
    return spawn([*command, "master", "--config", str(config)], config.with_suffix(".log"),
                 env=env)


def master_url(listen: str, ca: str) -> str:
    """The URL of the master listening on `listen` (https when the lab has a CA)."""
    return f"{'https' if ca else 'http'}://{listen}"


def master_roles(masters: list[MasterState], token: str, ca: str = "") -> dict[str, str]:
    """listen → role ("leader" or "standby") as the first master that answers tells
    (GET /v1/masters); empty when none answers."""
    for m in masters:
        answer = http_get(f"{master_url(m.listen, ca)}/v1/masters",
                          {"Authorization": f"Bearer {token}"}, timeout=2, ca=ca)
        if answer is None or answer[0] != 200:
            continue
        items = json.loads(answer[1]).get("items", [])
        return {urlsplit(api).netloc: str(i.get("role", ""))
                for i in items if isinstance(api := i.get("api"), str)}
    return {}


AGENT_METRICS_PORT = 9464  # each agent's /metrics, on its host's underlay address


def write_node_config(config: LabConfig, host: HostState, index: int) -> None:
    etcd: dict[str, object] = {"endpoints": [f"http://{config.bridge_ip}:{config.etcd_port}"],
                               "prefix": PREFIX}
    engine: dict[str, object] = {"engine": host.engine}
    if config.tls:
        files = trust.node_files(config.root, host.name)
        etcd = {"endpoints": [f"https://{config.bridge_ip}:{config.etcd_port}"],
                "prefix": PREFIX, **trust.section(files)}
        engine = {"engine": trust.engine_url(host),
                  "engine_tls": trust.section(files)}
    write_private(Path(host.node_config), yaml.safe_dump({
        "name": host.name,
        **engine,
        "address": host.address,
        "labels": {"zone": "room-a" if index % 2 else "room-b", "host": host.name},
        **({"capacity": {"cpu": f"{host.cpu_m}m", "memory": host.memory}}
           if host.cpu_m and host.memory else {}),
        "port_range": list(config.port_range),
        "heartbeat_ttl": config.heartbeat_ttl,
        "overlay_cidr": config.overlay_cidr,
        "etcd": etcd,
        "data_dir": str(Path(host.root) / "sigma"),
        "ssds": [d.device for d in host.ssds],
        # the host's usage is its engine's containers' (the machine is shared by every host)
        "usage_cgroup": host.cgroup_parent,
        "metrics_listen": f"{host.address}:{AGENT_METRICS_PORT}",
    }))


def start_agent(host: HostState, sigmad: str = "") -> int:
    """The node agent (`sigmad_command`), inside the host's namespace (it programs netlink
    devices there)."""
    command, env = sigmad_command(sigmad)
    args = [*inside(host.netns), *command, "node", "--config", host.node_config]
    return spawn(args, Path(host.root) / "node.log", env=env)


def ready_nodes(server: str, token: str, ca: str = "") -> set[str] | None:
    """Names of the Ready nodes the master lists, or None when it does not answer."""
    answer = http_get(f"{server}/v1/nodes", {"Authorization": f"Bearer {token}"}, timeout=3,
                      ca=ca)
    if answer is None or answer[0] != 200:
        return None
    items = json.loads(answer[1]).get("items", [])
    return {n["name"] for n in items if n.get("status") == "Ready"}


def wait_nodes(server: str, token: str, masters: list[MasterState], hosts: list[HostState],
               timeout: float = 60.0, ca: str = "") -> None:
    """Until the master is healthy and lists every host's node Ready (bounded)."""
    want = {h.name for h in hosts}
    deadline = time.monotonic() + timeout
    seen: set[str] | None = None
    while time.monotonic() < deadline:
        if masters and not any(alive(m.pid) for m in masters):
            log = Path(masters[0].config).with_suffix(".log")
            raise LabError(f"the master exited: {tail(log, 3)} (log: {log})")
        for h in hosts:
            if not alive(h.agent_pid):
                log = Path(h.root) / "node.log"
                raise LabError(f"the agent of {h.name} exited: {tail(log, 3)} (log: {log})")
        seen = ready_nodes(server, token, ca)
        if seen is not None and want <= seen:
            return
        time.sleep(0.5)
    missing = ", ".join(sorted(want - (seen or set())))
    logs = ", ".join(str(Path(h.root) / "node.log") for h in hosts)
    raise LabError(f"nodes not Ready after {timeout:.0f}s: {missing or 'master not answering'}"
                   f" (logs: {logs})")


def engine_ready(host: HostState) -> bool:
    return engine_ping(host.socket)
