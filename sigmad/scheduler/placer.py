"""Placement: a pure function of a snapshot and the instances to place (DESIGN.md §4).

Fast where it matters, the way large schedulers are:
- identical requests (same request, ports, placement; same app when topology-spread) form an
  equivalence class that keeps its feasible-node queue across the whole call: a node that
  fails a room filter once stays failed (room only shrinks within a call) and is dropped;
- label indexes find a selector's nodes without scanning the pool;
- only a bounded sample of feasible nodes (SAMPLE) is scored, kept as a heap whose entries
  are re-scored only when their node changed. `spread` takes REFRESH decisions from a sample,
  then samples the next nodes of its queue, so load rotates over the pool; `binpack` keeps
  its sample until those nodes are full, so nodes fill one after another.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from dataclasses import dataclass, field

from sigmad.scheduler import filters, rankers
from sigmad.scheduler.fit import fit
from sigmad.scheduler.snapshot import NodeInfo, Room, Snapshot
from sigmad.spec import Placement, Resources

SAMPLE = 64  # feasible nodes scored at a time (kube-scheduler's percentageOfNodesToScore)
FIRST_SAMPLE = 16  # a class's first sample; each next one doubles, up to SAMPLE
REFRESH = 8  # spread: decisions taken from one sample before the next nodes are sampled
MISSING = "\0"  # the topology domain of nodes without the spread label


@dataclass
class Request:
    """One instance to place. `app` is `namespace/app`; `ports` is how many host ports."""

    key: str
    app: str
    request: Resources
    placement: Placement = field(default_factory=Placement)
    ports: int = 0


@dataclass
class Binding:
    node: str
    ports: list[int]


@dataclass
class Unplaced:
    reason: str
    counts: dict[str, int]  # filter reason → nodes rejected for it


@dataclass
class Decision:
    placed: dict[str, Binding] = field(default_factory=dict)
    unplaced: dict[str, Unplaced] = field(default_factory=dict)


def place(
    snapshot: Snapshot, requests: list[Request], rng: random.Random | None = None
) -> Decision:
    """Place `requests` in order; each one sees what the earlier ones took. The snapshot is
    not changed. `rng` breaks ties between equal scores (seed it for repeatable results)."""
    return Placer(snapshot, rng).place(requests)


class Placer:
    """Several `place` calls on one snapshot: each call sees what the earlier calls took (the
    indexes, classes and rooms are built once, not per call). The snapshot is not changed."""

    def __init__(self, snapshot: Snapshot, rng: random.Random | None = None) -> None:
        self.work = _Work(snapshot, rng or random.Random())

    def place(self, requests: list[Request]) -> Decision:
        """Place `requests` in order (see `place`)."""
        work = self.work
        decision = Decision()
        for req in requests:
            cls = work.cls(req)
            if cls.unplaced is None:
                node = cls.pick()
                if node is not None:
                    decision.placed[req.key] = work.bind(node, req)
                    continue
                cls.unplaced = work.explain(req)
            decision.unplaced[req.key] = cls.unplaced
        return decision


class _Window:
    """A queue of candidate nodes and a scored sample from its front: a max-heap of
    (-score, tie-breaker, room version, node) whose stale entries are re-scored lazily."""

    __slots__ = ("heap", "limit", "queue", "size", "uses")

    def __init__(self, nodes: list[int], share: int) -> None:
        self.queue = deque(nodes)
        self.heap: list[tuple[float, float, int, int]] = []
        self.uses = 0  # picks from the current sample
        # Windows of one class share the sample budget; small classes sample little.
        self.size = max(4, FIRST_SAMPLE // share)
        self.limit = max(8, SAMPLE // share)


class _Class:
    """An equivalence class of identical requests, with its candidate windows: one per value
    of the topology-spread label (or a single one)."""

    def __init__(self, work: _Work, req: Request, groups: dict[str, list[int]]) -> None:
        self.work = work
        self.cpu = req.request.cpu_m
        self.memory = req.request.memory
        self.ports = req.ports
        self.binpack = req.placement.strategy == "binpack"
        self.rank = rankers.most_requested if self.binpack else rankers.least_requested
        self.unplaced: Unplaced | None = None  # set once no node fits: shared by the rest
        self.spread = req.placement.spread
        self.counts = work.domain_counts(req.app, self.spread) if self.spread else {}
        self.windows = [(value, _Window(nodes, len(groups))) for value, nodes in groups.items()]
        if not self.binpack:  # start somewhere random so schedulers do not all collide
            for _, win in self.windows:
                if win.queue:
                    win.queue.rotate(work.rng.randrange(len(win.queue)))

    def pick(self) -> int | None:
        """The index of the node to bind to, or None if no node fits."""
        if not self.spread:
            win = self.windows[0][1]
            best = self._best(win)
            if best is None:
                return None
            win.uses += 1
            return best[1]
        found = []
        for value, win in self.windows:
            best = self._best(win)
            if best is not None:
                found.append((value, win, *best))
        if not found:
            return None
        topology = rankers.topology(
            [None if value == MISSING else self.counts.get(value, 0) for value, *_ in found]
        )
        scores = rankers.combine([score for _, _, score, _ in found], topology)
        _, win, _, node = found[rankers.pick(scores, self.work.rng)]
        win.uses += 1
        return node

    def _best(self, win: _Window) -> tuple[float, int] | None:
        """The window's best (score, node) that still fits; a new sample when spread has
        used this one REFRESH times (so load rotates over the pool) or none is left."""
        heap = win.heap
        if win.uses >= REFRESH and not self.binpack:
            heap.clear()
        rooms, cpu, mem, ports = self.work.rooms, self.cpu, self.memory, self.ports
        while True:
            if not heap:
                self._sample(win)
                if not heap:
                    return None
            neg, _, version, i = heap[0]
            room = rooms[i]
            if room.version == version:
                return -neg, i
            if fit(room.cpu, room.memory, room.ports, cpu, mem, ports) is None:
                score = self.rank(room, cpu, mem)
                heapq.heapreplace(heap, (-score, self.work.rng.random(), room.version, i))
            else:
                heapq.heappop(heap)

    def _sample(self, win: _Window) -> None:
        """Score the next `win.size` nodes from the front of the queue that still fit; those
        that no longer fit are dropped for good (room only shrinks within a call). Spread
        moves the sampled nodes to the back of the queue, binpack keeps them in front."""
        rooms, rng, queue, rank = self.work.rooms, self.work.rng, win.queue, self.rank
        cpu, mem, ports = self.cpu, self.memory, self.ports
        size = win.size
        win.size = min(win.limit, 2 * size)
        heap: list[tuple[float, float, int, int]] = []
        pop, push = queue.popleft, queue.append
        for _ in range(len(queue)):
            i = pop()
            r = rooms[i]
            if fit(r.cpu, r.memory, r.ports, cpu, mem, ports) is not None:
                continue
            heap.append((-rank(r, cpu, mem), rng.random(), r.version, i))
            push(i)
            if len(heap) >= size:
                break
        if self.binpack:
            queue.rotate(len(heap))
        heapq.heapify(heap)
        win.heap[:] = heap
        win.uses = 0


class _Work:
    """The mutable side of one `place` call: rooms, indexes and equivalence classes."""

    def __init__(self, snapshot: Snapshot, rng: random.Random) -> None:
        self.rng = rng
        self.infos: list[NodeInfo] = list(snapshot.nodes.values())
        self.rooms = [Room(info) for info in self.infos]
        self.usable = [i for i, n in enumerate(self.infos) if n.ready and not n.draining]
        self.by_label: dict[str, dict[str, list[int]]] | None = None
        self.selectors: dict[object, list[int]] = {}
        self.grouped: dict[tuple[object, str], dict[str, list[int]]] = {}
        self.placements: dict[int, tuple[tuple[object, str, str], Placement]] = {}  # by id
        self.classes: dict[tuple[object, ...], _Class] = {}
        self.domains: dict[tuple[str, str], dict[str, int]] = {}
        self.app_domains: dict[str, list[tuple[str, dict[str, int]]]] = {}
        self.app_nodes: dict[str, list[tuple[int, int]]] | None = None
        self.bound: dict[str, list[int]] = {}  # app → nodes given a replica by this call

    def cls(self, req: Request) -> _Class:
        """The equivalence class of `req` (created on first sight)."""
        p = req.placement
        known = self.placements.get(id(p))
        if known is None:
            known = self.placements[id(p)] = (_placement_key(p), p)  # keeps `p` alive
        pkey = known[0]
        res = req.request
        key = (pkey, res.cpu_m, res.memory, req.ports, req.app if p.spread else "")
        cls = self.classes.get(key)
        if cls is None:
            cls = self.classes[key] = _Class(self, req, self.groups(pkey[0], p))
        return cls

    def groups(self, selector: object, placement: Placement) -> dict[str, list[int]]:
        """The candidates of `placement` by value of its spread label (cached)."""
        key = (selector, placement.spread)
        found = self.grouped.get(key)
        if found is None:
            candidates = self.candidates(selector, placement)
            if not placement.spread:
                found = {MISSING: candidates}
            else:
                found = {}
                for i in candidates:
                    value = self.infos[i].labels.get(placement.spread, MISSING)
                    found.setdefault(value, []).append(i)
            self.grouped[key] = found
        return found

    def candidates(self, selector: object, placement: Placement) -> list[int]:
        """Ready, not draining nodes that `placement` selects (cached per selector)."""
        found = self.selectors.get(selector)
        if found is not None:
            return found
        pool = self.usable
        if placement.labels:
            index = self.label_index()
            pool = min(
                (index.get(k, {}).get(v, []) for k, v in placement.labels.items()), key=len
            )
        infos = self.infos
        found = self.selectors[selector] = [
            i for i in pool if filters.labels(infos[i], placement) is None
        ]
        return found

    def label_index(self) -> dict[str, dict[str, list[int]]]:
        """label → value → usable nodes carrying it."""
        if self.by_label is None:
            self.by_label = {}
            for i in self.usable:
                for k, v in self.infos[i].labels.items():
                    self.by_label.setdefault(k, {}).setdefault(v, []).append(i)
        return self.by_label

    def domain_counts(self, app: str, label: str) -> dict[str, int]:
        """Replicas of `app` per value of `label` (shared by the app's classes, kept current
        by `bind`)."""
        counts = self.domains.get((app, label))
        if counts is None:
            counts = self.domains[(app, label)] = {}
            replicas = self._app_nodes().get(app, []) + [(i, 1) for i in self.bound.get(app, [])]
            for i, n in replicas:
                value = self.infos[i].labels.get(label)
                if value is not None:
                    counts[value] = counts.get(value, 0) + n
            self.app_domains.setdefault(app, []).append((label, counts))
        return counts

    def _app_nodes(self) -> dict[str, list[tuple[int, int]]]:
        if self.app_nodes is None:
            self.app_nodes = {}
            for i, info in enumerate(self.infos):
                for app, n in info.apps.items():
                    self.app_nodes.setdefault(app, []).append((i, n))
        return self.app_nodes

    def bind(self, i: int, req: Request) -> Binding:
        """Book `req` on node `i`: its request, fresh host ports and one replica."""
        info, room = self.infos[i], self.rooms[i]
        ports = self._ports(info, room, req.ports) if req.ports else []
        room.book(req.request.cpu_m, req.request.memory, req.ports)
        self.bound.setdefault(req.app, []).append(i)
        for label, counts in self.app_domains.get(req.app, ()):
            value = info.labels.get(label)
            if value is not None:
                counts[value] = counts.get(value, 0) + 1
        return Binding(info.name, ports)

    def _ports(self, info: NodeInfo, room: Room, n: int) -> list[int]:
        """`n` random host ports of the node's range, free on it and not given out yet."""
        lo, hi = info.port_range
        used, taken, rng = info.ports, room.taken, self.rng
        out: list[int] = []
        for _ in range(8 * n):  # random probes: fast while the range is mostly free
            port = rng.randint(lo, hi)
            if port not in used and port not in taken:
                taken.add(port)
                out.append(port)
                if len(out) == n:
                    break
        if len(out) < n:
            free = [p for p in range(lo, hi + 1) if p not in used and p not in taken]
            more = rng.sample(free, n - len(out))
            taken.update(more)
            out += more
        return out

    def explain(self, req: Request) -> Unplaced:
        if not self.infos:
            return Unplaced("no nodes registered", {})
        reason, counts = filters.explain(
            zip(self.infos, self.rooms, strict=True), req.placement, req.request, req.ports
        )
        return Unplaced(reason, counts)


def _placement_key(p: Placement) -> tuple[object, str, str]:
    """What makes two placements select (first item) and rank the same way."""
    selector = (
        tuple(sorted(p.labels.items())),
        tuple((e.key, e.operator, tuple(e.values)) for e in p.expressions),
    )
    return selector, p.spread, p.strategy
