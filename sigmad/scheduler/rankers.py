"""Rankers: raw scores per feasible node, normalised to 0..1 and weighted (higher is better).

- spread (the default strategy): the share of the node left free after placing (least
  requested), averaged over cpu and memory;
- binpack: the share of the node requested after placing (most requested);
- topology spread over a label (`placement.spread`): the fewer replicas of the app already in
  the node's label value, the better; nodes without the label rank last. It weighs more than
  the resource ranker, so replicas spread over the label's values before nodes fill evenly.
"""

from __future__ import annotations

import random

from sigmad.scheduler.snapshot import Room

RESOURCE_WEIGHT = 1.0
TOPOLOGY_WEIGHT = 2.0
TIE = 1e-9  # scores this close count as equal


def least_requested(room: Room, cpu: int, memory: int) -> float:
    """Raw spread score: the mean free share of cpu and memory once the request is placed."""
    return ((room.cpu - cpu) * room.inv_cpu + (room.memory - memory) * room.inv_memory) * 0.5


def most_requested(room: Room, cpu: int, memory: int) -> float:
    """Raw binpack score: the mean requested share of cpu and memory once placed."""
    return 1.0 - least_requested(room, cpu, memory)


def normalise(raw: list[float]) -> list[float]:
    """Min-max to 0..1 (all 1.0 when every score is equal)."""
    lo, hi = min(raw), max(raw)
    if hi - lo <= TIE:
        return [1.0] * len(raw)
    scale = 1.0 / (hi - lo)
    return [(s - lo) * scale for s in raw]


def topology(counts: list[int | None]) -> list[float]:
    """Normalised topology-spread scores from the app's replica count in each node's label
    value (None: the node lacks the label, scored 0)."""
    known = [c for c in counts if c is not None]
    if not known:
        return [0.0] * len(counts)
    lo, hi = min(known), max(known)
    scale = 1.0 / (hi - lo) if hi > lo else 0.0
    return [0.0 if c is None else (1.0 if hi == lo else (hi - c) * scale) for c in counts]


def combine(resource: list[float], spread: list[float]) -> list[float]:
    """The weighted sum of the normalised resource scores and topology scores."""
    return [
        RESOURCE_WEIGHT * r + TOPOLOGY_WEIGHT * t
        for r, t in zip(normalise(resource), spread, strict=True)
    ]


def pick(scores: list[float], rng: random.Random) -> int:
    """The index of a best score, chosen at random among equal best scores."""
    best = max(scores)
    top = [i for i, s in enumerate(scores) if s >= best - TIE]
    return top[0] if len(top) == 1 else top[rng.randrange(len(top))]
