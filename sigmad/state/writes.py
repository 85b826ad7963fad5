"""Every guarded write of the control plane: the one place that builds guards and ops
(DESIGN.md §2), and the Writer that commits them.

Invariants:
- a change that depends on what was read guards it: the mod_revision of every record it
  rewrites, the absence of every key it claims (`alloc/ip`, `alloc/port`, `alloc/ssd`, a new
  instance), the revision of the node lock of every node it books capacity on, and that of
  every disk record it claims a disk by (as seen `ready`);
- a change is all-or-nothing: the Writer packs whole changes into transactions (never a
  change across two), and when a packed transaction loses, each of its changes is retried
  alone, so one conflict never fails a neighbour;
- a committed change is applied to the cache at once (read-your-writes for this process).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sigmad.control.rollout import Revision, Rollout, begun
from sigmad.models import (
    SSD_READY,
    SSD_WIPING,
    AppRecord,
    Instance,
    Node,
    NodeLock,
    Owner,
    Ssd,
    SsdClaim,
    now,
)
from sigmad.scheduler.snapshot import FreeSsd, RetainedSsd
from sigmad.spec import AppSpec
from sigmad.state.cache import Cache
from sigmad.store import MAX_TXN_OPS, Guard, Keys, Op, Store, Versioned
from sigmad.tokens import TokenRecord

log = logging.getLogger(__name__)
IN_FLIGHT = 2  # transactions the Writer has in flight at once
FULL, LINGER = 32, 0.003  # fewer changes than FULL wait LINGER s for more while one is in flight


@dataclass
class Change:
    """One all-or-nothing write: its guards and its ops."""

    guards: list[Guard] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)

    def cost(self) -> tuple[int, int]:
        return len(self.guards), len(self.ops)

    def __add__(self, other: Change) -> Change:
        return Change(self.guards + other.guards, self.ops + other.ops)


class Writes:
    """Builders of every guarded change, for one key layout."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys

    def instance_key(self, inst: Instance) -> str:
        return self.keys.instance(inst.namespace, inst.app, inst.index)

    # -- instances ---------------------------------------------------------------------------

    def create_instance(self, inst: Instance) -> Change:
        """A new instance (its key absent); its IP is claimed with `claim_ip`."""
        key = self.instance_key(inst)
        return Change([Guard(key, 0)], [Op(key, inst)])

    def update_instance(self, v: Versioned[Instance], new: Instance) -> Change:
        """Rewrite an instance as read (at its mod_revision)."""
        return Change([Guard(v.key, v.mod_revision)], [Op(v.key, new)])

    def delete_instance(self, v: Versioned[Instance], ip_owner: Versioned[Owner] | None,
                        disks: dict[str, Versioned[Ssd] | None] | None = None) -> Change:
        """Delete an instance with its host-port claims, the claims of its disks whose
        volume says `reclaim: wipe` (their agent then wipes them; `retain` ones stay claimed
        until `sigmactl ssd release`; `disks`: their records as read, see `wipe_unseen`), and
        its IP claim if it holds it."""
        inst = v.value
        change = Change([Guard(v.key, v.mod_revision)], [Op(v.key, delete=True)])
        change += self.release_ports(inst.node, inst.host_ports)
        for d in inst.ssds:
            if d.reclaim == "wipe":
                change += Change([], [Op(self.keys.ssd_claim(inst.node, d.disk), delete=True)])
                change += self.wipe_unseen((disks or {}).get(d.disk))
        change += self.release_ports(inst.next_node, inst.next_ports)
        if ip_owner is not None and ip_owner.value.owner == inst.key:
            change += Change([Guard(ip_owner.key, ip_owner.mod_revision)],
                             [Op(ip_owner.key, delete=True)])
        return change

    def claim_ip(self, inst: Instance) -> Change:
        """Claim `inst.ip` (create-if-absent)."""
        key = self.keys.ip(inst.ip)
        return Change([Guard(key, 0)], [Op(key, Owner(inst.key))])

    def release_ip(self, ip: str) -> Change:
        return Change([], [Op(self.keys.ip(ip), delete=True)])

    def release_ports(self, node: str, ports: dict[str, int]) -> Change:
        """Deletes of the host-port claims `ports` on `node`."""
        return Change([], [Op(self.keys.port(node, p), delete=True) for p in ports.values()])

    def claim_ports(self, inst: Instance, node: str, ports: Iterable[int]) -> Change:
        keys = [self.keys.port(node, p) for p in ports]
        return Change([Guard(k, 0) for k in keys], [Op(k, Owner(inst.key)) for k in keys])

    def claim_ssds(self, inst: Instance, node: str, disks: Iterable[FreeSsd]) -> Change:
        """Claim whole disks of `node` (create-if-absent), each only while its record is
        as seen (`ready`, at `revision`)."""
        volumes = {b.disk: b.volume for b in inst.ssds}
        change = Change()
        for d in disks:
            claim = self.keys.ssd_claim(node, d.id)
            change += Change([Guard(self.keys.ssd(node, d.id), d.revision), Guard(claim, 0)],
                             [Op(claim, SsdClaim(inst.key, volumes.get(d.id, "")))])
        return change

    def keep_ssds(self, disks: Iterable[RetainedSsd]) -> Change:
        """Bind an instance's own retained disks again: each only while its claim is as read
        (still this instance's, for that volume)."""
        return Change([Guard(d.claim, d.revision) for d in disks], [])

    def release_ssd(self, claim: Versioned[SsdClaim],
                    disk: Versioned[Ssd] | None = None) -> Change:
        """Give up a retained disk's claim as read (its agent then wipes it; `disk`: its
        record as read, see `wipe_unseen`)."""
        return Change([Guard(claim.key, claim.mod_revision)],
                      [Op(claim.key, delete=True)]) + self.wipe_unseen(disk)

    def wipe_unseen(self, disk: Versioned[Ssd] | None) -> Change:
        """A disk released while its record still says `ready` (claimed and released between
        two passes of its agent, which never saw the claim, yet an instance wrote to it) is
        marked `wiping` in the release's own transaction, guarded as read: its agent wipes
        it before it is `ready` again. A disk its agent saw claimed needs nothing here."""
        if disk is None or disk.value.state != SSD_READY:
            return Change()
        wiping = replace(disk.value, state=SSD_WIPING, owner="", updated=now())
        return Change([Guard(disk.key, disk.mod_revision)], [Op(disk.key, wiping)])

    def book(self, node: str, lock: int, by: str) -> Change:
        """Guard and bump `node`'s lock (its revision `lock` as read, 0 if absent): any
        booking of capacity there goes with it."""
        key = self.keys.node_lock(node)
        return Change([Guard(key, lock)], [Op(key, NodeLock(by))])

    # -- apps and nodes ----------------------------------------------------------------------

    def put_app(self, key: str, rec: AppRecord, mod_revision: int) -> Change:
        """Create (`mod_revision` 0) or rewrite an app as read."""
        return Change([Guard(key, mod_revision)], [Op(key, rec)])

    def revision(self, spec: AppSpec, revision: Revision, drop: Iterable[int] = ()) -> Change:
        """A new revision of an app and the old revisions to `drop` (unguarded: they go
        with the app's own guarded write, which orders them)."""
        ns, app = spec.namespace, spec.app
        change = Change([], [Op(self.keys.revision(ns, app, revision.n), revision)])
        change.ops += [Op(self.keys.revision(ns, app, n), delete=True) for n in drop]
        return change

    def delete_app(self, v: Versioned[AppRecord], revisions: Iterable[int] = ()) -> Change:
        """Delete an app as read, with its `revisions` and its rollout record."""
        s = v.value.spec
        return Change([Guard(v.key, v.mod_revision)], [
            Op(v.key, delete=True), Op(self.keys.rollout(s.namespace, s.app), delete=True)] + [
            Op(self.keys.revision(s.namespace, s.app, n), delete=True) for n in revisions])

    def start_rollout(self, old: AppRecord, new: AppRecord) -> Change:
        """The rollout record of a template change, from the app's previous template (what
        a revert goes back to), to go with the app's own guarded write (sigmad.control.
        rollout executes it). A rollout under way gives way to it."""
        s = new.spec
        return self.put_rollout(self.keys.rollout(s.namespace, s.app), begun(old, new, now()),
                                -1)

    def put_rollout(self, key: str, record: Rollout, mod_revision: int) -> Change:
        """Write an app's rollout record as read (`mod_revision`; 0: absent, -1: unguarded,
        for the app's own guarded write to order)."""
        return Change([Guard(key, mod_revision)] if mod_revision >= 0 else [],
                      [Op(key, record)])

    def update_node(self, v: Versioned[Node], node: Node) -> Change:
        return Change([Guard(v.key, v.mod_revision)], [Op(v.key, node)])

    # -- API tokens --------------------------------------------------------------------------

    def create_token(self, rec: TokenRecord) -> Change:
        """A new token record (its id unused so far)."""
        key = self.keys.token(rec.id)
        return Change([Guard(key, 0)], [Op(key, rec)])

    def update_token(self, v: Versioned[TokenRecord], rec: TokenRecord) -> Change:
        """Rewrite a token record as read (a revocation)."""
        return Change([Guard(v.key, v.mod_revision)], [Op(v.key, rec)])


