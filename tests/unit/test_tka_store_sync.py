"""Chain stores (memory and files) and the sync exchange between nodes and the control server."""

from __future__ import annotations

import json

import pytest

from meshnode.tka import (AUM, AUMKind, Authority, DecodeError, FileStore, LimitExceeded, MemoryStore,
                          NoIntersection, StorageError, UnknownKey)
from meshnode.tka.sync import (SyncOffer, SyncResponse, aums_from_wire, aums_to_wire, answer_offer,
                               apply_response, make_offer, missing_aums)

from .tka_helpers import genesis, key, priv


def _grow(a: Authority, store, n: int, signer: int = 1) -> Authority:
    for _ in range(n):
        a = a.inform(store, a.updater(priv(signer)).no_op().finalize(store))
    return a


def _sync(a: Authority, sa, b: Authority, sb) -> tuple[Authority, Authority]:
    """One full exchange, through the JSON wire form, started by `a`."""
    offer = SyncOffer.from_wire(json.loads(json.dumps(make_offer(a, sa).to_wire())))
    response = SyncResponse.from_wire(json.loads(json.dumps(answer_offer(b, sb, offer).to_wire())))
    a, back = apply_response(a, sa, response)
    if back:
        b = b.inform(sb, aums_from_wire(json.loads(json.dumps(aums_to_wire(back)))))
    return a, b


def test_file_store_survives_restart(tmp_path) -> None:
    store = FileStore(tmp_path / "tka")
    a, _, g = genesis(key(1), signer=priv(1), store=store)
    a = a.inform(store, a.updater(priv(1)).add_key(key(2)).finalize(store))
    a = _grow(a, store, 3)
    again = Authority.open(FileStore(tmp_path / "tka"))
    assert (again.head, again.state) == (a.head, a.state)
    assert again.oldest_ancestor.hash == g.hash
    (tmp_path / "tka" / "aums" / ".x.tmp").write_bytes(b"half")  # a crash mid-write: ignored
    Authority.open(FileStore(tmp_path / "tka"))


def test_file_store_refuses_corruption(tmp_path) -> None:
    store = FileStore(tmp_path / "tka")
    a, _, g = genesis(key(1), signer=priv(1), store=store)
    a = _grow(a, store, 2)
    path = tmp_path / "tka" / "aums" / str(a.head)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(StorageError, match="hashes to|not canonical|CBOR|encoding"):
        FileStore(tmp_path / "tka")
    path.write_bytes(b"\xff\xff")
    with pytest.raises(StorageError):
        FileStore(tmp_path / "tka")
    store2 = FileStore(tmp_path / "other")
    store2.clear()
    assert store2.heads() == []


def test_node_behind_catches_up() -> None:
    a, sa, g = genesis(key(1), signer=priv(1))
    sb = MemoryStore()
    b = Authority.bootstrap(sb, g)
    a = _grow(a, sa, 3)
    assert [x.hash for x in missing_aums(a, sa, make_offer(b, sb))] == [x.hash for x in a.log(sa, 3)][::-1]
    b, a = _sync(b, sb, a, sa)
    assert b.head == a.head


def test_offline_node_far_behind_catches_up_across_checkpoints() -> None:
    a, sa, g = genesis(key(1), signer=priv(1))
    sb = MemoryStore()
    b = Authority.bootstrap(sb, g)
    shared = a.updater(priv(1)).add_key(key(2)).finalize(sa)
    a = a.inform(sa, shared)
    b = b.inform(sb, shared)
    a = _grow(a, sa, 120)
    assert any(x.kind == AUMKind.CHECKPOINT for x in a.log(sa, 200))
    offer = make_offer(a, sa)
    assert len(offer.ancestors) > 3 and offer.ancestors[-1] == g.hash
    b, a = _sync(b, sb, a, sa)
    assert (b.head, b.state) == (a.head, a.state)


