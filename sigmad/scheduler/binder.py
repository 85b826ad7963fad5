"""Commit placements with optimistic concurrency: the scheduler's only I/O.

A round takes a snapshot (the state cache at revision R: nodes, what each has booked, each
node lock's revision), plans every wanted booking purely (`plan`), and commits it through the
Writer (`commit`). Rounds of Pending instances only go on with the last round's snapshot and
placer (what it booked, and the lock revisions its commits wrote) while every change of the
last round won and the snapshot is younger than REUSE seconds; any other round takes a fresh
snapshot. Three kinds of booking go through here, so capacity is booked in one place:
- a Pending instance (with its overlay IP) gets a node and host ports;
- an instance asked to move live gets its next node (`next_node`), booked beside the old;
- an instance whose request grew (a resize or a new template) books the growth on its node.

Invariants: every booking of capacity on a node guards that node's lock revision as the
snapshot saw it and bumps it in the same transaction, and every host port and disk it takes
is guarded absent (a disk's claim also guards the disk's record as seen `ready`); so two
schedulers (or a lagging snapshot) never book capacity, a port or a disk twice. Bookings of
one node go in one change (pieces of one node, when too many for one transaction, guard the
lock revision the previous piece wrote); a change that loses is re-planned next round, only
for its own instances. An instance with SSD volumes never moves live (its data is on one
disk).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from sigmad.models import BoundSsd, Instance
from sigmad.reasons import State
from sigmad.scheduler.placer import Decision, Placer, Request, place
from sigmad.scheduler.snapshot import (
    NODE_LABEL,
    FreeSsd,
    RetainedSsd,
    Snapshot,
    free_ssds,
    retained_ssds,
    snapshot_of,
)
from sigmad.spec import AppSpec, Expression, Resources
from sigmad.state.cache import LOCKS, SSD_CLAIMS, SSDS, Cache
from sigmad.state.writes import Writer, Writes
from sigmad.store import MAX_TXN_OPS, Versioned

ROUND = 1000  # instances planned per round (the event loop runs between rounds)
REUSE = 2.0  # seconds a snapshot serves consecutive rounds of one `schedule` call


@dataclass
class BindResult:
    placed: int = 0  # bookings committed
    unplaced: int = 0  # instances left waiting because no node fits
    conflicts: int = 0  # changes that lost (their instances are re-planned next round)
    rounds: int = 0  # snapshots planned from
    scheduled: dict[str, tuple[str, str]] = field(default_factory=dict)  # `ns/app-i` → node, IP
    pending: dict[str, str] = field(default_factory=dict)  # instance → new waiting reason

    def add(self, other: BindResult) -> None:
        self.placed += other.placed
        self.unplaced += other.unplaced
        self.conflicts += other.conflicts
        self.rounds += other.rounds
        self.scheduled.update(other.scheduled)
        self.pending.update(other.pending)


@dataclass
class Booking:
    """One instance's new record on a node, and the host ports it claims there."""

    old: Versioned[Instance]
    new: Instance
    ports: list[int]
    node: str = ""  # where it was placed ("" for a re-booking on its own node)
    ssds: list[FreeSsd] = field(default_factory=list)  # the disks it claims there
    kept: list[RetainedSsd] = field(default_factory=list)  # its own disks it gets back there

    def cost(self) -> tuple[int, int]:
        return 1 + len(self.ports) + 2 * len(self.ssds) + len(self.kept), \
            1 + len(self.ports) + len(self.ssds)


@dataclass
class RoundPlan:
    by_node: dict[str, list[Booking]] = field(default_factory=dict)
    unplaced: list[tuple[Versioned[Instance], Instance]] = field(default_factory=list)
    waiting: int = 0  # instances no node takes (those whose reason changed: `unplaced`)


def wants_a_node(inst: Instance) -> bool:
    """Pending with its overlay IP, or asked to move live and not booked elsewhere yet."""
    return (inst.state == State.PENDING and bool(inst.ip)) or (bool(inst.move) and
                                                               not inst.next_node)


