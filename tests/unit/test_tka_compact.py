"""Compaction: Tailscale's TestCompact scenario, and a chain longer than the scan limit that only
keeps opening because it is compacted."""

from __future__ import annotations

import pytest

from meshnode.tka import AUM, AUMKind, Authority, FileStore, LimitExceeded, MemoryStore, State
from meshnode.tka.compact import compact
from meshnode.tka.key import Key, KeyKind

from .tka_helpers import genesis, key, priv

NOW = 1_000_000_000.0


def test_tailscale_compact_scenario() -> None:
    #   A -> B -> C -> C2 -> D -> E -> F -> G -> H
    #                  |  -> F1 -> F2       | -> G2
    #                  |  -> OLD
    state = State(disablement_values=(bytes([1]) * 32,), keys=(Key(KeyKind.ED25519, 1),))
    aums: dict[str, AUM] = {}

    def add(name: str, parent: str | None, checkpoint: bool = False, seed: int = 0) -> None:
        prev = bytes(aums[parent].hash) if parent else None
        aums[name] = (AUM(AUMKind.CHECKPOINT, prev=prev, state=state) if checkpoint
                      else AUM(AUMKind.NO_OP, prev=prev, key_id=bytes([seed]) if seed else None))

    add("A", None, True), add("B", "A", True), add("C", "B", True), add("C2", "C")
    add("D", "C2", True), add("E", "D"), add("F", "E"), add("G", "F"), add("H", "G")
    add("F1", "C2", seed=1), add("F2", "F1"), add("G2", "G", seed=3), add("OLD", "C2", seed=2)
    store = MemoryStore(clock=lambda: 0.0)
    store.commit_verified(a for n, a in aums.items() if n != "F1")
    store.clock = lambda: NOW  # F1 is new enough by wall-clock time
    store.commit_verified([aums["F1"]])

    ancestor = compact(store, aums["H"].hash, NOW, min_chain=2, min_age=3600)
    assert ancestor == aums["C"].hash
    left = {n for n, a in aums.items() if store.aum(a.hash) is not None}
    assert left == set(aums) - {"A", "B", "OLD"}
    assert store.last_active_ancestor() == aums["C"].hash


def _grow(a: Authority, store, n: int, batch: int = 10) -> Authority:
    for _ in range(n // batch):
        b = a.updater(priv(1))
        for _ in range(batch):
            b.no_op()
        a = a.inform(store, b.finalize(store))
    return a


def test_long_chain_needs_compaction() -> None:
    a, store, _ = genesis(key(1), signer=priv(1))
    a = _grow(a, store, 2050)
    with pytest.raises(LimitExceeded):
        Authority.open(store)
    # Everything is older than two weeks by then.
    a = a.compact(store, now=store.commit_time(a.head) + 15 * 86400)
    assert len(store.all_hashes()) < 100
    reopened = Authority.open(store)
    assert (reopened.head, reopened.state) == (a.head, a.state)
    assert reopened.oldest_ancestor.kind == AUMKind.CHECKPOINT
    # The chain keeps growing normally after compaction.
    a = a.inform(store, a.updater(priv(1)).add_key(key(2)).finalize(store))
    assert Authority.open(store).key_trusted(key(2).key_id)


def test_compaction_on_files(tmp_path) -> None:
    store = FileStore(tmp_path / "tka")
    a, _, g = genesis(key(1), signer=priv(1), store=store)
    a = _grow(a, store, 150, batch=25)
    a = a.compact(store, now=store.commit_time(a.head) + 15 * 86400)
    assert store.aum(g.hash) is None and not (tmp_path / "tka" / "aums" / str(g.hash)).exists()
    reopened = Authority.open(FileStore(tmp_path / "tka"))
    assert (reopened.head, reopened.state) == (a.head, a.state)
    assert reopened.oldest_ancestor.hash == a.oldest_ancestor.hash != g.hash


def test_young_aums_are_kept() -> None:
    a, store, _ = genesis(key(1), signer=priv(1))
    b = a.updater(priv(1))
    for _ in range(120):
        b.no_op()
    a = a.inform(store, b.finalize(store))
    before = len(store.all_hashes())
    a = a.compact(store, now=store.commit_time(a.head) + 60)
    assert len(store.all_hashes()) == before
    assert Authority.open(store).head == a.head
