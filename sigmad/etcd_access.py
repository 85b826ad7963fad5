"""Who may touch which etcd keys: the users and roles of etcd auth for one cluster (a pure
plan; sigmad.store applies it).

With etcd's --client-cert-auth, a request's user is its client certificate's common name
(sigmad.pki names them), so a stolen agent certificate is worth one node's keys.

Invariants:
- masters (user `sigma-master`) read and write every key under the cluster's prefix;
- the agent of node N (user `sigma-node-N`) reads every key under the prefix and writes only
  `nodes/N`, `heartbeats/N`, `usage/N`, `ssds/N/` (its disks), `config-held/N/` (the
  configs it delivered), `overlay-applied/N` (the revision its FDB has applied) and
  `events/` (what it reports): never
  another node's record or heartbeat, an instance, an allocation or a token;
- `root` (etcd's root role) is for set-up only: no sigma process runs with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sigmad.pki import MASTER_USER, ROOT_USER, node_user
from sigmad.store import Keys, prefix_end

READ, WRITE, READWRITE = "read", "write", "readwrite"


@dataclass(frozen=True)
class Permission:
    """`kind` on the key `key` alone (`range_end` "") or on the range [key, range_end)."""

    kind: str
    key: str
    range_end: str = ""


@dataclass(frozen=True)
class Role:
    name: str
    permissions: tuple[Permission, ...]


@dataclass(frozen=True)
class Access:
    """The users to make (each with the role of the same name), and root."""

    root: str
    users: tuple[tuple[str, Role], ...]


def master_role(keys: Keys) -> Role:
    everything = keys.prefix + "/"
    return Role(MASTER_USER, (Permission(READWRITE, everything, prefix_end(everything)),))


def node_role(keys: Keys, node: str) -> Role:
    everything = keys.prefix + "/"
    return Role(node_user(node), (
        Permission(READ, everything, prefix_end(everything)),
        Permission(READWRITE, keys.node(node)),
        Permission(READWRITE, keys.heartbeat(node)),
        Permission(READWRITE, keys.usage(node)),
        Permission(READWRITE, keys.overlay_applied(node)),
        Permission(READWRITE, keys.ssds(node), prefix_end(keys.ssds(node))),
        Permission(READWRITE, keys.configs_held(node), prefix_end(keys.configs_held(node))),
        Permission(WRITE, keys.events(), prefix_end(keys.events())),
    ))


def plan(keys: Keys, nodes: list[str]) -> Access:
    """The users and roles of a cluster whose agents run on `nodes`."""
    users = [(MASTER_USER, master_role(keys))]
    users += [(node_user(n), node_role(keys, n)) for n in sorted(set(nodes))]
    return Access(ROOT_USER, tuple(users))