async def commit(store: Store, cache: Cache | None, change: Change) -> int:
    """Commit one change alone; its revision (0 on conflict). The cache sees it at once."""
    revision = await store.commit(change.guards, change.ops)
    if revision and cache is not None:
        cache.written(revision, change.ops)
    return revision


@dataclass
class _Pending:
    change: Change
    done: asyncio.Future[int]


class Writer:
    """Commits changes from many tasks, packing them into transactions of bounded size
    (see the module docstring). `write` returns the change's revision, 0 on conflict."""

    def __init__(self, store: Store, cache: Cache | None, in_flight: int = IN_FLIGHT) -> None:
        self.store = store
        self.cache = cache
        self.pending: collections.deque[_Pending] = collections.deque()
        self.arrived = asyncio.Event()
        self.gate = asyncio.Semaphore(in_flight)
        self.transactions = 0
        self.changes = 0
        self.conflicts = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def write(self, change: Change) -> int:
        """Commit `change` (in a transaction with others); its revision, or 0 on conflict."""
        g, o = change.cost()
        if g + 1 > MAX_TXN_OPS or o > MAX_TXN_OPS:
            raise ValueError(f"a change of {g} guards and {o} ops does not fit a transaction")
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.pending.append(_Pending(change, done))
        self.arrived.set()
        return await done

    async def run(self) -> None:
        """Send what is queued until cancelled: a transaction whenever one of the IN_FLIGHT
        slots is free, with as many changes as have queued up by then (so under load the
        transactions fill up, and when idle a change goes at once). Each transaction costs
        the leader ~0.3 ms of CPU on top of its changes: few full ones beat many small."""
        try:
            while True:
                await self.gate.acquire()
                while not self.pending:
                    self.arrived.clear()
                    await self.arrived.wait()
                if len(self.pending) < FULL and len(self._tasks):  # busy: let more gather
                    await asyncio.sleep(LINGER)
                task = asyncio.create_task(self._send(self._take()))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _take(self) -> list[_Pending]:
        """The longest run of queued changes that fits one transaction: at most MAX_TXN_OPS
        guards (one kept for the fence) and ops, and no key written twice (etcd refuses a
        duplicate key in one transaction)."""
        chunk: list[_Pending] = []
        guards = ops = 0
        keys: set[str] = set()
        while self.pending:
            p = self.pending[0]
            g, o = p.change.cost()
            mine = {op.key for op in p.change.ops}
            if chunk and (guards + g > MAX_TXN_OPS - 1 or ops + o > MAX_TXN_OPS
                          or not keys.isdisjoint(mine)):
                break
            chunk.append(self.pending.popleft())
            guards, ops = guards + g, ops + o
            keys |= mine
        self.changes += len(chunk)
        return chunk

    async def _send(self, chunk: list[_Pending]) -> None:
        try:
            revision = await self._commit([p.change for p in chunk])
            if revision or len(chunk) == 1:
                for p in chunk:
                    _resolve(p.done, revision)
                return
            # One of them lost: each alone, so only what really conflicted fails.
            singles = await asyncio.gather(
                *(self._commit([p.change]) for p in chunk), return_exceptions=True)
            for p, outcome in zip(chunk, singles, strict=True):
                if isinstance(outcome, BaseException):
                    _fail(p.done, outcome)
                else:
                    _resolve(p.done, outcome)
        except BaseException as exc:  # Deposed, StoreUnavailable, cancellation
            for p in chunk:
                _fail(p.done, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self.gate.release()

    async def _commit(self, changes: Sequence[Change]) -> int:
        guards = [g for c in changes for g in c.guards]
        ops = [o for c in changes for o in c.ops]
        self.transactions += 1
        revision = await self.store.commit(guards, ops)
        if revision and self.cache is not None:
            self.cache.written(revision, ops)
        elif not revision:
            self.conflicts += 1
        return revision


def _resolve(done: asyncio.Future[Any], value: int) -> None:
    if not done.done():
        done.set_result(value)


def _fail(done: asyncio.Future[Any], exc: BaseException) -> None:
    if not done.done():
        if isinstance(exc, asyncio.CancelledError):
            done.cancel()
        else:
            done.set_exception(exc)