def test_diverged_nodes_converge_both_ways() -> None:
    a, sa, g = genesis(key(1), key(2), signer=priv(1))
    sb = MemoryStore()
    b = Authority.bootstrap(sb, g)
    a = _grow(a, sa, 2, signer=1)
    b = _grow(b, sb, 3, signer=2)
    assert a.head != b.head
    a, b = _sync(a, sa, b, sb)
    assert (a.head, a.state) == (b.head, b.state)
    # A third node syncing with either ends up in the same place.
    sc = MemoryStore()
    c = Authority.bootstrap(sc, g)
    c, _ = _sync(c, sc, b, sb)
    assert c.head == a.head


def test_up_to_date_sends_nothing() -> None:
    a, sa, g = genesis(key(1), signer=priv(1))
    assert missing_aums(a, sa, make_offer(a, sa)) == []


def test_unrelated_chains_have_no_intersection() -> None:
    a, sa, _ = genesis(key(1), signer=priv(1))
    b, sb, _ = genesis(key(2), signer=priv(2))
    with pytest.raises(NoIntersection):
        missing_aums(a, sa, make_offer(b, sb))


def test_relay_cannot_forge() -> None:
    a, sa, g = genesis(key(1), signer=priv(1))
    forged = priv(9).sign_aum(AUM(AUMKind.ADD_KEY, prev=g.hash, key=key(9)))
    before = sa.all_hashes()
    with pytest.raises(UnknownKey):
        apply_response(a, sa, SyncResponse(SyncOffer(forged.hash, (g.hash,)), (forged,)))
    assert sa.all_hashes() == before


def test_hostile_wire_input() -> None:
    with pytest.raises(DecodeError):
        SyncOffer.from_wire({"head": 5})
    with pytest.raises(DecodeError):
        SyncOffer.from_wire({"head": "AAAA", "ancestors": []})
    with pytest.raises(LimitExceeded):
        SyncOffer.from_wire({"head": "A" * 52, "ancestors": ["A" * 52] * 65})
    with pytest.raises(DecodeError):
        aums_from_wire(["!!!"])
    with pytest.raises(DecodeError):
        aums_from_wire("x")
    with pytest.raises(DecodeError):
        SyncResponse.from_wire([])


def test_sync_from_far_behind_fork_after_compaction() -> None:
    # Tailscale's TestSyncFromFarBehindFork: the node compacted its chain, then signed an update
    # with a low-vote key while the control plane went 800+ AUMs ahead with a high-vote key.
    import time

    from meshnode.tka import Key, KeyKind, State, ed25519_key

    losing, winning = priv(1), priv(2)
    state = State(disablement_values=(bytes(range(32)),),
                  keys=(ed25519_key(losing.public, 1), ed25519_key(winning.public, 2)))
    persistent_store = MemoryStore()
    node_store = MemoryStore(clock=lambda: time.time() - 15 * 86400)  # old enough to compact
    persistent, g = Authority.create(persistent_store, state, winning)
    node = Authority.bootstrap(node_store, g)
    seed_key = Key(KeyKind.ED25519, 1, b"\x01\x01\x01")

    def seed(a, store, count, signer, others=()):
        for i in range(count):
            b = a.updater(signer)
            b.add_key(seed_key) if not a.key_trusted(seed_key.key_id) else b.remove_key(seed_key.key_id)
            ups = b.finalize(store)
            a = a.inform(store, ups)
            others = [(o.inform(s, ups), s) for o, s in others]
        return a, others

    persistent, [(node, _)] = seed(persistent, persistent_store, 100, winning, [(node, node_store)])
    before = len(node_store.all_hashes())
    node = node.compact(node_store, now=time.time())
    assert len(node_store.all_hashes()) < before
    node_store.clock = time.time
    node, _ = seed(node, node_store, 1, losing)
    persistent, _ = seed(persistent, persistent_store,
                         len(node_store.all_hashes()) - len(persistent_store.all_hashes()) + 800, winning)
    missing_aums(node, node_store, make_offer(persistent, persistent_store))
    assert missing_aums(persistent, persistent_store, make_offer(node, node_store))
    node, persistent = _sync(node, node_store, persistent, persistent_store)
    assert node.head == persistent.head  # the high-vote chain wins on both
