"""Capacity arithmetic, in one place: what a node has booked, and the one fit function.

Only requests are booked (limits are cgroup caps); a request of 0 is best effort and always
fits. `fit` serves the placer's filters, the binder's re-bookings, the API's resize check and
its pool and node views alike, and names the dimension that ran out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from sigmad.spec import Resources

K = TypeVar("K")

CPU, MEMORY, PORTS, SSD = "cpu", "memory", "host ports", "ssd"


def fit(cpu_free: int, memory_free: int, ports_free: int, cpu: int, memory: int,
        ports: int = 0, ssds_free: Sequence[int] = (), ssds: Sequence[int] = ()) -> str | None:
    """The first dimension ("cpu", "memory", "host ports", "ssd") that cannot take a request
    of `cpu` millicores, `memory` bytes, `ports` host ports and a whole free disk of at least
    each size of `ssds` (`ssds_free`: the sizes of the free disks); None if it fits."""
    if cpu and cpu > cpu_free:
        return CPU
    if memory and memory > memory_free:
        return MEMORY
    if ports > ports_free:
        return PORTS
    if ssds and match_ssds(ssds_free, ssds) is None:
        return SSD
    return None


def match_ssds(free: Sequence[int], needs: Sequence[int]) -> list[int] | None:
    """For each of `needs` (minimum sizes), the index in `free` (disk sizes) of its own
    disk, or None if they cannot all be served. The largest need is served first, each by
    the smallest disk that holds it (which serves every set of needs that can be served)."""
    taken: set[int] = set()
    out = [0] * len(needs)
    by_size = sorted(range(len(free)), key=lambda i: free[i])
    for n in sorted(range(len(needs)), key=lambda n: -needs[n]):
        i = next((i for i in by_size if i not in taken and free[i] >= needs[n]), None)
        if i is None:
            return None
        taken.add(i)
        out[n] = i
    return out


@dataclass(slots=True)
class NodeUsage:
    """What the instances bound to one node (or moving to it) book there."""

    requested: Resources = field(default_factory=Resources)
    ports: dict[int, int] = field(default_factory=dict)  # host port → holders
    apps: dict[str, int] = field(default_factory=dict)  # `ns/app` → replicas here
    instances: int = 0

    def add(self, request: Resources, app: str, ports: Iterable[int], sign: int = 1) -> None:
        """Book (`sign` 1) or release (-1) one instance of `app`."""
        self.requested = Resources(self.requested.cpu_m + sign * request.cpu_m,
                                   self.requested.memory + sign * request.memory)
        for port in ports:
            _bump(self.ports, port, sign)
        _bump(self.apps, app, sign)
        self.instances += sign


def _bump(counts: dict[K, int], key: K, by: int) -> None:
    n = counts.get(key, 0) + by
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)
