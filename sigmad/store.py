"""etcd access: the key layout, typed records, CAS transactions, watches and leases.

The only module that imports aetcd. A lost connection is retried with backoff and logged;
callers see `StoreUnavailable` only once the retry budget is spent.

The seam: the rest of sigma uses the `Store` protocol. `StoreOps` builds every typed call
(get, scan, put, create, update, delete, commit) on four primitives (`get_raw`, `range_raw`,
`txn`, `watch_batches`); `EtcdStore` implements them on etcd and tests/fakes a `MemoryStore`
in memory, with the same guards and the same leader fence.

Invariants:
- a transaction holds at most MAX_TXN_OPS compares (the fence included) and at most
  MAX_TXN_OPS operations: etcd's `--max-txn-ops` counts each list on its own;
- a committed transaction answers with its revision, which is the mod_revision of every key
  it wrote (0 means a guard failed and nothing was written);
- a fenced store writes nothing once its fence (the leader key as won) fails: `Deposed`;
- an `https://` endpoint is only ever reached over TLS, verified against the configured CA
  (and with the client certificate, whose common name is the etcd user); endpoints are all
  `https://` with TLS files or all `http://` without (`endpoint_problem`);
- a transaction sent again after its answer was lost (a timeout, a broken connection) is
  not reported as a conflict when its first attempt committed: the store reads back
  whether it did (`StoreOps.landed`) and answers with that revision.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import threading
import time
import zlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.utils
import aetcd.watcher
import grpc

from sigmad import metrics, records
from sigmad.errors import SigmaError, StoreUnavailable
from sigmad.tls import TlsFiles, endpoint_problem

if TYPE_CHECKING:
    from sigmad.etcd_access import Access

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

_TRANSIENT = (
    aetcd.exceptions.ConnectionFailedError,
    aetcd.exceptions.ConnectionTimeoutError,
    aetcd.exceptions.InternalError,
    asyncio.TimeoutError,
    OSError,
)
_TRANSIENT_CODES = frozenset({
    aetcd.rpc.StatusCode.UNAVAILABLE, aetcd.rpc.StatusCode.DEADLINE_EXCEEDED,
    aetcd.rpc.StatusCode.INTERNAL, aetcd.rpc.StatusCode.CANCELLED,
    aetcd.rpc.StatusCode.UNKNOWN,
})
MAX_TXN_OPS = 128  # etcd's default --max-txn-ops, for compares and for operations alike
PAGE = 2000  # keys per range read: a big prefix is read in pages at one revision


class Keys:
    """DESIGN.md §2 key layout under a configurable prefix."""

    def __init__(self, prefix: str = "/sigma/v1") -> None:
        self.prefix = "/" + prefix.strip("/")

    def _k(self, *parts: object) -> str:
        return "/".join([self.prefix, *map(str, parts)])

    def nodes(self) -> str:
        return self._k("nodes", "")

    def node(self, name: str) -> str:
        return self._k("nodes", name)

    def heartbeats(self) -> str:
        return self._k("heartbeats", "")

    def heartbeat(self, name: str) -> str:
        return self._k("heartbeats", name)

    def apps(self, namespace: str | None = None) -> str:
        return self._k("apps", namespace, "") if namespace else self._k("apps", "")

    def app(self, namespace: str, app: str) -> str:
        return self._k("apps", namespace, app)

    def instances(self, namespace: str | None = None, app: str | None = None) -> str:
        parts = [p for p in (namespace, app) if p]
        return self._k("instances", *parts, "")

    def instance(self, namespace: str, app: str, index: int) -> str:
        return self._k("instances", namespace, app, index)

    def revisions(self, namespace: str, app: str) -> str:
        return self._k("revisions", namespace, app, "")

    def revision(self, namespace: str, app: str, n: int) -> str:
        """Revision n (its template generation) of an app (sigmad.control.rollout.Revision)."""
        return self._k("revisions", namespace, app, n)

    def rollout(self, namespace: str, app: str) -> str:
        """The rollout record of an app (sigmad.control.rollout.Rollout)."""
        return self._k("rollouts", namespace, app)

    def overlay_applied(self, node: str) -> str:
        """Leased by `node`'s agent: the store revision its overlay FDB has applied
        (sigmad.models.OverlayApplied)."""
        return self._k("overlay-applied", node)

    def node_lock(self, node: str) -> str:
        """Bumped by every placement onto `node`; placements guard its revision so two
        schedulers never book the same capacity twice."""
        return self._k("alloc", "node", node)

    def node_locks(self) -> str:
        return self._k("alloc", "node", "")

    def port(self, node: str, port: int) -> str:
        """Owner (instance key) of a host port on a node; created only if absent."""
        return self._k("alloc", "port", node, port)

    def ports(self, node: str | None = None) -> str:
        return self._k("alloc", "port", node, "") if node else self._k("alloc", "port", "")

    def ip(self, address: str) -> str:
        """Owner (instance key) of an overlay IP; created only if absent, deleted only with
        the instance."""
        return self._k("alloc", "ip", address)

    def ips(self) -> str:
        return self._k("alloc", "ip", "")

    def ssds(self, node: str | None = None) -> str:
        return self._k("ssds", node, "") if node else self._k("ssds", "")

    def ssd(self, node: str, disk: str) -> str:
        """An allowed disk of `node` as its agent reports it (sigmad.models.Ssd)."""
        return self._k("ssds", node, disk)

    def ssd_claim(self, node: str, disk: str) -> str:
        """Owner (instance key) of an SSD; created only if absent, in the placement's
        transaction."""
        return self._k("alloc", "ssd", node, disk)

    def ssd_claims(self, node: str | None = None) -> str:
        return self._k("alloc", "ssd", node, "") if node else self._k("alloc", "ssd", "")

    def events(self) -> str:
        return self._k("events", "")

    def usages(self) -> str:
        return self._k("usage", "")

    def usage(self, node: str) -> str:
        """The latest usage sample of `node` (leased by its agent; sigmad.models.UsageRecord)."""
        return self._k("usage", node)
    def config_version(self, namespace: str, name: str, version: int) -> str:
        """One immutable version of a config (sigmad.configs.ConfigVersion)."""
        return self._k("configs", namespace, name, version)

    def config_versions(self, namespace: str, name: str) -> str:
        return self._k("configs", namespace, name, "")

    def config_head(self, namespace: str, name: str) -> str:
        """A config's head: its latest version and the versions kept."""
        return self._k("config-heads", namespace, name)

    def config_heads(self, namespace: str | None = None) -> str:
        return self._k("config-heads", namespace, "") if namespace else \
            self._k("config-heads", "")

    def config_held(self, node: str, instance: str) -> str:
        """What `node`'s agent has delivered for `instance` (`ns/app-index`); only that
        agent writes it."""
        return self._k("config-held", node, instance)

    def configs_held(self, node: str | None = None) -> str:
        return self._k("config-held", node, "") if node else self._k("config-held", "")

    def leader(self) -> str:
        """The leader record, leased by its holder; every controller write compares it."""
        return self._k("leader")

    def masters(self) -> str:
        return self._k("masters", "")

    def master(self, master_id: str) -> str:
        """A master's presence record, leased by it."""
        return self._k("masters", master_id)

    def tokens(self) -> str:
        return self._k("tokens", "")

    def token(self, token_id: str) -> str:
        """A scoped API token's record (sigmad.tokens): its hash, never the token."""
        return self._k("tokens", token_id)

    def audit(self) -> str:
        """Audit entries, leased (they expire), newest first (sigmad.api.audit)."""
        return self._k("audit", "")

    def schema(self) -> str:
        """The version of the records' layout (sigmad.schema), written by the first leader."""
        return self._k("schema")

    def restoring(self) -> str:
        """Present while `sigmad restore` writes (sigmad.backup): nobody acts on a half."""
        return self._k("restoring")


