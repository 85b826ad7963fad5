"""Placement (DESIGN.md §4): a pure scheduler over a snapshot (`place`), and the binder that
commits its decisions to etcd (sigmad.scheduler.binder)."""

from sigmad.scheduler.placer import Binding, Decision, Request, Unplaced, place
from sigmad.scheduler.snapshot import NodeInfo, Snapshot, build_snapshot

__all__ = [
    "Binding", "Decision", "NodeInfo", "Request", "Snapshot", "Unplaced", "build_snapshot",
    "place",
]
