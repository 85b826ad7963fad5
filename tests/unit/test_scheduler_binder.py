"""How the binder cuts placements into bounded, node-disjoint transactions."""

from __future__ import annotations

from sigmad.models import Instance
from sigmad.scheduler import Binding
from sigmad.scheduler.binder import pieces, transactions
from sigmad.store import MAX_TXN_OPS, Versioned


def placed(node: str, count: int, ports: int = 0, start: int = 0
           ) -> list[tuple[Versioned[Instance], Binding]]:
    return [
        (Versioned(f"/i/{node}/{i}", Instance("ns", "web", i, 1), 5),
         Binding(node, list(range(31000, 31000 + ports))))
        for i in range(start, start + count)
    ]


def test_one_piece_per_node_when_it_fits() -> None:
    waves = pieces(placed("a", 3, ports=1) + placed("b", 2))
    assert len(waves) == 1
    by_node = {p.node: p for p in waves[0]}
    assert by_node["a"].ops == 2 + 3 * 4  # lock guard + put, then instance and port pairs
    assert by_node["b"].ops == 2 + 2 * 2


def test_a_crowded_node_spills_into_later_waves() -> None:
    waves = pieces(placed("a", 150) + placed("b", 10))
    assert [sorted(p.node for p in w) for w in waves] == [["a", "b"], ["a"], ["a"]]
    a = [p for w in waves for p in w if p.node == "a"]
    assert [len(p.items) for p in a] == [63, 63, 24]
    assert all(p.ops <= MAX_TXN_OPS for w in waves for p in w)
    keys = [v.key for p in a for v, _ in p.items]
    assert keys == [f"/i/a/{i}" for i in range(150)]  # every placement once, in order


def test_transactions_pack_pieces_within_the_limit() -> None:
    waves = pieces([item for n in range(20) for item in placed(f"n{n}", 5, ports=1)])
    assert len(waves) == 1
    txns = transactions(waves[0])
    sizes = [sum(p.ops for p in txn) for txn in txns]
    assert all(size <= MAX_TXN_OPS for size in sizes)
    assert sum(sizes) == 20 * (2 + 5 * 4)
    assert len(txns) == 4  # 22 ops a piece: 5 pieces (110 ops) per transaction
    nodes = [p.node for txn in txns for p in txn]
    assert len(nodes) == len(set(nodes)) == 20


def test_nothing_placed_nothing_sent() -> None:
    assert pieces([]) == []
    assert transactions([]) == []