@dataclass(slots=True)
class Versioned(Generic[T]):
    """A record as read, with the key and mod_revision a later CAS compares against."""

    key: str
    value: T
    mod_revision: int


@dataclass(frozen=True)
class Guard:
    """A transaction precondition: `key` is at `mod_revision` (0: the key is absent; below 0:
    never holds)."""

    key: str
    mod_revision: int


@dataclass
class Claim:
    """The answer of a leased create-if-absent: the key's mod_revision if it is ours (0 if
    another holds it), and the store revision the answer was read at."""

    mod_revision: int
    revision: int


class Deposed(SigmaError):
    """A fenced write failed because its fence (the leader key as won) no longer holds: this
    process is not the leader any more and must stop writing."""

    code = "deposed"
    status = 503


@dataclass
class Op:
    """A transaction operation: put `record` at `key` (optionally leased), or delete `key`.
    `data` is the record's JSON, encoded once (by `encoded`)."""

    key: str
    record: Any = None
    delete: bool = False
    lease: int = 0
    data: bytes = b""

    def encoded(self) -> bytes:
        """The record's JSON bytes (encoded on first use, then kept)."""
        if not self.data and not self.delete:
            self.data = records.dumps(self.record)
        return self.data


@dataclass(frozen=True, slots=True)
class Item:
    """One key as etcd holds it."""

    key: str
    value: bytes
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class WatchEvent:
    key: str
    value: bytes | None  # None on delete
    mod_revision: int


@dataclass
class WatchBatch:
    """Events of one watch answer, in revision order; `revision`: the store's revision when
    it was sent (every change up to it under the watched range has been delivered).
    `broken`: the stream broke (no events; it is being resumed): until the next batch, the
    watcher's view may be stale."""

    revision: int
    events: list[WatchEvent]
    broken: bool = False


@dataclass(frozen=True, slots=True)
class Span:
    """At most `limit` keys of a range [start, end) in key order, the revision they were
    read at, and whether the range holds more keys after the last one (`more`)."""

    items: list[Item]
    revision: int
    more: bool


@dataclass
class Outcome:
    """A transaction's answer: its revision if it committed (0 if a guard failed), and
    whether the fence still held when it did not."""

    revision: int
    fence_held: bool = True


def batches(items: list[T], cost: Callable[[T], tuple[int, int]],
            limit: int = MAX_TXN_OPS) -> list[list[T]]:
    """`items` packed, in order, into transactions of at most `limit` guards and `limit`
    ops (`cost` of an item: the guards and the ops it needs). One guard of each transaction
    is kept for the fence."""
    out: list[list[T]] = []
    guards = ops = limit + 1
    for item in items:
        g, o = cost(item)
        if guards + g > limit - 1 or ops + o > limit:
            out.append([])
            guards = ops = 0
        out[-1].append(item)
        guards += g
        ops += o
    return out


