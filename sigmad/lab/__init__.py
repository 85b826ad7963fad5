"""`sigmad lab`: several test hosts on one Linux machine (DESIGN.md §1).

Each host is a network namespace with its own dockerd and node agent, on an underlay bridge in
the root namespace; etcd, a registry and the master run in the root namespace. The state lives
in DIR/lab.json, so `down` removes exactly what `up` made, even of a half-built lab.
"""

from sigmad.lab.config import LabConfig, LabError
from sigmad.lab.core import Lab
from sigmad.lab.state import HostState, LabState

__all__ = ["HostState", "Lab", "LabConfig", "LabError", "LabState"]
