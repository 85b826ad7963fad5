"""One host's Docker Engine API, and the translation of an instance into container configs.

The only module that imports aiodocker. Everything Docker-shaped stays here: the rest of
sigma sees `ContainerState` and plain dicts of container config.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiodocker
import aiohttp

from sigmad.errors import EngineError
from sigmad.models import Instance
from sigmad.network.ipam import BRIDGE, MTU, NETWORK, mac_for
from sigmad.spec import AppSpec, ContainerSpec, Resources

log = logging.getLogger(__name__)

LABEL_INSTANCE = "sigma.instance"
LABEL_APP = "sigma.app"
LABEL_NAMESPACE = "sigma.namespace"
LABEL_CONTAINER = "sigma.container"
LABEL_GENERATION = "sigma.generation"
LABEL_INDEX = "sigma.index"
LABEL_CLUSTER = "sigma.cluster"  # the cluster's etcd prefix: engines may be shared
DEFAULT_PIDS_LIMIT = 4096  # no fork bomb takes a host down
CONNECT_FAILED = 900  # aiodocker's status for a connection that could not be made
CPU_PERIOD_NS = 1_000_000_000 // 1000  # NanoCpus per millicore


def container_name(instance: Instance, container: str) -> str:
    """A deterministic name, so the engine itself refuses a second copy."""
    return f"sigma-{instance.namespace}-{instance.name}-{container}"


def pull_failure(ref: str, error: str) -> str:
    """What a failed pull means for people: an image its registry does not have, or a
    registry that cannot be reached (the engine's words follow)."""
    lowered = error.lower()
    if any(s in lowered for s in ("not found", "manifest unknown", "does not exist")):
        return f"image {ref} not found: {error}"
    return f"image {ref} cannot be pulled: {error}"


def cap_config(limit: Resources) -> dict[str, Any]:
    """cgroup caps for a limit (create and live update alike); 0 means no cap.

    Memory and MemorySwap always go together: equal, so the container gets no swap on top
    of its cap (and Docker refuses a Memory above the old MemorySwap when set alone)."""
    caps: dict[str, Any] = {}
    if limit.cpu_m:
        caps["NanoCpus"] = limit.cpu_m * CPU_PERIOD_NS
    if limit.memory:
        caps["Memory"] = limit.memory
        caps["MemorySwap"] = limit.memory
    return caps


def container_config(
    instance: Instance, app: AppSpec, container: ContainerSpec, host_ip: str = "",
    network_of: str = "",
) -> dict[str, Any]:
    """The Engine API create body for one container of an instance.

    The first container owns the instance's network (and its published host ports); the
    others join it (`network_of`: the first container's id)."""
    host_config: dict[str, Any] = {
        **cap_config(container.resources.limit),
        "PidsLimit": DEFAULT_PIDS_LIMIT,
    }
    if container.resources.limit.memory:
        host_config["MemorySwappiness"] = 0
    ports = {p.name: p for p in app.network.ports}
    env = [f"{k}={v}" for k, v in sorted(container.env.items())]
    env += [f"SIGMA_INSTANCE={instance.name}", f"SIGMA_APP={app.app}",
            f"SIGMA_NAMESPACE={app.namespace}", f"SIGMA_INDEX={instance.index}"]
    if instance.host_ports:
        env.append(f"SIGMA_HOST_IP={host_ip}")
        env += [f"{ports[n].env}={hp}" for n, hp in sorted(instance.host_ports.items())]
    exposed: dict[str, dict[str, str]] = {}
    if network_of:
        host_config["NetworkMode"] = f"container:{network_of}"
    else:
        host_config["NetworkMode"] = NETWORK
    if not network_of and instance.host_ports:
        bindings = {
            f"{ports[n].container}/{ports[n].protocol}": [{"HostPort": str(hp)}]
            for n, hp in instance.host_ports.items()
        }
        host_config["PortBindings"] = bindings
        exposed = {key: {} for key in bindings}
    config: dict[str, Any] = {
        "Image": container.image,
        "Env": env,
        "Labels": {
            LABEL_INSTANCE: instance.key,
            LABEL_APP: app.app,
            LABEL_NAMESPACE: app.namespace,
            LABEL_INDEX: str(instance.index),
            LABEL_CONTAINER: container.name,
            LABEL_GENERATION: str(instance.generation),
        },
        "HostConfig": host_config,
    }
    if not network_of:
        config["Hostname"] = instance.name
        # The instance's own overlay IP, and the MAC derived from it (DESIGN.md §5).
        config["MacAddress"] = mac_for(instance.ip)
        config["NetworkingConfig"] = {"EndpointsConfig": {
            NETWORK: {"IPAMConfig": {"IPv4Address": instance.ip}},
        }}
    if exposed:
        config["ExposedPorts"] = exposed
    if container.command:
        # Like Kubernetes' `command`: it replaces the image's entrypoint.
        config["Entrypoint"] = container.command[:1]
        config["Cmd"] = container.command[1:]
    return config


@dataclass
class ContainerState:
    """What sigma needs from `docker inspect`."""

    id: str
    name: str
    labels: dict[str, str]
    running: bool
    status: str
    exit_code: int
    oom_killed: bool
    error: str
    started_at: str
    finished_at: str
    pid: int
    ip: str

    @classmethod
    def from_inspect(cls, data: dict[str, Any]) -> ContainerState:
        state = data.get("State") or {}
        networks = (data.get("NetworkSettings") or {}).get("Networks") or {}
        ip = next((n.get("IPAddress") for n in networks.values() if n.get("IPAddress")), "")
        return cls(
            id=data["Id"],
            name=data.get("Name", "").lstrip("/"),
            labels=(data.get("Config") or {}).get("Labels") or {},
            running=bool(state.get("Running")),
            status=state.get("Status", ""),
            exit_code=int(state.get("ExitCode") or 0),
            oom_killed=bool(state.get("OOMKilled")),
            error=state.get("Error") or "",
            started_at=state.get("StartedAt", ""),
            finished_at=state.get("FinishedAt", ""),
            pid=int(state.get("Pid") or 0),
            ip=ip,
        )

    def end_reason(self) -> str:
        """The one authoritative reason a stopped container ended (DESIGN.md §3).

        An exit status above 128 without an OOM kill is a signal (137 is SIGKILL, not OOM)."""
        if self.oom_killed:
            return "OOMKilled"
        if self.error:
            return f"FailedToStart({self.error})"
        if self.exit_code > 128:
            try:
                return f"Signaled({signal.Signals(self.exit_code - 128).name})"
            except ValueError:
                return f"Exited({self.exit_code})"
        return f"Exited({self.exit_code})"


class Engine:
    """A client for one host's Docker engine (`unix:///path.sock` or `tcp://host:port`).

    With a `cluster` (its etcd prefix), the containers it creates carry it as a label and
    `find`/`events` see only that cluster's containers, so clusters sharing an engine never
    touch each other's."""

    def __init__(self, url: str, request_timeout: float = 60.0, cluster: str = "") -> None:
        self.url = url
        self.cluster = cluster
        self._docker = aiodocker.Docker(
            url=url, timeout=aiohttp.ClientTimeout(total=request_timeout, connect=5)
        )

    async def close(self) -> None:
        await self._docker.close()

    async def _json(self, path: str, method: str = "GET", **kwargs: Any) -> Any:
        try:
            return await self._docker._query_json(path, method=method, **kwargs)
        except aiodocker.DockerError as exc:
            if exc.status == CONNECT_FAILED:
                raise EngineError(f"engine {self.url} is unreachable: {exc.message}") from None
            raise EngineError(f"{self.url}: {exc.message}", exc.status) from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise EngineError(f"engine {self.url} is unreachable: {exc or type(exc).__name__}")\
                from None

    def _label_filter(self, labels: dict[str, str] | None) -> list[str]:
        both = {**(labels or {}), **({LABEL_CLUSTER: self.cluster} if self.cluster else {})}
        return [f"{k}={v}" if v else k for k, v in both.items()]

    async def info(self) -> dict[str, Any]:
        """`docker info`: NCPU, MemTotal, ServerVersion, cgroup facts."""
        result: dict[str, Any] = await self._json("info")
        return result

    async def ping(self) -> None:
        """Whether the engine answers at all (`/_ping`); EngineError if not."""
        try:
            async with self._docker._query("_ping", timeout=aiohttp.ClientTimeout(total=5)):
                pass
        except aiodocker.DockerError as exc:
            raise EngineError(f"engine {self.url} is unreachable: {exc.message}") from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise EngineError(f"engine {self.url} is unreachable: {exc}") from None

    async def ensure_network(self, cidr: str, gateway: str) -> bool:
        """Make the overlay's bridge network (`sigma`, bridge `sigma0`) unless it exists; True
        if it was created. One with another subnet is an error: containers would get
        addresses the cluster does not own."""
        try:
            found = await self._json(f"networks/{NETWORK}")
        except EngineError as exc:
            if exc.engine_status != 404:
                raise
        else:
            subnets = [c.get("Subnet") for c in (found.get("IPAM") or {}).get("Config") or []]
            if subnets != [cidr]:
                raise EngineError(
                    f"{self.url}: network {NETWORK} has subnet {subnets}, the cluster's is "
                    f"{cidr}: remove it (docker network rm {NETWORK}) or fix overlay_cidr"
                )
            return False
        body = {
            "Name": NETWORK, "Driver": "bridge", "CheckDuplicate": True,
            "IPAM": {"Driver": "default", "Config": [{"Subnet": cidr, "Gateway": gateway}]},
            "Options": {"com.docker.network.bridge.name": BRIDGE,
                        "com.docker.network.driver.mtu": str(MTU)},
            "Labels": {LABEL_CLUSTER: self.cluster} if self.cluster else {},
        }
        await self._json("networks/create", "POST", data=json.dumps(body).encode(),
                         headers={"Content-Type": "application/json"})
        return True

    async def has_image(self, ref: str) -> bool:
        try:
            await self._json(f"images/{ref}/json")
        except EngineError as exc:
            if exc.engine_status == 404:
                return False
            raise
        return True

    async def ensure_image(self, ref: str, progress: Callable[[str], None] | None = None) -> None:
        """Pull `ref` unless the engine has it; `progress` gets human-readable pull status."""
        if await self.has_image(ref):
            return
        repo, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "")
        params = {"fromImage": repo, "tag": tag or "latest"}
        try:
            async for message in self._lines("images/create", "POST", params, 300,
                                             f"pull {ref}"):
                if "error" in message:
                    raise EngineError(pull_failure(ref, str(message["error"])), 404)
            # Steps only ("Pulling fs layer", "Pull complete"): byte-count updates would
            # flood the event log.
                if progress and message.get("status") and not message.get("progress"):
                    progress(f"pull {ref}: {message['status']} {message.get('id', '')}".strip())
        except EngineError as exc:
            if exc.message.startswith("image "):
                raise
            raise EngineError(pull_failure(ref, exc.message), exc.engine_status) from None

    async def _lines(
        self, path: str, method: str, params: dict[str, str], sock_read: float | None,
        what: str,
    ) -> AsyncIterator[dict[str, Any]]:
        """A streamed answer's JSON lines; any failure becomes an EngineError naming `what`."""
        try:
            async with self._docker._query(
                path, method=method, params=params,
                timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_read=sock_read),
            ) as response:
                async for line in response.content:
                    if line.strip():
                        yield json.loads(line)
        except aiodocker.DockerError as exc:
            raise EngineError(f"{what}: {exc.message}", exc.status) from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise EngineError(f"{what}: engine {self.url} failed: {exc}") from None

    async def create(self, name: str, config: dict[str, Any]) -> str:
        """Create a container; its id. EngineError with engine_status 409 if the name is taken."""
        if self.cluster:
            config = {**config, "Labels": {**config.get("Labels", {}),
                                           LABEL_CLUSTER: self.cluster}}
        data = await self._json(
            "containers/create", "POST", params={"name": name},
            data=json.dumps(config).encode(), headers={"Content-Type": "application/json"},
        )
        return str(data["Id"])

    async def start(self, container_id: str) -> None:
        await self._json(f"containers/{container_id}/start", "POST")

    async def stop(self, container_id: str, timeout: int = 10) -> None:
        """Stop politely (SIGTERM, then SIGKILL after `timeout` s); a stopped one is fine."""
        try:
            await self._json(
                f"containers/{container_id}/stop", "POST", params={"t": timeout},
                timeout=aiohttp.ClientTimeout(total=timeout + 30, connect=5),
            )
        except EngineError as exc:
            if exc.engine_status not in (304, 404):
                raise

    async def remove(self, container_id: str) -> None:
        """Remove a container (forcibly); one already gone is fine."""
        try:
            await self._json(f"containers/{container_id}", "DELETE", params={"force": "true"})
        except EngineError as exc:
            if exc.engine_status != 404:
                raise

    async def inspect(self, container_id: str) -> ContainerState | None:
        """The container's state, or None if the engine does not know it."""
        try:
            data = await self._json(f"containers/{container_id}/json")
        except EngineError as exc:
            if exc.engine_status == 404:
                return None
            raise
        return ContainerState.from_inspect(data)

    async def find(self, labels: dict[str, str] | None = None) -> list[ContainerState]:
        """Every container (running or not) carrying all `labels` (value "" = any value)."""
        wanted = self._label_filter(labels)
        summaries = await self._json(
            "containers/json", params={"all": "true", "filters": json.dumps({"label": wanted})}
        )
        states = []
        for summary in summaries:
            state = await self.inspect(summary["Id"])
            if state is not None:
                states.append(state)
        return states

    async def update(self, container_id: str, resources: dict[str, Any]) -> None:
        """Change a running container's cgroup caps in place (`docker update`)."""
        await self._json(
            f"containers/{container_id}/update", "POST",
            data=json.dumps(resources).encode(), headers={"Content-Type": "application/json"},
        )

    async def exec(self, container_id: str, command: list[str], timeout: float = 10.0) -> int:
        """Run `command` inside a running container; its exit code (-1 if it timed out)."""
        created = await self._json(
            f"containers/{container_id}/exec", "POST",
            data=json.dumps({"Cmd": command, "AttachStdout": False, "AttachStderr": False}),
            headers={"Content-Type": "application/json"},
        )
        exec_id = created["Id"]
        await self._json(
            f"exec/{exec_id}/start", "POST", data=json.dumps({"Detach": True}),
            headers={"Content-Type": "application/json"},
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            info = await self._json(f"exec/{exec_id}/json")
            if not info.get("Running"):
                return int(info.get("ExitCode") or 0)
            await asyncio.sleep(0.05)
        return -1

    async def memory_usage(self, container_id: str) -> int:
        """Bytes of memory the container uses now (page cache excluded, as `docker stats`)."""
        stats = await self._json(f"containers/{container_id}/stats", params={"stream": "false"})
        memory = stats.get("memory_stats") or {}
        cache = (memory.get("stats") or {}).get("total_inactive_file", 0)
        return max(int(memory.get("usage", 0)) - int(cache), 0)

    async def events(self, labels: dict[str, str] | None = None) -> AsyncIterator[dict[str, Any]]:
        """Container events as they happen (until the connection ends)."""
        filters: dict[str, list[str]] = {"type": ["container"]}
        wanted = self._label_filter(labels)
        if wanted:
            filters["label"] = wanted
        async for event in self._lines("events", "GET", {"filters": json.dumps(filters)}, None,
                                       "event stream"):
            yield event


class EnginePool:
    """One client per node engine URL, made on first use and replaced if the URL changes."""

    def __init__(self, cluster: str = "") -> None:
        self.cluster = cluster
        self.engines: dict[str, Engine] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def get(self, node: str, url: str) -> tuple[Engine, bool]:
        """The engine of `node` at `url`, and whether the client is new."""
        engine = self.engines.get(node)
        if engine is not None and engine.url == url:
            return engine, False
        if engine is not None:
            task = asyncio.ensure_future(engine.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        engine = self.engines[node] = Engine(url, cluster=self.cluster)
        return engine, True

    async def close(self) -> None:
        for engine in self.engines.values():
            await engine.close()
        self.engines.clear()