class Store(Protocol):
    """What sigma needs of its store (etcd, or tests' in-memory one)."""

    keys: Keys
    fence: Guard | None
    on_deposed: Callable[[], None] | None

    async def close(self) -> None: ...
    async def ping(self) -> int: ...
    async def get_raw(self, key: str) -> Item | None: ...
    async def range_raw(self, prefix: str, keys_only: bool = False, limit: int = 0,
                        revision: int = 0) -> tuple[list[Item], int]: ...
    async def span(self, start: str, end: str, limit: int, revision: int = 0) -> Span: ...
    async def get(self, key: str, cls: type[T]) -> Versioned[T] | None: ...
    async def scan(self, prefix: str, cls: type[T]) -> tuple[list[Versioned[T]], int]: ...
    async def keys_under(self, prefix: str) -> list[str]: ...
    async def revisions(self, prefix: str) -> dict[str, int]: ...
    async def put(self, key: str, record: Any, lease: int = 0) -> None: ...
    async def create(self, key: str, record: Any, lease: int = 0) -> bool: ...
    async def update(self, key: str, record: Any, mod_revision: int) -> bool: ...
    async def delete(self, key: str, mod_revision: int | None = None) -> bool: ...
    async def commit(self, guards: Sequence[Guard], ops: Sequence[Op]) -> int: ...
    async def claim(self, key: str, record: Any, lease: int) -> Claim: ...
    def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]: ...
    def watch_key(self, key: str, start_revision: int) -> AsyncGenerator[WatchEvent, None]: ...
    def watch_batches(self, prefix: str, start_revision: int,
                      end: str | None = None) -> AsyncIterator[WatchBatch]: ...
    async def grant(self, ttl: int) -> int: ...
    async def keepalive(self, lease_id: int) -> bool: ...
    async def revoke(self, lease_id: int) -> None: ...
    async def compact(self, revision: int) -> int: ...


def prefix_end(prefix: str) -> str:
    """The end of the key range of every key starting with `prefix`."""
    return aetcd.utils.prefix_range_end(prefix.encode()).decode()


class _TlsClient(aetcd.Client):
    """aetcd's client on a TLS channel (aetcd 1.0 opens plain channels only): `connect`
    is aetcd's, with `grpc.aio.secure_channel` (and no password login: the user is the
    client certificate's common name)."""

    def __init__(self, credentials: grpc.ChannelCredentials, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        rpc = aetcd.rpc
        self.channel = rpc.secure_channel(f"{self._host}:{self._port}", self._credentials,
                                          options=list(self._options.items()))
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.watcher.Watcher(rpc.WatchStub(self.channel),
                                              timeout=self._timeout, metadata=self.metadata)
        self._connected.set()


def _credentials(tls: TlsFiles | None) -> grpc.ChannelCredentials | None:
    if tls is None:
        return None
    ca, key, cert = tls.pem()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=cert)


def _target(endpoint: str) -> tuple[str, int]:
    url = urlsplit(endpoint)
    return url.hostname or "127.0.0.1", url.port or 2379