def wants_a_rebooking(inst: Instance, spec: AppSpec) -> bool:
    """Bound to a node with a request other than its app's (a resize or a new template)."""
    return bool(inst.node) and inst.state not in (State.PENDING, State.TERMINATING) and \
        inst.request != spec.request()


def plan(snapshot: Snapshot, wanted: Sequence[Versioned[Instance]], apps: dict[str, AppSpec],
         rng: random.Random | None = None, placer: Placer | None = None) -> RoundPlan:
    """Pure: the bookings for `wanted` instances (see the module docstring) and the new
    waiting reason of those that fit nowhere. The snapshot's nodes take the bookings of
    re-bookings and targeted placements; a `placer` (of this snapshot, for rounds of free
    placements only) keeps the others for the next round."""
    result = RoundPlan()
    placing = []
    for v in wanted:
        spec = apps[v.value.app_key]
        if not wants_a_node(v.value):
            _rebook(snapshot, v, spec, result)
        elif spec.volumes and v.value.state != State.PENDING:
            why = "no live move: its data is on its SSD (delete it or migrate it when its " \
                  "node is lost)"
            result.waiting += 1
            if v.value.reason != why:
                result.unplaced.append((v, v.value.unplaced(why, v.value.unschedulable)))
        else:
            placing.append(v)
    decision = place_all(snapshot, placing, apps, rng, placer)
    for v in placing:
        inst = v.value
        binding = decision.placed.get(v.key)
        if binding is None:
            result.waiting += 1
            u = decision.unplaced[v.key]
            if inst.reason != u.reason or inst.unschedulable != u.counts:
                result.unplaced.append((v, inst.unplaced(u.reason, u.counts)))
            continue
        spec = apps[inst.app_key]
        ports = dict(zip([p.name for p in spec.network.ports], binding.ports, strict=True))
        kept = given_back(snapshot, inst, spec, binding.node)
        claimed = [] if kept else binding.ssds  # (a free disk the placer took stays free)
        given: list[FreeSsd | RetainedSsd] = [*kept, *claimed]
        disks = [BoundSsd(vol.name, d.id, d.source, vol.reclaim)
                 for vol, d in zip(spec.volumes, given, strict=True)]
        new = inst.bound(binding.node, ports, disks) if inst.state == State.PENDING else \
            inst.move_booked(binding.node, ports)
        result.by_node.setdefault(binding.node, []).append(
            Booking(v, new, binding.ports, binding.node, claimed, kept))
    return result


def given_back(snapshot: Snapshot, inst: Instance, spec: AppSpec, node: str
               ) -> list[RetainedSsd]:
    """A Pending instance placed on `node` where a retained disk of its own holds each of its
    volumes (its node was lost and came back, or it was deleted with `reclaim: retain` and
    applied again): those disks, one per volume in order, instead of new ones. All or none:
    a volume without its own disk there gets new disks for every volume, the old ones stay
    retained (and an event of its move said where)."""
    if inst.state != State.PENDING or not spec.volumes:
        return []
    mine = {d.volume: d for d in snapshot.retained.get(inst.key, ()) if d.node == node}
    found = [mine.get(vol.name) for vol in spec.volumes]
    if any(d is None or d.size < vol.min_size for d, vol in zip(found, spec.volumes, strict=True)):
        return []
    return found  # type: ignore[return-value]


def _rebook(snapshot: Snapshot, v: Versioned[Instance], spec: AppSpec,
            result: RoundPlan) -> None:
    inst = v.value
    info = snapshot.nodes.get(inst.node)
    if info is None:
        return
    new = spec.request()
    grown = Resources(new.cpu_m - inst.request.cpu_m, new.memory - inst.request.memory)
    short = info.short(grown)
    if short is None:
        info.book(grown)
        result.by_node.setdefault(inst.node, []).append(Booking(v, inst.rebooked(new), []))
        return
    result.waiting += 1
    why = (f"update waits: the new request does not fit on {inst.node} (insufficient "
           f"{short}); the old containers keep running")
    if inst.reason != why:
        result.unplaced.append((v, inst.unplaced(why, inst.unschedulable)))


