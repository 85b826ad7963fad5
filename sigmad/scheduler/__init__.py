"""Placement: a pure function of a cluster snapshot (DESIGN.md §4)."""

from sigmad.scheduler.placer import Request, place
from sigmad.scheduler.snapshot import NodeInfo, Snapshot, build_snapshot

__all__ = ["NodeInfo", "Request", "Snapshot", "build_snapshot", "place"]