class StoreOps:
    """The typed calls of `Store`, built on its primitives (`get_raw`, `range_raw`, `txn`,
    `watch_batches`), shared by every implementation."""

    keys: Keys
    fence: Guard | None = None
    on_deposed: Callable[[], None] | None = None

    async def get_raw(self, key: str) -> Item | None:
        raise NotImplementedError

    async def range_raw(self, prefix: str, keys_only: bool = False, limit: int = 0,
                        revision: int = 0) -> tuple[list[Item], int]:
        """Every key under `prefix` (at most `limit` > 0 of them) as of `revision` (0: now),
        and the revision read at."""
        raise NotImplementedError

    async def txn(self, guards: Sequence[Guard], ops: Sequence[Op]) -> Outcome:
        """One transaction: all `ops` if every guard holds, else nothing."""
        raise NotImplementedError

    def watch_batches(self, prefix: str, start_revision: int,
                      end: str | None = None) -> AsyncIterator[WatchBatch]:
        raise NotImplementedError

    async def get(self, key: str, cls: type[T]) -> Versioned[T] | None:
        item = await self.get_raw(key)
        if item is None:
            return None
        return Versioned(key, records.loads(cls, item.value), item.mod_revision)

    async def scan(self, prefix: str, cls: type[T]) -> tuple[list[Versioned[T]], int]:
        """Every record under `prefix`, and the revision they were read at."""
        items, revision = await self.range_raw(prefix)
        return [Versioned(i.key, records.loads(cls, i.value), i.mod_revision)
                for i in items], revision

    async def keys_under(self, prefix: str) -> list[str]:
        items, _ = await self.range_raw(prefix, keys_only=True)
        return [i.key for i in items]

    async def revisions(self, prefix: str) -> dict[str, int]:
        """key → mod_revision of every key under `prefix` (values not read)."""
        items, _ = await self.range_raw(prefix, keys_only=True)
        return {i.key: i.mod_revision for i in items}

    async def put(self, key: str, record: Any, lease: int = 0) -> None:
        await self.commit([], [Op(key, record, lease=lease)])

    async def create(self, key: str, record: Any, lease: int = 0) -> bool:
        """Write `record` only if `key` is absent."""
        return bool(await self.commit([Guard(key, 0)], [Op(key, record, lease=lease)]))

    async def update(self, key: str, record: Any, mod_revision: int) -> bool:
        """Write `record` only if `key` is still at `mod_revision`."""
        return bool(await self.commit([Guard(key, mod_revision)], [Op(key, record)]))

    async def delete(self, key: str, mod_revision: int | None = None) -> bool:
        """Delete `key`, only if still at `mod_revision` when one is given."""
        guards = [] if mod_revision is None else [Guard(key, mod_revision)]
        return bool(await self.commit(guards, [Op(key, delete=True)]))

    async def commit(self, guards: Sequence[Guard], ops: Sequence[Op]) -> int:
        """One transaction: all `ops` if every guard (and the fence) holds, else nothing.
        Its revision, or 0 on conflict; `Deposed` if the fence failed."""
        if len(guards) + (self.fence is not None) > MAX_TXN_OPS or len(ops) > MAX_TXN_OPS:
            raise ValueError(f"a transaction holds at most {MAX_TXN_OPS} guards and "
                             f"{MAX_TXN_OPS} ops")
        started = time.monotonic()
        outcome = await self.txn(guards, ops)
        metrics.ETCD_TXN_SECONDS.observe(time.monotonic() - started)
        if not outcome.revision and outcome.fence_held:
            metrics.ETCD_CONFLICTS.inc()
        if not outcome.revision and not outcome.fence_held:
            if self.on_deposed is not None:
                self.on_deposed()
            assert self.fence is not None
            raise Deposed(f"not the leader any more ({self.fence.key} is not as won): "
                          "write refused")
        return outcome.revision

    async def landed(self, guards: Sequence[Guard], ops: Sequence[Op]) -> int:
        """The revision at which this very transaction committed, if the store shows that it
        did (0 if not, or if it cannot tell): asked after an attempt whose answer was lost.

        With puts: every key put holds its value (and lease) at one revision R, every key
        deleted is absent at R, and every guard (the fence too) held at R - 1, so the
        transaction at R was this one (or one identical to it). With deletes only: every key
        deleted is absent now, every guard is on a key it deletes, and the fence holds; what
        was asked is done (the key is gone), so it is reported done."""
        puts = [op for op in ops if not op.delete]
        deletes = [op.key for op in ops if op.delete]
        compares = [*guards, *([self.fence] if self.fence else [])]
        try:
            if not puts:
                if not deletes or any(g.key not in deletes for g in guards):
                    return 0
                for key in deletes:
                    if await self.get_raw(key) is not None:
                        return 0
                if self.fence is not None and not _held(self.fence,
                                                       await self.get_raw(self.fence.key)):
                    return 0
                _, now = await self.range_raw(deletes[0], keys_only=True, limit=1)
                return now
            found = await asyncio.gather(*(self.get_raw(op.key) for op in puts))
            revisions = {item.mod_revision for item in found if item is not None}
            if len(revisions) != 1 or any(
                    item is None or item.value != op.encoded() or item.lease != op.lease
                    for item, op in zip(found, puts, strict=True)):
                return 0
            (revision,) = revisions
            gone = await asyncio.gather(*(self._at(key, revision) for key in deletes))
            before = await asyncio.gather(*(self._at(g.key, revision - 1) for g in compares))
            held = all(_held(g, item) for g, item in zip(compares, before, strict=True))
            return revision if held and not any(gone) else 0
        except SigmaError:  # e.g. history compacted: cannot tell
            return 0

    async def _at(self, key: str, revision: int) -> Item | None:
        """`key` as it was at `revision`."""
        items, _ = await self.range_raw(key, limit=1, revision=revision)
        return items[0] if items and items[0].key == key else None

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Changes under `prefix` from `start_revision` on; resumes after an outage. Raises
        `WatchCompacted` if history is gone; callers then relist."""
        async for batch in self.watch_batches(prefix, start_revision):
            for event in batch.events:
                yield event

    async def watch_key(self, key: str, start_revision: int) -> AsyncGenerator[WatchEvent, None]:
        """Changes of the single key `key` from `start_revision` on (as `watch`)."""
        async for batch in self.watch_batches(key, start_revision, end=""):
            for event in batch.events:
                yield event


class EtcdStore(StoreOps):
    """An etcd client for one cluster (a list of endpoints, tried in turn: a connection
    failure moves to the next one).

    `fence`, when set, is compared by every write of this instance (commit, create, update,
    put, delete): the leader's controller store carries the leader key as won, so a deposed
    leader writes nothing and sees `Deposed`; `on_deposed` is then called too.

    `shared_leases`: lease keepalives go over `lease_streams` shared streams (`LeaseStream`,
    a lease always on the same one), for a process that keeps many leases alive (hollow
    hosts); otherwise each is its own call. etcd renews the leases of one stream one after
    the other, each waiting until etcd has applied what it committed: behind a burst of
    writes, the renewals of thousands of leases on ONE stream took longer than their TTL
    and every lease lapsed (real agents each have a stream of their own).

    `tls`: the CA (and client certificate) of `https://` endpoints."""

    def __init__(
        self, endpoints: list[str], prefix: str = "/sigma/v1", retry_for: float = 30.0,
        rpc_timeout: float = 5.0, shared_leases: bool = False, tls: TlsFiles | None = None,
        lease_streams: int = 1,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        if problem := endpoint_problem(endpoints, tls):
            raise ValueError(f"etcd endpoints {', '.join(endpoints)}: {problem}")
        self.endpoints = endpoints
        self.tls = tls
        self._channel_credentials = _credentials(tls)
        self.keys = Keys(prefix)
        self.retry_for = retry_for
        self.rpc_timeout = rpc_timeout
        self._current = 0
        self._client = self._new_client()
        self._outage = False
        self.fence: Guard | None = None
        self.on_deposed: Callable[[], None] | None = None
        self.shared_leases = shared_leases
        self.lease_streams = max(1, lease_streams)
        self._leases: dict[int, LeaseStream] = {}  # slot (see _lease_stream) → its stream

    def _new_client(self) -> aetcd.Client:
        host, port = _target(self.endpoints[self._current])
        # A cache lists every record at start: answers bigger than gRPC's 4 MiB default.
        options = {"grpc.max_receive_message_length": 256 << 20}
        if self._channel_credentials is not None:
            return _TlsClient(self._channel_credentials, host=host, port=port,
                              timeout=self.rpc_timeout, options=options)
        return aetcd.Client(host=host, port=port, timeout=self.rpc_timeout, options=options)

    async def close(self) -> None:
        for stream in self._leases.values():
            await stream.close()
        self._leases.clear()
        await self._client.close()

    async def _reconnect(self, used: aetcd.Client) -> None:
        """Replace the client `used` by one on the next endpoint, unless another call already
        did. Closing it ends the calls still running on it: they retry (see `_interrupted`)."""
        if self._client is not used:
            return
        self._current = (self._current + 1) % len(self.endpoints)
        self._client = self._new_client()
        try:
            await used.close()
        except Exception:  # a broken channel may fail to close; it is dropped anyway
            log.debug("closing the etcd client failed", exc_info=True)

    async def _call(self, what: str, fn: Callable[[aetcd.Client], Awaitable[R]]) -> R:
        """Run `fn(client)`, retrying transient failures with jittered backoff."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_for
        delay = 0.1
        while True:
            client = self._client
            try:
                result = await fn(client)
            except (*_TRANSIENT, aetcd.rpc.AioRpcError, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and not _interrupted():
                    raise
                if isinstance(exc, aetcd.rpc.AioRpcError) and exc.code() not in \
                        _TRANSIENT_CODES:
                    hint = "" if exc.code() != aetcd.rpc.StatusCode.PERMISSION_DENIED else \
                        (" (etcd auth: this certificate's user may not do that; see "
                         "'sigmad pki etcd-auth')")
                    raise StoreUnavailable(f"etcd refused {what}: {exc.details()}{hint}") \
                        from None
                if not self._outage:
                    log.warning("etcd %s failed (%s); retrying", what, _short(exc))
                    self._outage = True
                if loop.time() + delay > deadline:
                    raise StoreUnavailable(
                        f"etcd at {', '.join(self.endpoints)} is unreachable: {_short(exc)}"
                    ) from None
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 2.0)
                await self._reconnect(client)
                continue
            if self._outage:
                log.warning("etcd reachable again")
                self._outage = False
            return result

    async def _stub(self, client: aetcd.Client, method: str, request: Any) -> Any:
        await client.connect()
        call = getattr(client.kvstub, method)
        return await call(request, timeout=self.rpc_timeout, metadata=client.metadata)

    async def ping(self) -> int:
        """The current revision (raises StoreUnavailable if etcd is down). It reads one key
        of the cluster's: etcd auth lets sigma's users read nothing else."""
        request = aetcd.rpc.RangeRequest(key=self.keys.leader().encode(), keys_only=True)
        response = await self._call("ping", functools.partial(self._stub, method="Range",
                                                              request=request))
        return int(response.header.revision)

    async def get_raw(self, key: str) -> Item | None:
        request = aetcd.rpc.RangeRequest(key=key.encode())
        response = await self._call("get", functools.partial(self._stub, method="Range",
                                                             request=request))
        if not response.kvs:
            return None
        kv = response.kvs[0]
        return Item(key, kv.value, int(kv.mod_revision), int(kv.lease))

    async def range_raw(self, prefix: str, keys_only: bool = False, limit: int = 0,
                        revision: int = 0) -> tuple[list[Item], int]:
        """Read page by page at one revision (one gRPC answer is capped in size)."""
        start, end = prefix.encode(), aetcd.utils.prefix_range_end(prefix.encode())
        items: list[Item] = []
        while True:
            request = aetcd.rpc.RangeRequest(
                key=start, range_end=end, limit=min(limit or PAGE, PAGE), revision=revision,
                keys_only=keys_only,
            )
            response = await self._call("range", functools.partial(
                self._stub, method="Range", request=request))
            revision = revision or int(response.header.revision)
            items.extend(Item(kv.key.decode(), kv.value, int(kv.mod_revision), int(kv.lease))
                         for kv in response.kvs)
            if not response.more or (limit and len(items) >= limit):
                return items, revision
            start = response.kvs[-1].key + b"\0"

    async def span(self, start: str, end: str, limit: int, revision: int = 0) -> Span:
        """One range read of at most `limit` keys (etcd stops at the limit: no sort and no
        revision filter, which would make it read the whole range first)."""
        request = aetcd.rpc.RangeRequest(key=start.encode(), range_end=end.encode(),
                                         limit=limit, revision=revision)
        response = await self._call("range", functools.partial(
            self._stub, method="Range", request=request))
        return Span([Item(kv.key.decode(), kv.value, int(kv.mod_revision), int(kv.lease))
                     for kv in response.kvs], int(response.header.revision),
                    bool(response.more))

    async def compact(self, revision: int) -> int:
        """Drop etcd's history before `revision` (watches from older revisions then fail
        with WatchCompacted, and their caches relist). A revision at or below one already
        compacted is no error: the answer is then 0, else `revision`."""
        request = aetcd.rpc.CompactionRequest(revision=revision)
        try:
            await self._call("compaction", functools.partial(
                self._stub, method="Compact", request=request))
        except StoreUnavailable as exc:
            if "compacted" in exc.message:
                return 0
            raise
        return revision

    async def txn(self, guards: Sequence[Guard], ops: Sequence[Op]) -> Outcome:
        rpc = aetcd.rpc
        fence = self.fence
        compare = [_compare(g) for g in (*guards, *([fence] if fence else []))]
        success = [
            rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=op.key.encode()))
            if op.delete else
            rpc.RequestOp(request_put=rpc.PutRequest(key=op.key.encode(), value=op.encoded(),
                                                     lease=op.lease))
            for op in ops
        ]
        failure = [rpc.RequestOp(request_range=rpc.RangeRequest(key=fence.key.encode()))] \
            if fence else []
        request = rpc.TxnRequest(compare=compare, success=success, failure=failure)
        attempts = 0

        async def send(client: aetcd.Client) -> Any:
            nonlocal attempts
            attempts += 1
            return await self._stub(client, "Txn", request)

        response = await self._call("transaction", send)
        if response.succeeded:
            return Outcome(int(response.header.revision))
        if attempts > 1:  # an earlier attempt may have committed, its answer lost
            revision = await self.landed(guards, ops)
            if revision:
                log.info("a transaction whose answer was lost had committed (revision %d)",
                         revision)
                return Outcome(revision)
        if fence is None:
            return Outcome(0)
        found = response.responses[0].response_range.kvs if response.responses else []
        return Outcome(0, _holds(fence, [int(kv.mod_revision) for kv in found]))

    async def claim(self, key: str, record: Any, lease: int) -> Claim:
        """Create `key` under `lease` if it is absent (leader election). A key already held by
        the same lease counts as ours: a retried create whose first answer was lost."""
        rpc = aetcd.rpc
        request = rpc.TxnRequest(
            compare=[_compare(Guard(key, 0))],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(
                key=key.encode(), value=records.dumps(record), lease=lease))],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key.encode()))],
        )
        response = await self._call("claim", functools.partial(
            self._stub, method="Txn", request=request))
        revision = int(response.header.revision)
        if response.succeeded:
            return Claim(revision, revision)
        found = response.responses[0].response_range.kvs if response.responses else []
        if not found:  # deleted since: not possible inside one transaction, but be safe
            return Claim(0, 0)
        kv = found[0]
        return Claim(int(kv.mod_revision) if kv.lease == lease else 0, revision)

    async def watch_batches(self, prefix: str, start_revision: int,
                            end: str | None = None) -> AsyncIterator[WatchBatch]:
        """Changes under `prefix` (or of the range [prefix, end); end "" = the key alone)
        from `start_revision` on, one batch per etcd answer (an empty one when the watch is
        (re)established); reconnects and resumes after an outage, saying so with a `broken`
        batch. Raises `WatchCompacted` if history is gone; callers then relist."""
        rpc = aetcd.rpc
        key = prefix.encode()
        range_end = aetcd.utils.prefix_range_end(key) if end is None else end.encode()
        revision = start_revision
        delay = 0.1
        while True:
            client = self._client
            requests: asyncio.Queue[Any] = asyncio.Queue()
            requests.put_nowait(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                key=key, range_end=range_end, start_revision=revision)))

            async def send(queue: asyncio.Queue[Any] = requests) -> AsyncIterator[Any]:
                while (request := await queue.get()) is not None:
                    yield request

            call = None
            try:
                await client.connect()
                call = aetcd.rpc.WatchStub(client.channel).Watch(send(),
                                                                 metadata=client.metadata)
                async for response in call:
                    if response.compact_revision:
                        raise WatchCompacted(prefix, int(response.compact_revision))
                    if response.canceled:
                        raise aetcd.exceptions.ClientError(
                            f"watch canceled: {response.cancel_reason}")
                    if response.created:
                        yield WatchBatch(int(response.header.revision), [])
                    if not response.events:
                        continue
                    delay = 0.1
                    events = [
                        WatchEvent(e.kv.key.decode(), None if e.type else e.kv.value,
                                   int(e.kv.mod_revision))
                        for e in response.events
                    ]
                    revision = events[-1].mod_revision + 1
                    yield WatchBatch(int(response.header.revision), events)
                raise aetcd.exceptions.ClientError("the watch stream ended")
            except WatchCompacted:
                raise
            except (*_TRANSIENT, aetcd.exceptions.ClientError, aetcd.rpc.AioRpcError,
                    asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and not _interrupted():
                    raise
                log.warning("watch on %s broke (%s); resuming from %d", prefix, _short(exc),
                            revision)
            finally:
                requests.put_nowait(None)
                if call is not None:
                    call.cancel()
            yield WatchBatch(0, [], broken=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            await self._reconnect(client)

    async def apply_access(self, access: Access) -> list[str]:
        """Make etcd auth's users and roles as `access` says (sigmad.etcd_access), then
        enable auth. Run as root (its certificate); each step is idempotent, so a second run
        (say with more nodes) adds what is missing. What was done, in words."""
        rpc = aetcd.rpc
        kinds = {"read": rpc.Permission.READ, "write": rpc.Permission.WRITE,
                 "readwrite": rpc.Permission.READWRITE}
        done: list[str] = []

        async def auth(method: str, request: Any, what: str) -> None:
            async def call(client: aetcd.Client) -> Any:
                await client.connect()
                stub = rpc.AuthStub(client.channel)
                return await getattr(stub, method)(request, timeout=self.rpc_timeout)

            try:
                await self._call(what, call)
            except StoreUnavailable as exc:
                if "already exists" not in exc.message and \
                        "already granted" not in exc.message:
                    raise
            else:
                done.append(what)

        no_password = rpc.UserAddOptions(no_password=True)
        await auth("UserAdd", rpc.AuthUserAddRequest(name=access.root, options=no_password),
                   f"user {access.root}")
        await auth("UserGrantRole", rpc.AuthUserGrantRoleRequest(user=access.root,
                                                                 role="root"),
                   f"role root granted to {access.root}")
        for user, role in access.users:
            await auth("RoleAdd", rpc.AuthRoleAddRequest(name=role.name), f"role {role.name}")
            for p in role.permissions:
                perm = rpc.Permission(permType=kinds[p.kind], key=p.key.encode(),
                                      range_end=p.range_end.encode())
                span = f"[{p.key}, {p.range_end})" if p.range_end else p.key
                await auth("RoleGrantPermission", rpc.AuthRoleGrantPermissionRequest(
                    name=role.name, perm=perm), f"role {role.name}: {p.kind} {span}")
            await auth("UserAdd", rpc.AuthUserAddRequest(name=user, options=no_password),
                       f"user {user}")
            await auth("UserGrantRole", rpc.AuthUserGrantRoleRequest(user=user,
                                                                     role=role.name),
                       f"role {role.name} granted to {user}")
        # Enabling it again is a no-op (etcd 3.4 has no AuthStatus to ask first).
        await auth("AuthEnable", rpc.AuthEnableRequest(), "auth enabled")
        return done

    async def grant(self, ttl: int) -> int:
        """A new lease of `ttl` seconds; its id."""
        lease = await self._call("lease grant", lambda c: c.lease(ttl))
        return int(lease.id)

    async def keepalive(self, lease_id: int) -> bool:
        """Refresh a lease; False if it has already expired (with `shared_leases`, over the
        one shared stream)."""
        if self.shared_leases:
            ttl = await self._call("lease keepalive",
                                   lambda c: self._lease_stream(c, lease_id).refresh(lease_id))
            return ttl > 0
        reply = await self._call("lease keepalive", lambda c: c.refresh_lease(lease_id))
        return reply is not None and reply.TTL > 0

    def _lease_stream(self, client: aetcd.Client, lease_id: int) -> LeaseStream:
        """The keepalive stream of `lease_id` on `client`, (re)opened if it is on an older
        client or broke."""
        # etcd's lease ids share a counter with its other requests (a burst of grants
        # gives ids two apart): hashed, so that every stream gets its share.
        slot = zlib.crc32(lease_id.to_bytes(8, "little")) % self.lease_streams
        stream = self._leases.get(slot)
        if stream is None or stream.client is not client or stream.broken:
            if stream is not None:
                stream.abandon()
            stream = self._leases[slot] = LeaseStream(client, self.rpc_timeout)
        return stream

    async def revoke(self, lease_id: int) -> None:
        """End a lease now: its keys are deleted. A lease already gone is fine."""
        try:
            await self._call("lease revoke", lambda c: c.revoke_lease(lease_id))
        except (aetcd.exceptions.ClientError, StoreUnavailable) as exc:
            if "not found" not in str(exc):
                raise


class LeaseStream:
    """ONE long-lived gRPC LeaseKeepAlive stream that many leases share.

    A refresh of one lease through its own call (aetcd's `refresh_lease`) opens and closes a
    stream each time: ~0.7 ms of CPU, too much for thousands of agents in one process (hollow
    hosts). Here a refresh is one message on an open stream. etcd answers a stream's requests
    one by one, in order, so each reply belongs to the oldest refresh still waiting (checked
    by lease id). A stream that answers nothing for `timeout` while refreshes wait, or that
    broke, fails every waiting refresh with OSError: a transient error, which `Store._call`
    retries on a new stream (reconnecting if need be). A stream that answers, however long
    its queue, is left alone: failing it would send the whole queue again at once (an etcd
    slowed by a burst of thousands of refreshes would get the same burst back). One timer
    per stream, not one per refresh."""

    def __init__(self, client: aetcd.Client, timeout: float) -> None:
        self.client = client
        self.timeout = timeout
        self.broken = False
        self._outbox: asyncio.Queue[int] = asyncio.Queue()
        self._waiting: deque[tuple[int, asyncio.Future[int]]] = deque()
        self._progress = 0.0  # when it last answered, or began to wait after being idle
        self._task = asyncio.create_task(self._run())
        self._watchdog = asyncio.create_task(self._watch())

    async def refresh(self, lease_id: int) -> int:
        """The lease's TTL after a refresh (0: it has expired)."""
        if self.broken:
            raise OSError("the lease keepalive stream broke")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        if not self._waiting:
            self._progress = loop.time()
        self._waiting.append((lease_id, future))
        self._outbox.put_nowait(lease_id)
        return await future

    async def _requests(self) -> AsyncIterator[Any]:
        while True:
            lease_id = await self._outbox.get()
            yield aetcd.rpc.LeaseKeepAliveRequest(ID=lease_id)

    async def _run(self) -> None:
        why = "the lease keepalive stream ended"
        call = None
        try:
            await self.client.connect()
            call = self.client.leasestub.LeaseKeepAlive(self._requests(),
                                                        metadata=self.client.metadata)
            loop = asyncio.get_running_loop()
            async for reply in call:
                if not self._waiting or self._waiting[0][0] != reply.ID:
                    why = f"the lease keepalive stream answered lease {reply.ID:x} out of turn"
                    return
                self._progress = loop.time()
                future = self._waiting.popleft()[1]
                if not future.done():  # its caller may have been cancelled
                    future.set_result(int(reply.TTL))
        except asyncio.CancelledError:
            why = "the lease keepalive stream was closed"
            raise
        except Exception as exc:  # a broken channel: the waiters retry on a new stream
            why = f"the lease keepalive stream broke: {_short(exc)}"
        finally:
            self._fail(why)
            if call is not None:
                call.cancel()  # ends the stream on etcd's side too

    async def _watch(self) -> None:
        """Fail the stream when it answered nothing for the timeout while refreshes wait; a
        round in which this process's event loop itself was late does not count (replies
        may sit unread)."""
        loop = asyncio.get_running_loop()
        period = self.timeout / 4
        while not self.broken:
            woke = loop.time() + period
            await asyncio.sleep(period)
            if loop.time() - woke > period / 2:
                continue
            if self._waiting and loop.time() - self._progress > self.timeout:
                self._fail(f"no lease keepalive answer in {self.timeout:g}s")
                self._task.cancel()

    def _fail(self, why: str) -> None:
        self.broken = True
        while self._waiting:
            future = self._waiting.popleft()[1]
            if not future.done():
                future.set_exception(OSError(why))
        self._watchdog.cancel()

    def abandon(self) -> None:
        """Stop using it: its waiters fail (and retry elsewhere), its call is cancelled."""
        self._task.cancel()
        self._fail("the lease keepalive stream was replaced")

    async def close(self) -> None:
        self.abandon()
        await asyncio.gather(self._task, self._watchdog, return_exceptions=True)


def _interrupted() -> bool:
    """Whether a CancelledError out of an etcd call means its channel was closed under it
    (another call reconnected: retry) rather than this task being cancelled (stop)."""
    task = asyncio.current_task()
    return task is not None and not task.cancelling()


def _compare(g: Guard) -> Any:
    rpc = aetcd.rpc
    key = g.key.encode()
    if g.mod_revision > 0:
        return rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.MOD,
                           mod_revision=g.mod_revision)
    if g.mod_revision == 0:
        return rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.VERSION,
                           version=0)
    return rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.MOD,
                       mod_revision=-1)  # never true


