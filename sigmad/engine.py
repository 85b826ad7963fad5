"""One host's Docker Engine API, and the translation of an instance into container configs.

The only module that speaks Docker. Everything Docker-shaped stays here: the rest of sigma
sees the `Engine` protocol, `ContainerState` and plain dicts of container config.

The Engine API is HTTP/1.1 over a Unix socket or over TLS on TCP, spoken by a small client
of our own (`_Http`): kept-alive connections per engine, Content-Length and chunked bodies,
streamed JSON lines for events and pulls, and connections handed over to an exec's terminal
(`Upgrade: tcp`, as the Docker CLI's exec -it does: `exec_attach`). A burst drives hundreds
of thousands of calls through the leader, and this client costs ~50 µs of CPU per call where
aiodocker over aiohttp cost ~190 (bench/scale.py).

Invariants:
- a call that cannot reach the engine, or times out, raises EngineError "… is unreachable";
  an engine's error answer raises EngineError with its status (`engine_status`);
- a `tcp://` engine is only ever spoken to over TLS, verified against the CA and with a
  client certificate (`tls`, an ssl context); without one every call is refused: a plain
  TCP engine gives root on its host to whoever reaches it;
- with a `cluster` (its etcd prefix), the containers it creates carry it as a label and
  `containers`/`find`/`events` see only that cluster's containers, so clusters sharing an
  engine never touch each other's;
- descriptors: a client holds at most CONNECTIONS connections in flight (streams aside), and
  the clients of one EnginePool keep at most `IdleBudget.limit` idle connections between
  them, so a master's open files grow by one event stream per engine, not by three (a
  5,000-engine cluster kept ~15,000 sockets open, near a 20,000 open-file limit).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, urlencode, urlsplit

import orjson

from sigmad import metrics
from sigmad.configs import delivered_dir
from sigmad.errors import EngineError
from sigmad.models import Instance
from sigmad.network.ipam import BRIDGE, MTU, NETWORK, mac_for
from sigmad.reasons import OOM_KILLED, Reason
from sigmad.spec import AppSpec, ContainerSpec, Resources

log = logging.getLogger(__name__)

LABEL_INSTANCE = "sigma.instance"
LABEL_APP = "sigma.app"
LABEL_NAMESPACE = "sigma.namespace"
LABEL_CONTAINER = "sigma.container"
LABEL_GENERATION = "sigma.generation"
LABEL_INDEX = "sigma.index"
LABEL_CLUSTER = "sigma.cluster"  # the cluster's etcd prefix: engines may be shared
# On a host-compatible instance's first container: its host ports, "32400/tcp,32401/udp"
# (the node agent's fast path: sigmad.node.fastpath).
LABEL_HOST_PORTS = "sigma.host-ports"
KEPT_LABELS = (LABEL_INSTANCE, LABEL_CONTAINER, LABEL_CLUSTER, LABEL_HOST_PORTS)  # read back
DEFAULT_PIDS_LIMIT = 4096  # no fork bomb takes a host down
CPU_PERIOD_NS = 1_000_000_000 // 1000  # NanoCpus per millicore
UNCAPPED_MEMORY = (1 << 63) - 4096  # cgroup v1's "no limit", as a live update can set it
API_VERSION = "1.41"  # the newest Engine API this client speaks (Docker 20.10)
REQUEST_TIMEOUT = 60.0
CONNECT_TIMEOUT = 5.0
CONNECTIONS = 2  # kept-alive connections per engine (thousands of engines: file limits)
IDLE_CONNECTIONS = 512  # idle kept-alive connections over all the engines of one pool
SEND_BUFFER = 1 << 16  # bytes buffered for sending before a request waits for them to go
TERMINAL_READ = 1 << 16  # bytes of a terminal's output read at once
MAX_RUN_OUTPUT = 1 << 20  # bytes of an exec's output kept (the last)
LAST_LINES_READ = 1 << 16  # bytes of a container's output read for its last lines
_EXIT_STATUS = re.compile(r"^Exited \((-?\d+)\)")


def container_name(instance: Instance, container: str) -> str:
    """A deterministic name, so the engine itself refuses a second copy:
    `sigma-NAMESPACE_APP-INDEX_CONTAINER`. The '_' separators appear in no namespace, app or
    container name, so two instances never share a name (with '-', namespace a-b's app c and
    namespace a's app b-c did)."""
    return f"sigma-{instance.namespace}_{instance.name}_{container}"


def pull_params(ref: str) -> dict[str, str]:
    """The Engine API's pull parameters for an image reference (sigmad.spec.IMAGE_RE): the
    repository, and its digest, else its tag, else `latest`."""
    name, _, digest = ref.partition("@")
    repo, colon, tag = name.rpartition(":")
    if not colon or "/" in tag:  # no tag: the ':' (if any) was a registry's port
        repo, tag = name, ""
    return {"fromImage": repo, "tag": digest or tag or "latest"}


def pull_failure(ref: str, error: str) -> str:
    """What a failed pull means for people: an image its registry does not have, or a
    registry that cannot be reached (the engine's words follow)."""
    lowered = error.lower()
    if any(s in lowered for s in ("not found", "manifest unknown", "does not exist")):
        return f"image {ref} not found: {error}"
    return f"image {ref} cannot be pulled: {error}"


def cap_config(limit: Resources, host: Resources | None = None) -> dict[str, Any]:
    """cgroup caps for a limit; 0 means no cap. At create (`host` None) no cap is simply not
    set; a live update (`host`: the node's capacity) lifts a cap with the values that mean
    none: all of the host's CPUs, and cgroup v1's unlimited memory.

    Memory and MemorySwap always go together: equal, so the container gets no swap on top
    of its cap (and Docker refuses a Memory above the old MemorySwap when set alone)."""
    caps: dict[str, Any] = {}
    if limit.cpu_m:
        caps["NanoCpus"] = limit.cpu_m * CPU_PERIOD_NS
    elif host is not None and host.cpu_m:
        caps["NanoCpus"] = host.cpu_m * CPU_PERIOD_NS
    memory = limit.memory or (UNCAPPED_MEMORY if host is not None else 0)
    if memory:
        caps["Memory"] = memory
        caps["MemorySwap"] = memory
    return caps


def container_config(
    instance: Instance, app: AppSpec, container: ContainerSpec, host_ip: str = "",
    network_of: str = "", config_dir: str = "", config_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The Engine API create body for one container of an instance.

    The first container owns the instance's network (and its published host ports); the
    others join it (`network_of`: the first container's id). Swap is off for every
    container, capped or not (swappiness 0; a memory cap also caps memory+swap). Each config
    of the app is its instance's directory under the node's `config_dir`, bound read-only at
    its mount (the agent swaps the files inside it: sigmad.node.configs); `config_env` (from
    `env_from`) comes before the container's own `env`, which wins."""
    host_config: dict[str, Any] = {
        **cap_config(container.resources.limit),
        "PidsLimit": DEFAULT_PIDS_LIMIT,
        "MemorySwappiness": 0,
    }
    ports = {p.name: p for p in app.network.ports}
    env = [f"{k}={v}" for k, v in sorted((config_env or {}).items())
           if k not in container.env]
    env += [f"{k}={v}" for k, v in sorted(container.env.items())]
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
    if app.volumes:
        # Each volume's disk (its data directory on the host) at the volume's mount: the
        # same disk for every container the instance ever makes on this node.
        disks = {d.volume: d.source for d in instance.ssds}
        host_config["Mounts"] = [
            {"Type": "bind", "Source": disks[v.name], "Target": v.mount, "ReadOnly": False,
             "BindOptions": {"Propagation": "rprivate"}}
            for v in app.volumes  # bound with a disk per volume (sigmad.scheduler.binder)
        ]
    if app.configs:
        host_config.setdefault("Mounts", []).extend(
            {"Type": "bind", "ReadOnly": True, "Target": c.mount,
             "Source": delivered_dir(config_dir, app.namespace, instance.name, c.name),
             "BindOptions": {"Propagation": "rprivate"}}
            for c in app.configs)
    host_compat = app.network.mode == "host-compat"
    if not network_of and instance.host_ports:
        # host-compat: the instance serves on its host ports themselves (no port mapping);
        # Docker's publishing stays under the agent's fast path (clients on the host).
        bindings = {
            f"{hp if host_compat else ports[n].container}/{ports[n].protocol}":
                [{"HostPort": str(hp)}]
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
            **({LABEL_HOST_PORTS: ",".join(sorted(
                f"{hp}/{ports[n].protocol}" for n, hp in instance.host_ports.items()))}
               if host_compat and instance.host_ports and not network_of else {}),
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


@dataclass(slots=True)
class ContainerState:
    """What sigma needs of a container. From a list (`containers`) the times, the OOM flag
    and the error are not known (`full` False); `inspect` fills everything."""

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
    full: bool = True

    @classmethod
    def from_inspect(cls, data: dict[str, Any]) -> ContainerState:
        state = data.get("State") or {}
        networks = (data.get("NetworkSettings") or {}).get("Networks") or {}
        ip = next((n.get("IPAddress") for n in networks.values() if n.get("IPAddress")), "")
        return cls(
            id=data["Id"],
            name=data.get("Name", "").lstrip("/"),
            labels=_kept((data.get("Config") or {}).get("Labels")),
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

    @classmethod
    def from_summary(cls, data: dict[str, Any]) -> ContainerState:
        """From one entry of `GET /containers/json`."""
        networks = (data.get("NetworkSettings") or {}).get("Networks") or {}
        ip = next((n.get("IPAddress") for n in networks.values() if n.get("IPAddress")), "")
        status = data.get("State", "")
        exited = _EXIT_STATUS.match(data.get("Status", ""))
        return cls(
            id=data["Id"], name=(data.get("Names") or [""])[0].lstrip("/"),
            labels=_kept(data.get("Labels")), running=status == "running", status=status,
            exit_code=int(exited.group(1)) if exited else 0, oom_killed=False, error="",
            started_at="", finished_at="", pid=0, ip=ip, full=False,
        )

    def end_reason(self) -> Reason:
        """The one authoritative reason a stopped container ended (DESIGN.md §3).

        An exit status above 128 without an OOM kill is a signal (137 is SIGKILL, not OOM)."""
        if self.oom_killed:
            return OOM_KILLED
        if self.error:
            return Reason.failed_to_start(self.error)
        if self.exit_code > 128:
            return Reason.signaled(self.exit_code - 128)
        return Reason.exited(self.exit_code)


def _kept(labels: dict[str, str] | None) -> dict[str, str]:
    """The labels sigma reads back (a leader keeps one state per container it runs)."""
    return {k: v for k, v in (labels or {}).items() if k in KEPT_LABELS}


class Terminal(Protocol):
    """A started exec's terminal: its output and keystrokes, both ways."""

    async def read(self) -> bytes:
        """The next output bytes; b"" once the terminal closed (the command ended)."""
        ...

    async def write(self, data: bytes) -> None:
        """Keystrokes to the command; EngineError if the terminal is gone."""
        ...

    def close(self) -> None: ...


class Engine(Protocol):
    """What sigma needs of one host's container engine (Docker, or tests' fake)."""

    url: str
    cluster: str

    async def close(self) -> None: ...
    async def info(self) -> dict[str, Any]: ...
    async def ping(self) -> None: ...
    async def ensure_network(self, cidr: str, gateway: str) -> bool: ...
    async def ensure_image(self, ref: str,
                           progress: Callable[[str], None] | None = None) -> None: ...
    async def create(self, name: str, config: dict[str, Any]) -> str: ...
    async def start(self, container_id: str) -> None: ...
    async def stop(self, container_id: str, timeout: int = 10) -> None: ...
    async def remove(self, container_id: str) -> None: ...
    async def inspect(self, container_id: str) -> ContainerState | None: ...
    async def containers(self, labels: dict[str, str] | None = None
                         ) -> list[ContainerState]: ...
    async def find(self, labels: dict[str, str] | None = None) -> list[ContainerState]: ...
    async def update(self, container_id: str, resources: dict[str, Any]) -> None: ...
    async def kill(self, container_id: str, signal: str) -> None: ...
    async def exec(self, container_id: str, command: list[str],
                   timeout: float = 10.0) -> int: ...
    async def memory_usage(self, container_id: str) -> int: ...
    async def last_lines(self, container_id: str, count: int) -> list[str]: ...
    async def run(self, container_id: str, command: list[str], timeout: float
                  ) -> tuple[int, bytes]: ...
    async def exec_create(self, container_id: str, command: list[str],
                          env: list[str]) -> str: ...
    async def exec_attach(self, exec_id: str) -> Terminal: ...
    async def exec_resize(self, exec_id: str, rows: int, cols: int) -> None: ...
    async def exec_state(self, exec_id: str) -> tuple[bool, int]: ...
    def logs(self, container_id: str, tail: int, follow: bool = False
             ) -> AsyncGenerator[bytes, None]: ...
    def events(self, labels: dict[str, str] | None = None, since: float | None = None
               ) -> AsyncIterator[dict[str, Any]]: ...


@dataclass
class _Answer:
    status: int
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body) if self.body else None

    def message(self) -> str:
        try:
            data = orjson.loads(self.body)
        except ValueError:
            return self.body.decode(errors="replace").strip()[:500]
        return str(data.get("message", data)) if isinstance(data, dict) else str(data)


class _Conn:
    """One HTTP/1.1 connection to the engine."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()

    async def send(self, head: bytes, body: bytes) -> None:
        self.writer.write(head + body)
        if self.writer.transport.get_write_buffer_size() > SEND_BUFFER:
            await self.writer.drain()

    async def answer(self) -> tuple[int, dict[bytes, bytes], bytes]:
        """The next whole answer: status, headers and body (one coroutine for the common
        case of a Content-Length body: this is every engine call's path)."""
        status, headers = await self.head()
        length = headers.get(b"content-length")
        if length is not None and status >= 200 and status not in (204, 304):
            return status, headers, await self.reader.readexactly(int(length)) \
                if length != b"0" else b""
        return status, headers, b"".join([c async for c in self.chunks(status, headers)])

    async def head(self) -> tuple[int, dict[bytes, bytes]]:
        """The status and headers (names lower-cased) of the next answer."""
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name:
                headers[name.strip().lower()] = value.strip()
        return status, headers

    async def chunks(self, status: int, headers: dict[bytes, bytes]) -> AsyncIterator[bytes]:
        """The body, as it arrives (none for 1xx, 204 and 304)."""
        if status < 200 or status in (204, 304):
            return
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    return
                yield await self.reader.readexactly(size)
                await self.reader.readexactly(2)
        elif b"content-length" in headers:
            length = int(headers[b"content-length"])
            if length:
                yield await self.reader.readexactly(length)
        else:  # till the engine closes the connection
            while data := await self.reader.read(65536):
                yield data


class _Hijacked:
    """An exec's terminal on the connection its start handed over (`_Http.hijack`)."""

    def __init__(self, conn: _Conn, what: str) -> None:
        self.conn = conn
        self.what = what

    async def read(self) -> bytes:
        try:
            return await self.conn.reader.read(TERMINAL_READ)
        except (OSError, asyncio.IncompleteReadError):
            return b""

    async def write(self, data: bytes) -> None:
        try:
            self.conn.writer.write(data)
            await self.conn.writer.drain()
        except OSError as exc:
            raise EngineError(f"{self.what}: the terminal is gone: "
                              f"{exc or type(exc).__name__}") from None

    def close(self) -> None:
        self.conn.close()


class Frames:
    """Demultiplexes the Engine API's log stream of a container without a terminal: frames
    of an 8-byte head (stream type 0, 1 or 2; three zero bytes; a big-endian length) and
    their payload. A stream that does not start with such a head (a terminal's) is passed
    on as it is."""

    def __init__(self) -> None:
        self.pending = b""
        self.raw: bool | None = None  # None: not known before the first bytes

    def feed(self, chunk: bytes) -> bytes:
        """The payload bytes complete so far."""
        self.pending += chunk
        if self.raw is None and len(self.pending) >= 8:
            head = self.pending[:8]
            self.raw = not (head[0] in (0, 1, 2) and head[1:4] == b"\0\0\0")
        if self.raw is None:
            return b""
        if self.raw:
            out, self.pending = self.pending, b""
            return out
        parts: list[bytes] = []
        while len(self.pending) >= 8:
            size = int.from_bytes(self.pending[4:8], "big")
            if len(self.pending) < 8 + size:
                break
            parts.append(self.pending[8:8 + size])
            self.pending = self.pending[8 + size:]
        return b"".join(parts)


_PLAIN = re.compile(r"[A-Za-z0-9._/-]*")  # fullmatch: "a\n" is not plain


def _query(params: dict[str, Any] | None) -> str:
    """`?k=v&…` of `params` (plain names and numbers go as they are: the common case)."""
    if not params:
        return ""
    if all(_PLAIN.fullmatch(str(v)) for v in params.values()):
        return "?" + "&".join(f"{k}={v}" for k, v in params.items())
    return "?" + urlencode(params)


class IdleBudget:
    """How many idle kept-alive connections the clients sharing it may keep in all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept = 0


class _Http:
    """A minimal HTTP/1.1 client for one engine (see the module docstring)."""

    def __init__(self, url: str, tls: ssl.SSLContext | None = None,
                 keep_alive: bool = True, budget: IdleBudget | None = None) -> None:
        self.url = url
        self.keep_alive = keep_alive  # False: each connection closed after its answer
        self.budget = budget or IdleBudget(CONNECTIONS)
        parts = urlsplit(url)
        self.unix = parts.path if parts.scheme == "unix" else ""
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 2376
        self.tls = tls
        self.idle: list[_Conn] = []
        self.slots = asyncio.Semaphore(CONNECTIONS)  # requests in flight (streams aside)
        self.prefix = ""  # "/v1.41" once negotiated

    def unreachable(self, exc: BaseException) -> EngineError:
        return EngineError(f"engine {self.url} is unreachable: "
                           f"{str(exc) or type(exc).__name__}")

    async def _connect(self) -> _Conn:
        if not self.unix and self.tls is None:
            raise EngineError(f"engine {self.url} is remote and this process has no TLS "
                              "files for it: refusing plain TCP (set engine_tls: ca, cert, "
                              "key, and run that dockerd with --tlsverify)")
        try:
            opening = asyncio.open_unix_connection(self.unix, limit=1 << 20) if self.unix \
                else asyncio.open_connection(self.host, self.port, limit=1 << 20, ssl=self.tls,
                                             ssl_handshake_timeout=CONNECT_TIMEOUT)
            reader, writer = await asyncio.wait_for(opening, CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            raise self.unreachable(exc) from None
        return _Conn(reader, writer)

    async def _version(self) -> str:
        """The API version prefix ("/v1.41"): the engine's, or ours if it is older."""
        if not self.prefix:
            answer = await self._exchange("GET", "/version", b"")
            if answer.status != 200:
                raise EngineError(f"{self.url}: /version answered {answer.status}: "
                                  f"{answer.message()}", answer.status)
            theirs = str((answer.json() or {}).get("ApiVersion", API_VERSION))
            mine = min((tuple(map(int, v.split("."))), v) for v in (theirs, API_VERSION))[1]
            self.prefix = f"/v{mine}"
        return self.prefix

    def _head(self, method: str, path: str, body: bytes, extra: tuple[str, ...] = ()) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", "Host: docker", *extra]
        if body or method in ("POST", "PUT"):
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    async def _exchange(self, method: str, path: str, body: bytes) -> _Answer:
        """One request and its whole answer on a kept-alive connection (at most CONNECTIONS
        at once: more wait for one, rather than open and close connections)."""
        async with self.slots:
            return await self._exchange_on_a_connection(method, path, body)

    async def _exchange_on_a_connection(self, method: str, path: str, body: bytes) -> _Answer:
        for attempt in (0, 1):
            reused = bool(self.idle)
            conn = self._take_idle() if reused else await self._connect()
            try:
                await conn.send(self._head(method, path, body), body)
                status, headers, data = await conn.answer()
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                conn.close()
                if reused and attempt == 0:
                    continue  # the engine had closed the idle connection: once more
                raise self.unreachable(exc) from None
            except (OSError, TimeoutError, asyncio.LimitOverrunError, ValueError) as exc:
                conn.close()
                raise self.unreachable(exc) from None
            except BaseException:
                conn.close()
                raise
            if not self.keep_alive or headers.get(b"connection", b"").lower() == b"close" \
                    or self.budget.kept >= self.budget.limit:
                conn.close()
            else:
                self.idle.append(conn)
                self.budget.kept += 1
            return _Answer(status, data)
        raise AssertionError("unreachable")

    async def request(self, method: str, path: str, params: dict[str, Any] | None = None,
                      body: Any = None, timeout: float | None = REQUEST_TIMEOUT) -> _Answer:
        """One call (`body` sent as JSON); its answer, whatever the status."""
        data = b"" if body is None else orjson.dumps(body)
        started, failed = time.monotonic(), True
        try:
            async with asyncio.timeout(timeout):  # (no task of its own, as wait_for makes)
                target = (self.prefix or await self._version()) + path + _query(params)
                answer = await self._exchange(method, target, data)
                failed = answer.status >= 400
                return answer
        except TimeoutError:
            raise self.unreachable(TimeoutError(f"no answer in {timeout:g}s")) from None
        finally:
            metrics.timed_engine_call(method, path, time.monotonic() - started, failed)

    async def lines(self, method: str, path: str, params: dict[str, Any],
                    what: str) -> AsyncGenerator[dict[str, Any], None]:
        """A streamed answer's JSON lines, on a connection of its own; an error status, or
        a failure on the way, becomes an EngineError naming `what`."""
        pending = b""
        stream = self.stream(method, path, params, what)
        try:
            async for chunk in stream:
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    if line.strip():
                        try:
                            yield orjson.loads(line)
                        except ValueError as exc:
                            raise EngineError(f"{what}: engine {self.url} failed: "
                                              f"{exc}") from None
        finally:
            await stream.aclose()

    async def _open(self, method: str, path: str, body: bytes, what: str,
                    extra: tuple[str, ...] = ()) -> tuple[_Conn, int, dict[bytes, bytes]]:
        """A request on a connection of its own, its answer's head read: the connection,
        status and headers. An error status, or a failure on the way, becomes an EngineError
        naming `what` (the connection closed)."""
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                target = (self.prefix or await self._version()) + path
        except TimeoutError:
            raise self.unreachable(TimeoutError("no answer to /version")) from None
        conn = await self._connect()
        try:
            await conn.send(self._head(method, target, body, extra), body)
            status, headers = await asyncio.wait_for(conn.head(), REQUEST_TIMEOUT)
            if status >= 400:
                data = b"".join([c async for c in conn.chunks(status, headers)])
                raise EngineError(f"{what}: {_Answer(status, data).message()}", status)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            conn.close()
            raise EngineError(f"{what}: engine {self.url} failed: "
                              f"{exc or type(exc).__name__}") from None
        except BaseException:
            conn.close()
            raise
        return conn, status, headers

    async def stream(self, method: str, path: str, params: dict[str, Any],
                     what: str, body: bytes = b"") -> AsyncGenerator[bytes, None]:
        """A streamed answer's body as it arrives, on a connection of its own; an error
        status, or a failure on the way, becomes an EngineError naming `what`."""
        conn, status, headers = await self._open(method, path + _query(params), body, what)
        try:
            async for chunk in conn.chunks(status, headers):
                yield chunk
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            raise EngineError(f"{what}: engine {self.url} failed: "
                              f"{exc or type(exc).__name__}") from None
        finally:
            conn.close()

    async def hijack(self, path: str, body: bytes, what: str) -> _Conn:
        """A POST whose connection the engine then hands over to a raw stream both ways
        (`Upgrade: tcp`, as exec start and attach do); the connection, its head read."""
        conn, _, _ = await self._open("POST", path, body, what,
                                      ("Connection: Upgrade", "Upgrade: tcp"))
        return conn

    def _take_idle(self) -> _Conn:
        self.budget.kept -= 1
        return self.idle.pop()

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.budget.kept -= len(self.idle)
        self.idle.clear()


class DockerEngine:
    """A client for one host's Docker engine (`unix:///path.sock`, or `tcp://host:port` with
    `tls`: a client context with the CA and a client certificate)."""

    def __init__(self, url: str, request_timeout: float = REQUEST_TIMEOUT,
                 cluster: str = "", tls: ssl.SSLContext | None = None,
                 keep_alive: bool = True, budget: IdleBudget | None = None) -> None:
        self.url = url
        self.cluster = cluster
        self.timeout = request_timeout
        self._http = _Http(url, tls, keep_alive, budget)
        self._images: set[str] = set()  # refs known to be present (never forgotten: a
        # create that finds one gone answers 404 "No such image", and the image is pulled)

    async def close(self) -> None:
        self._http.close()

    async def _json(self, path: str, method: str = "GET", params: dict[str, Any] | None = None,
                    body: Any = None, timeout: float | None = None,
                    ok: tuple[int, ...] = ()) -> Any:
        """A call's JSON answer; an error status (not in `ok`) raises EngineError."""
        answer = await self._http.request(method, path, params, body, timeout or self.timeout)
        if answer.status >= 400 or (answer.status >= 300 and answer.status not in ok):
            if answer.status in ok:
                return None
            raise EngineError(f"{self.url}: {answer.message()}", answer.status)
        return answer.json()

    def _label_filter(self, labels: dict[str, str] | None) -> list[str]:
        both = {**(labels or {}), **({LABEL_CLUSTER: self.cluster} if self.cluster else {})}
        return [f"{k}={v}" if v else k for k, v in both.items()]

    async def info(self) -> dict[str, Any]:
        """`docker info`: NCPU, MemTotal, ServerVersion, cgroup facts."""
        result: dict[str, Any] = await self._json("/info")
        return result

    async def ping(self) -> None:
        """Whether the engine answers at all (`/_ping`); EngineError if not."""
        answer = await self._http.request("GET", "/_ping", timeout=5.0)
        if answer.status != 200:
            raise EngineError(f"{self.url}: /_ping answered {answer.status}", answer.status)

    async def ensure_network(self, cidr: str, gateway: str) -> bool:
        """Make the overlay's bridge network (`sigma`, bridge `sigma0`) unless it exists; True
        if it was created. One with another subnet is an error: containers would get
        addresses the cluster does not own."""
        try:
            found = await self._json(f"/networks/{NETWORK}")
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
        await self._json("/networks/create", "POST", body={
            "Name": NETWORK, "Driver": "bridge", "CheckDuplicate": True,
            "IPAM": {"Driver": "default", "Config": [{"Subnet": cidr, "Gateway": gateway}]},
            "Options": {"com.docker.network.bridge.name": BRIDGE,
                        "com.docker.network.driver.mtu": str(MTU)},
            "Labels": {LABEL_CLUSTER: self.cluster} if self.cluster else {},
        })
        return True

    async def has_image(self, ref: str) -> bool:
        if ref in self._images:
            return True
        try:
            await self._json(f"/images/{quote(ref, safe='/:@')}/json")
        except EngineError as exc:
            if exc.engine_status == 404:
                return False
            raise
        self._images.add(ref)
        return True

    async def ensure_image(self, ref: str, progress: Callable[[str], None] | None = None) -> None:
        """Pull `ref` unless the engine has it; `progress` gets human-readable pull status."""
        if await self.has_image(ref):
            return
        params = pull_params(ref)
        try:
            async for message in self._http.lines("POST", "/images/create", params,
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
        self._images.add(ref)

    async def create(self, name: str, config: dict[str, Any]) -> str:
        """Create a container; its id. EngineError with engine_status 409 if the name is
        taken, 404 if the image is missing (it is then forgotten as present)."""
        if self.cluster:
            config = {**config, "Labels": {**config.get("Labels", {}),
                                           LABEL_CLUSTER: self.cluster}}
        try:
            data = await self._json("/containers/create", "POST", {"name": name}, config)
        except EngineError as exc:
            if exc.engine_status == 404:
                self._images.discard(str(config.get("Image", "")))
            raise
        return str(data["Id"])

    async def start(self, container_id: str) -> None:
        await self._json(f"/containers/{container_id}/start", "POST", ok=(304,))

    async def stop(self, container_id: str, timeout: int = 10) -> None:
        """Stop politely (SIGTERM, then SIGKILL after `timeout` s); a stopped one is fine."""
        await self._json(f"/containers/{container_id}/stop", "POST", {"t": timeout},
                         timeout=timeout + 30, ok=(304, 404))

    async def remove(self, container_id: str) -> None:
        """Remove a container (forcibly); one already gone is fine."""
        await self._json(f"/containers/{container_id}", "DELETE", {"force": "true"},
                         ok=(404,))

    async def inspect(self, container_id: str) -> ContainerState | None:
        """The container's state, or None if the engine does not know it."""
        data = await self._json(f"/containers/{container_id}/json", ok=(404,))
        return None if data is None else ContainerState.from_inspect(data)

    async def containers(self, labels: dict[str, str] | None = None) -> list[ContainerState]:
        """Every container (running or not) carrying all `labels` (value "" = any value),
        from one list call: times and the OOM flag unknown (see ContainerState)."""
        summaries = await self._json("/containers/json", params={
            "all": "true", "filters": json.dumps({"label": self._label_filter(labels)})})
        return [ContainerState.from_summary(s) for s in summaries]

    async def find(self, labels: dict[str, str] | None = None) -> list[ContainerState]:
        """As `containers`, each one inspected (everything known)."""
        states = []
        for summary in await self.containers(labels):
            state = await self.inspect(summary.id)
            if state is not None:
                states.append(state)
        return states

    async def update(self, container_id: str, resources: dict[str, Any]) -> None:
        """Change a running container's cgroup caps in place (`docker update`)."""
        await self._json(f"/containers/{container_id}/update", "POST", body=resources)

    async def kill(self, container_id: str, signal: str) -> None:
        """Send `signal` (e.g. SIGHUP) to a container's main process; one not running (409)
        or gone (404) is fine."""
        await self._json(f"/containers/{container_id}/kill", "POST", {"signal": signal},
                         ok=(404, 409))

    async def exec(self, container_id: str, command: list[str], timeout: float = 10.0) -> int:
        """Run `command` inside a running container; its exit code (-1 if it timed out)."""
        created = await self._json(f"/containers/{container_id}/exec", "POST", body={
            "Cmd": command, "AttachStdout": False, "AttachStderr": False})
        exec_id = created["Id"]
        await self._json(f"/exec/{exec_id}/start", "POST", body={"Detach": True})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = await self._json(f"/exec/{exec_id}/json")
            if not info.get("Running"):
                return int(info.get("ExitCode") or 0)
            await asyncio.sleep(0.05)
        return -1

    async def run(self, container_id: str, command: list[str], timeout: float
                  ) -> tuple[int, bytes]:
        """Run `command` inside a running container: its exit code (-1 if it did not end
        within `timeout` seconds) and its output (stdout and stderr, the last MAX_RUN_OUTPUT
        bytes)."""
        created = await self._json(f"/containers/{container_id}/exec", "POST", body={
            "Cmd": command, "AttachStdout": True, "AttachStderr": True})
        exec_id = created["Id"]
        frames, output = Frames(), b""
        stream = self._http.stream("POST", f"/exec/{exec_id}/start", {}, f"exec {command[:1]}",
                                   orjson.dumps({"Detach": False, "Tty": False}))
        try:
            async with asyncio.timeout(timeout):
                async for chunk in stream:
                    output = (output + frames.feed(chunk))[-MAX_RUN_OUTPUT:]
        except TimeoutError:
            return -1, output
        finally:
            await stream.aclose()
        info = await self._json(f"/exec/{exec_id}/json")
        return int(info.get("ExitCode") or 0), output

    async def exec_create(self, container_id: str, command: list[str], env: list[str]
                          ) -> str:
        """Make (not start) `command` with a terminal and its stdin attached, and `env`
        added to the container's: its exec id."""
        created = await self._json(f"/containers/{container_id}/exec", "POST", body={
            "Cmd": command, "Env": env, "Tty": True, "AttachStdin": True,
            "AttachStdout": True, "AttachStderr": True})
        return str(created["Id"])

    async def exec_attach(self, exec_id: str) -> Terminal:
        """Start the exec `exec_id` (exec_create) and hand over its terminal: the start
        call's connection, hijacked."""
        what = f"exec {exec_id[:12]}"
        body = orjson.dumps({"Detach": False, "Tty": True})
        return _Hijacked(await self._http.hijack(f"/exec/{exec_id}/start", body, what), what)

    async def exec_resize(self, exec_id: str, rows: int, cols: int) -> None:
        """Set the exec's terminal size (the engine waits for a start under way)."""
        await self._json(f"/exec/{exec_id}/resize", "POST", {"h": rows, "w": cols})

    async def exec_state(self, exec_id: str) -> tuple[bool, int]:
        """Whether the exec still runs, and its exit code (0 while it runs)."""
        info = await self._json(f"/exec/{exec_id}/json")
        return bool(info.get("Running")), int(info.get("ExitCode") or 0)

    async def memory_usage(self, container_id: str) -> int:
        """Bytes of memory the container uses now (page cache excluded, as `docker stats`)."""
        stats = await self._json(f"/containers/{container_id}/stats",
                                 params={"stream": "false"})
        memory = stats.get("memory_stats") or {}
        cache = (memory.get("stats") or {}).get("total_inactive_file", 0)
        return max(int(memory.get("usage", 0)) - int(cache), 0)

    async def logs(self, container_id: str, tail: int, follow: bool = False
                   ) -> AsyncGenerator[bytes, None]:
        """The container's output (stdout and stderr, in order), its last `tail` lines and
        with `follow` what it writes next, until it stops or the caller does."""
        params = {"stdout": "1", "stderr": "1", "tail": str(tail),
                  "follow": "1" if follow else "0"}
        frames = Frames()
        stream = self._http.stream("GET", f"/containers/{container_id}/logs", params,
                                   f"logs of {container_id[:12]}")
        try:
            async for chunk in stream:
                data = frames.feed(chunk)
                if data:
                    yield data
        finally:
            await stream.aclose()

    async def last_lines(self, container_id: str, count: int) -> list[str]:
        """The container's last `count` lines of output (at most LAST_LINES_READ bytes
        read); [] when the engine cannot say."""
        data = b""
        try:
            logs = self.logs(container_id, count)
            try:
                async for chunk in logs:
                    data += chunk
                    if len(data) > LAST_LINES_READ:
                        data = data[-LAST_LINES_READ:]
                        break
            finally:
                await logs.aclose()
        except EngineError as exc:
            log.debug("last lines of %s not read: %s", container_id[:12], exc.message)
        return data.decode(errors="replace").splitlines()[-count:] if count else []

    async def events(self, labels: dict[str, str] | None = None, since: float | None = None
                     ) -> AsyncIterator[dict[str, Any]]:
        """Container events as they happen (until the connection ends), replayed from the
        time `since` when given."""
        filters: dict[str, list[str]] = {"type": ["container"]}
        wanted = self._label_filter(labels)
        if wanted:
            filters["label"] = wanted
        params = {"filters": json.dumps(filters)}
        if since is not None:
            params["since"] = f"{since:.9f}"
        stream = self._http.lines("GET", "/events", params, "event stream")
        try:
            async for event in stream:
                yield event
        finally:
            await stream.aclose()


class EnginePool:
    """One client per node engine URL, made on first use and replaced if the URL changes;
    `tls` (a client context) is used for the tcp:// ones. Its clients share one IdleBudget
    of `idle` connections."""

    def __init__(self, cluster: str = "",
                 factory: Callable[[str, str], Engine] | None = None,
                 tls: ssl.SSLContext | None = None, idle: int = IDLE_CONNECTIONS) -> None:
        self.cluster = cluster
        self.budget = IdleBudget(idle)
        self.factory = factory or (
            lambda url, cluster: DockerEngine(url, cluster=cluster, tls=tls,
                                              budget=self.budget))
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
        engine = self.engines[node] = self.factory(url, self.cluster)
        return engine, True

    async def close(self) -> None:
        for engine in self.engines.values():
            await engine.close()
        self.engines.clear()