def place_all(snapshot: Snapshot, pending: Sequence[Versioned[Instance]],
              apps: dict[str, AppSpec], rng: random.Random | None,
              placer: Placer | None = None) -> Decision:
    """Place instances that must go to one node (`sigmactl migrate --to`) on that node alone,
    then Pending instances whose own retained disks on a Ready node hold all their volumes
    back on that node (their data is there; they need no free disk), booking both into the
    snapshot, then everything else (a returning instance that does not fit at home too)."""
    decision = Decision()
    by_target: dict[str, list[Request]] = {}
    homes: dict[str, list[Request]] = {}
    free: list[Request] = []
    for v in pending:
        spec = apps[v.value.app_key]
        request = _request(v, spec)
        home = "" if v.value.target else _home(snapshot, v.value, spec)
        if v.value.target:
            by_target.setdefault(v.value.target, []).append(request)
        elif home:
            homes.setdefault(home, []).append(replace(request, ssds=()))
        else:
            free.append(request)
    for node, requests in sorted(by_target.items()):
        _place_on(snapshot, node, requests, rng, decision)
    full = {v.key: _request(v, apps[v.value.app_key]) for v in pending}
    for node, requests in sorted(homes.items()):
        away = _place_on(snapshot, node, requests, rng, Decision(decision.placed))
        free += [full[key] for key in away]
    rest = (placer or Placer(snapshot, rng)).place(free)
    decision.placed.update(rest.placed)
    decision.unplaced.update(rest.unplaced)
    return decision


def _place_on(snapshot: Snapshot, node: str, requests: list[Request],
              rng: random.Random | None, decision: Decision) -> list[str]:
    """Place `requests` on `node` alone, booking them into the snapshot; the keys of those
    that do not fit (their reasons in `decision.unplaced`)."""
    info = snapshot.nodes.get(node)
    one = place(Snapshot(snapshot.revision, {node: info} if info else {}), requests, rng)
    decision.unplaced.update(one.unplaced)
    decision.placed.update(one.placed)
    for r in requests:
        if info is not None and r.key in one.placed:
            info.book(r.request)
            info.ports.update(one.placed[r.key].ports)
            taken = one.placed[r.key].ssds
            info.ssds = [d for d in info.ssds if d not in taken]
    return list(one.unplaced)


def _home(snapshot: Snapshot, inst: Instance, spec: AppSpec) -> str:
    """The Ready node where a Pending instance's own retained disks hold all its volumes
    ("" if none)."""
    if inst.state != State.PENDING or not spec.volumes:
        return ""
    for node in sorted({d.node for d in snapshot.retained.get(inst.key, ())}):
        info = snapshot.nodes.get(node)
        if info is not None and info.ready and given_back(snapshot, inst, spec, node):
            return node
    return ""


def _request(v: Versioned[Instance], spec: AppSpec) -> Request:
    """The request of `v`; a live move's new copy goes to another node than the old one."""
    placement = spec.placement
    if v.value.move and v.value.node:
        placement = replace(placement, expressions=[
            *placement.expressions, Expression(NODE_LABEL, "NotIn", [v.value.node])])
    return Request(v.key, v.value.app_key, v.value.request, placement,
                   len(spec.network.ports), tuple(vol.min_size for vol in spec.volumes))


def pieces(bookings: list[Booking]) -> list[list[Booking]]:
    """One node's bookings in pieces that each fit one transaction with the node's lock."""
    out: list[list[Booking]] = [[]]
    guards = ops = 1
    for b in bookings:
        g, o = b.cost()
        if out[-1] and (guards + g > MAX_TXN_OPS - 1 or ops + o > MAX_TXN_OPS):
            out.append([])
            guards = ops = 1
        out[-1].append(b)
        guards += g
        ops += o
    return out