def _held(g: Guard, item: Item | None) -> bool:
    """Whether guard `g` holds for `item` (the key as read, None if absent)."""
    if g.mod_revision < 0:
        return False
    if g.mod_revision == 0:
        return item is None
    return item is not None and item.mod_revision == g.mod_revision


def _holds(fence: Guard, found: list[int]) -> bool:
    """Whether the fence still held in a failed transaction (`found`: the mod_revision of
    the fence key as its failure branch read it, if present)."""
    if fence.mod_revision < 0:
        return False
    if fence.mod_revision == 0:
        return not found
    return bool(found) and found[0] == fence.mod_revision


class WatchCompacted(Exception):
    """The watch's start revision was compacted away: relist, then watch again.
    `revision`: the oldest revision etcd still holds."""

    def __init__(self, prefix: str, revision: int) -> None:
        super().__init__(f"{prefix} (compacted to {revision})")
        self.revision = revision


def _short(exc: BaseException) -> str:
    if isinstance(exc, aetcd.rpc.AioRpcError | grpc.Call):
        return f"{exc.code().name}: {exc.details()}"[:200]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


class LeaseKeeper:
    """Keeps one lease alive from a thread of its own, over a blocking gRPC channel, so a
    busy event loop cannot starve its keepalives (a leader in a burst of work would lose its
    lease and stop leading). It renews only while `alive()` says the owner's event loop still
    turns: a hung process lets its lease lapse, as it should.

    `last_ok` is when etcd last confirmed the lease (monotonic); `expired` says etcd answered
    that it is gone."""

    def __init__(self, endpoints: list[str], lease: int, ttl: int,
                 alive: Callable[[], bool], tls: TlsFiles | None = None) -> None:
        self.endpoints = endpoints
        self.tls = tls
        self.lease = lease
        self.ttl = ttl
        self.alive = alive
        self.last_ok = time.monotonic()
        self.expired = False
        self.error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{lease:x}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        current = 0
        channel = None
        try:
            while not self._stop.is_set():
                if channel is None:
                    host, port = _target(self.endpoints[current])
                    credentials = _credentials(self.tls)
                    channel = grpc.insecure_channel(f"{host}:{port}") if credentials is None \
                        else grpc.secure_channel(f"{host}:{port}", credentials)
                if self.alive():
                    try:
                        stub = aetcd.rpc.LeaseStub(channel)
                        reply = next(iter(stub.LeaseKeepAlive(
                            iter([aetcd.rpc.LeaseKeepAliveRequest(ID=self.lease)]),
                            timeout=max(1.0, self.ttl / 3))))
                        if reply.TTL <= 0:
                            self.expired = True
                            return
                        self.last_ok, self.error = time.monotonic(), ""
                    except (grpc.RpcError, StopIteration) as exc:
                        self.error = _short(exc) if isinstance(exc, grpc.RpcError) else \
                            "no answer"
                        channel.close()
                        channel = None
                        current = (current + 1) % len(self.endpoints)
                self._stop.wait(self.ttl / 3)
        finally:
            if channel is not None:
                channel.close()
