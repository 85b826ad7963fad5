"""Gauges and counters of one sigmad process, served as Prometheus text (GET /v1/metrics).

Invariant: each value has one writer thread (the API's thread for connections and streams,
the main loop for watches and compaction), so a plain `+=` never loses an update; readers of
other threads may see a value a moment old.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields


@dataclass
class Metrics:
    """What bounds the master's resources, as numbers a test or a scraper can read."""

    api_connections_refused: int = 0  # connections over the cap, answered 503
    api_slow_bodies: int = 0  # requests whose body did not arrive in time (408)
    api_streams_open: int = 0  # event streams being served
    api_streams_closed: int = 0  # event streams ended (client gone, or the server's end)
    api_watches_open: int = 0  # etcd watches behind event streams
    etcd_compacted_revision: int = 0  # the revision this master last compacted etcd at
    connections: Callable[[], int] = field(default=lambda: 0, repr=False)

    def render(self) -> str:
        """The values in Prometheus' text format, each named `sigma_<name>`."""
        lines = ["# TYPE sigma_api_connections_open gauge",
                 f"sigma_api_connections_open {self.connections()}"]
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int):
                kind = "counter" if f.name.endswith(("_refused", "_closed", "_bodies")) \
                    else "gauge"
                lines += [f"# TYPE sigma_{f.name} {kind}", f"sigma_{f.name} {value}"]
        return "\n".join(lines) + "\n"