async def commit(writer: Writer, writes: Writes, snapshot: Snapshot,
                 round_plan: RoundPlan) -> BindResult:
    """Commit a round's plan: each node's bookings (see the module docstring) and the new
    waiting reasons (a lost race there is left to the next round)."""
    result = BindResult()

    async def node(name: str, bookings: list[Booking]) -> None:
        lock = snapshot.nodes[name].lock if name in snapshot.nodes else 0
        for piece in pieces(bookings):
            change = writes.book(name, lock, piece[0].new.key)
            for b in piece:
                change += writes.update_instance(b.old, b.new)
                change += writes.claim_ports(b.new, name, b.ports)
                change += writes.claim_ssds(b.new, name, b.ssds)
                change += writes.keep_ssds(b.kept)
            lock = await writer.write(change)
            if not lock:
                result.conflicts += 1
                return
            if name in snapshot.nodes:
                snapshot.nodes[name].lock = lock  # a next round on this snapshot guards it
            result.placed += len(piece)
            result.scheduled.update((b.new.key, (b.node, b.new.ip)) for b in piece if b.node)

    async def explain(old: Versioned[Instance], new: Instance) -> None:
        if await writer.write(writes.update_instance(old, new)):
            result.pending[new.key] = new.reason
        else:
            result.conflicts += 1  # the record moved on: explain it again from the next view

    result.unplaced = round_plan.waiting
    await asyncio.gather(*(node(n, b) for n, b in round_plan.by_node.items()),
                         *(explain(old, new) for old, new in round_plan.unplaced))
    return result


def cache_snapshot(cache: Cache) -> Snapshot:
    """The scheduler's snapshot of the cache now: nodes, what each has booked, lock revisions
    and free disks."""
    prefix, claims = cache.keys.node_locks(), cache.keys.ssd_claims()
    table = cache.table(SSD_CLAIMS)
    claimed = {tuple(k.removeprefix(claims).split("/", 1)) for k in table}
    disks = list(cache.table(SSDS).values())
    snapshot = snapshot_of((v.value for v in cache.nodes().values()), cache.ready, cache.usage,
                           cache.revision, {k.removeprefix(prefix): v.mod_revision
                                            for k, v in cache.table(LOCKS).items()},
                           free_ssds(disks, claimed))  # type: ignore[arg-type]
    snapshot.retained = retained_ssds(disks, table, cache.keys.ssd_claim)
    return snapshot


async def schedule(cache: Cache, writer: Writer, writes: Writes, apps: dict[str, AppSpec],
                   keys: Sequence[str], rng: random.Random | None = None,
                   max_rounds: int = 5) -> BindResult:
    """Book what the instances `keys` want (those of known apps that still want it), ROUND at
    a time from a fresh snapshot; what lost a race is re-planned once the cache has caught up
    with etcd, up to `max_rounds` times."""
    result = BindResult()
    todo = list(keys)
    for _ in range(max_rounds):
        lost: list[str] = []
        reuse: tuple[Snapshot, Placer, float] | None = None  # snapshot, placer, taken at
        for start in range(0, len(todo), ROUND):
            wanted = []
            for key in todo[start:start + ROUND]:
                v = cache.instance(key)
                if v is None or v.value.app_key not in apps:
                    continue
                if wants_a_node(v.value) or wants_a_rebooking(v.value, apps[v.value.app_key]):
                    wanted.append(v)
            if not wanted:
                continue
            placer: Placer | None = None
            if not all(wants_a_node(v.value) and not v.value.target for v in wanted):
                snapshot, reuse = cache_snapshot(cache), None
            else:
                if reuse is None or time.monotonic() - reuse[2] > REUSE:
                    snapshot = cache_snapshot(cache)
                    reuse = (snapshot, Placer(snapshot, rng), time.monotonic())
                snapshot, placer, _ = reuse
            one = await commit(writer, writes, snapshot, plan(snapshot, wanted, apps, rng, placer))
            one.rounds = 1
            result.add(one)
            if one.conflicts:
                reuse = None
            if one.conflicts:
                lost += [v.key for v in wanted if cache.instance(v.key) is v]
            await asyncio.sleep(0)
        if not lost:
            break
        await cache.wait_for(await cache.store.ping())
        todo = lost
    return result
