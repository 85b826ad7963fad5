"""etcd auth's plan: each agent writes only its own node keys; masters write the prefix.
(The integration test test_tls.py::test_an_agent_cannot_write_another_nodes_keys checks the
same on a real etcd.)"""

from __future__ import annotations

from sigmad.etcd_access import READ, READWRITE, WRITE, Role, plan
from sigmad.store import Keys

KEYS = Keys("/sigma/v1")


def may(role: Role, kind: str, key: str) -> bool:
    """Whether `role` grants `kind` (read or write) on `key`, as etcd decides."""
    for p in role.permissions:
        kinds = {READ: {READ}, WRITE: {WRITE}, READWRITE: {READ, WRITE}}[p.kind]
        inside = key == p.key if not p.range_end else p.key <= key < p.range_end
        if kind in kinds and inside:
            return True
    return False


def roles() -> dict[str, Role]:
    return dict(plan(KEYS, ["h2", "h1", "h1"]).users)


def test_users_are_the_certificates_common_names() -> None:
    access = plan(KEYS, ["h2", "h1", "h1"])
    assert access.root == "root"
    assert [u for u, _ in access.users] == ["sigma-master", "sigma-node-h1", "sigma-node-h2"]
    assert all(user == role.name for user, role in access.users)


def test_an_agent_writes_only_its_own_node_keys() -> None:
    h1 = roles()["sigma-node-h1"]
    assert may(h1, WRITE, KEYS.node("h1")) and may(h1, WRITE, KEYS.heartbeat("h1"))
    assert may(h1, WRITE, KEYS.events() + "1764265000.1-7")
    for key in (KEYS.node("h2"), KEYS.heartbeat("h2"), KEYS.node("h10"), KEYS.node("h1x"),
                KEYS.heartbeat("h1/x"), KEYS.instance("default", "web", 0), KEYS.leader(),
                KEYS.ip("10.244.0.2"), KEYS.node_lock("h1"), KEYS.app("default", "web"),
                KEYS.nodes(), "/sigma/v1/tokens/abc", "/other/v1/nodes/h1"):
        assert not may(h1, WRITE, key), key


def test_an_agent_reads_the_cluster_but_nothing_outside_it() -> None:
    h1 = roles()["sigma-node-h1"]
    assert may(h1, READ, KEYS.instance("default", "web", 0)) and may(h1, READ, KEYS.node("h2"))
    assert not may(h1, READ, "/sigma/v10/x") and not may(h1, READ, "/other/v1/nodes/h1")


def test_masters_read_and_write_the_prefix_only() -> None:
    master = roles()["sigma-master"]
    for key in (KEYS.leader(), KEYS.node("h1"), KEYS.instance("a", "b", 1), KEYS.ip("1.2.3.4")):
        assert may(master, WRITE, key) and may(master, READ, key)
    assert not may(master, WRITE, "/sigma/v10/x") and not may(master, WRITE, "/sigma/v1")
