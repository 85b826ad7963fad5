"""Commit placements to etcd with optimistic concurrency: the scheduler's only I/O.

One round reads node locks, nodes, heartbeats and instances (in that order: a placement bumps
its node's lock in the same transaction as its instance, so a lock read before the instances
is never newer than them, and a stale instance view fails its lock guard), places every
Pending instance, and commits in bounded transactions. Each transaction is guarded by every
instance's mod_revision, every touched node's lock revision and the absence of every host
port key it books; a transaction that loses is re-planned from a fresh read, only for its own
instances. Two schedulers racing on one etcd therefore never book capacity or a port twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import secrets
from dataclasses import dataclass, field

from sigmad.models import PENDING, SCHEDULED, Instance, Node, NodeLock, Owner, now
from sigmad.scheduler.placer import Binding, Decision, Request, Unplaced, place
from sigmad.scheduler.snapshot import Snapshot, build_snapshot
from sigmad.spec import AppSpec
from sigmad.store import MAX_TXN_OPS, Guard, Op, Store, Versioned, batches

CONCURRENCY = 16  # transactions in flight at once
UNPLACED_BATCH = MAX_TXN_OPS // 2  # (guard, put) pairs per reason-update transaction


@dataclass
class BindResult:
    placed: int = 0  # instances committed as Scheduled
    unplaced: int = 0  # instances left Pending because no node fits
    conflicts: int = 0  # lost transactions and taken node locks (their instances re-planned)
    rounds: int = 0  # reads + plans
    scheduled: dict[str, str] = field(default_factory=dict)  # instance `ns/app-i` → node
    pending: dict[str, str] = field(default_factory=dict)  # instance → new Pending reason


@dataclass
class _Piece:
    """Placements onto one node that go into one transaction."""

    node: str
    items: list[tuple[Versioned[Instance], Binding]]
    ops: int  # guards + ops it needs, its node lock included


async def schedule_pending(
    store: Store, apps: dict[str, AppSpec], rng: random.Random | None = None,
    max_rounds: int = 5,
) -> BindResult:
    """Place every Pending instance that has its overlay IP and whose app (`ns/app` → spec)
    is known, and commit the placements; instances that fit nowhere get their reason and
    per-filter counts."""
    result = BindResult()
    todo: set[str] | None = None  # None: every Pending instance
    while result.rounds < max_rounds:
        snapshot, instances = await read(store)
        result.rounds += 1
        pending = [
            v for v in instances
            if _wants_a_node(v.value) and _app(v.value) in apps
            and (todo is None or v.key in todo)
        ]
        if not pending:
            break
        decision = place_all(snapshot, pending, apps, rng)
        by_key = {v.key: v for v in pending}
        placed = [(by_key[k], b) for k, b in decision.placed.items()]
        failed, conflicts = await _commit(store, snapshot, apps, placed)
        result.scheduled.update((v.value.key, b.node) for v, b in placed if v.key not in failed)
        result.placed = len(result.scheduled)
        result.conflicts += conflicts
        result.unplaced += len(decision.unplaced)
        result.pending.update(
            await _explain(store, [(by_key[k], u) for k, u in decision.unplaced.items()])
        )
        if not failed:
            break
        todo = failed
    return result


async def read(store: Store) -> tuple[Snapshot, list[Versioned[Instance]]]:
    """A snapshot and every instance record, read in the order the lock guards rely on."""
    keys = store.keys
    locks, _ = await store.scan(keys.node_locks(), NodeLock)
    nodes, _ = await store.scan(keys.nodes(), Node)
    beats = await store.keys_under(keys.heartbeats())
    instances, revision = await store.scan(keys.instances(), Instance)
    snapshot = build_snapshot(
        [v.value for v in nodes], {k.rsplit("/", 1)[-1] for k in beats},
        [v.value for v in instances], revision,
        {v.key.rsplit("/", 1)[-1]: v.mod_revision for v in locks},
    )
    return snapshot, instances


def place_all(snapshot: Snapshot, pending: list[Versioned[Instance]], apps: dict[str, AppSpec],
              rng: random.Random | None) -> Decision:
    """Place instances that must go to one node (`sigmactl migrate --to`) on that node alone,
    booking them into the snapshot, then everything else."""
    decision = Decision()
    by_target: dict[str, list[Request]] = {}
    free: list[Request] = []
    for v in pending:
        request = _request(v, apps[_app(v.value)])
        (by_target.setdefault(v.value.target, []) if v.value.target else free).append(request)
    for node, requests in sorted(by_target.items()):
        info = snapshot.nodes.get(node)
        one = place(Snapshot(snapshot.revision, {node: info} if info else {}), requests, rng)
        decision.unplaced.update(one.unplaced)
        decision.placed.update(one.placed)
        for r in requests:
            if info is not None and r.key in one.placed:
                info.requested.cpu_m += r.request.cpu_m
                info.requested.memory += r.request.memory
                info.ports.update(one.placed[r.key].ports)
    rest = place(snapshot, free, rng)
    decision.placed.update(rest.placed)
    decision.unplaced.update(rest.unplaced)
    return decision


def _wants_a_node(inst: Instance) -> bool:
    """Pending with its overlay IP, or asked to move live and not booked elsewhere yet."""
    return (inst.state == PENDING and bool(inst.ip)) or (bool(inst.move) and not inst.next_node)


def _app(inst: Instance) -> str:
    return f"{inst.namespace}/{inst.app}"


def _request(v: Versioned[Instance], spec: AppSpec) -> Request:
    return Request(v.key, _app(v.value), v.value.request, spec.placement,
                   len(spec.network.ports))


def pieces(placed: list[tuple[Versioned[Instance], Binding]]) -> list[list[_Piece]]:
    """Placements grouped by node into pieces that each fit one transaction, as waves: wave
    n holds the n-th piece of every node, so transactions of one wave touch distinct nodes
    and may run at once."""
    by_node: dict[str, list[tuple[Versioned[Instance], Binding]]] = {}
    for item in placed:
        by_node.setdefault(item[1].node, []).append(item)
    waves: list[list[_Piece]] = []
    for node, items in by_node.items():
        piece = _Piece(node, [], 2)
        wave = 0
        for item in items:
            cost = 2 + 2 * len(item[1].ports)
            if piece.items and piece.ops + cost > MAX_TXN_OPS:
                _add(waves, wave, piece)
                piece, wave = _Piece(node, [], 2), wave + 1
            piece.items.append(item)
            piece.ops += cost
        _add(waves, wave, piece)
    return waves


def _add(waves: list[list[_Piece]], wave: int, piece: _Piece) -> None:
    while len(waves) <= wave:
        waves.append([])
    waves[wave].append(piece)


def transactions(wave: list[_Piece]) -> list[list[_Piece]]:
    """Pieces packed, in order, into transactions of at most MAX_TXN_OPS guards and ops."""
    return batches(wave, lambda piece: piece.ops)


async def _commit(
    store: Store, snapshot: Snapshot, apps: dict[str, AppSpec],
    placed: list[tuple[Versioned[Instance], Binding]],
) -> tuple[set[str], int]:
    """Commit placements; the instance keys that did not commit, and the conflicts met."""
    locks = {name: info.lock for name, info in snapshot.nodes.items()}
    tokens: dict[str, str] = {}  # node → token of our last successful lock write
    failed: set[str] = set()
    lost_nodes: set[str] = set()
    conflicts = 0
    gate = asyncio.Semaphore(CONCURRENCY)
    for n, wave in enumerate(pieces(placed)):
        if n:  # later pieces of a node guard the lock our previous piece wrote
            going = [p.node for p in wave if p.node not in lost_nodes]
            taken = await _refresh_locks(store, going, locks, tokens)
            conflicts += len(taken)
            lost_nodes |= taken
        ready = [p for p in wave if p.node not in lost_nodes]
        for piece in wave:
            if piece.node in lost_nodes:
                failed.update(v.key for v, _ in piece.items)
        txns = transactions(ready)
        outcomes = await asyncio.gather(
            *(_send(store, gate, txn, locks, tokens, apps) for txn in txns)
        )
        for txn, ok in zip(txns, outcomes, strict=True):
            if ok:
                continue
            conflicts += 1
            for piece in txn:
                lost_nodes.add(piece.node)
                failed.update(v.key for v, _ in piece.items)
    return failed, conflicts


async def _refresh_locks(
    store: Store, nodes: list[str], locks: dict[str, int], tokens: dict[str, str]
) -> set[str]:
    """Update `locks` to the revision our last transaction gave each of `nodes`; the nodes
    whose lock someone else has written since (they are lost to this round)."""
    found = await asyncio.gather(*(store.get(store.keys.node_lock(n), NodeLock) for n in nodes))
    lost = set()
    for node, v in zip(nodes, found, strict=True):
        if v is None or v.value.token != tokens.get(node):
            lost.add(node)
        else:
            locks[node] = v.mod_revision
    return lost


async def _send(
    store: Store, gate: asyncio.Semaphore, txn: list[_Piece], locks: dict[str, int],
    tokens: dict[str, str], apps: dict[str, AppSpec],
) -> bool:
    keys = store.keys
    token = secrets.token_hex(8)
    guards: list[Guard] = []
    ops: list[Op] = []
    for piece in txn:
        lock = keys.node_lock(piece.node)
        guards.append(Guard(lock, locks.get(piece.node, 0)))
        ops.append(Op(lock, NodeLock(piece.items[0][0].value.key, token)))
        for v, binding in piece.items:
            inst = v.value
            names = [p.name for p in apps[_app(inst)].network.ports]
            guards.append(Guard(v.key, v.mod_revision))
            ports = dict(zip(names, binding.ports, strict=True))
            if inst.state == PENDING:
                placed = dataclasses.replace(
                    inst, state=SCHEDULED, node=binding.node, reason="", unschedulable={},
                    target="", host_ports=ports, updated=now(),
                )
            else:  # a live move: started there first, the old copy keeps running meanwhile
                placed = dataclasses.replace(
                    inst, next_node=binding.node, next_ports=ports, unschedulable={},
                    reason=f"moving to {binding.node} ({inst.move})", updated=now(),
                )
            ops.append(Op(v.key, placed))
            for port in binding.ports:
                key = keys.port(binding.node, port)
                guards.append(Guard(key, 0))
                ops.append(Op(key, Owner(inst.key)))
    async with gate:
        ok = await store.commit(guards, ops)
    if ok:
        tokens.update((piece.node, token) for piece in txn)
    return ok


async def _explain(
    store: Store, unplaced: list[tuple[Versioned[Instance], Unplaced]]
) -> dict[str, str]:
    """Write why each instance stays Pending, where that changed (a lost race is left to the
    next pass); the instances whose new reason was written, with it."""
    items = [
        (Guard(v.key, v.mod_revision), Op(v.key, dataclasses.replace(
            v.value, reason=u.reason, unschedulable=u.counts, updated=now(),
        )))
        for v, u in unplaced
        if v.value.reason != u.reason or v.value.unschedulable != u.counts
    ]
    gate = asyncio.Semaphore(CONCURRENCY)

    async def send(chunk: list[tuple[Guard, Op]]) -> dict[str, str]:
        async with gate:
            ok = await store.commit([g for g, _ in chunk], [o for _, o in chunk])
        return {o.record.key: o.record.reason for _, o in chunk} if ok else {}

    written: dict[str, str] = {}
    for done in await asyncio.gather(*(
        send(items[i:i + UNPLACED_BATCH]) for i in range(0, len(items), UNPLACED_BATCH)
    )):
        written.update(done)
    return written
