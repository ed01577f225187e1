"""The authority: bootstrap, fork resolution, verification of updates, limits, disablement."""

from __future__ import annotations

from dataclasses import replace

import pytest

from meshnode.tka import (AUM, AUMKind, Authority, InvalidAUM, InvalidSignature, LimitExceeded, MemoryStore,
                          ReplayedAUM, State, StateError, StorageError, UnknownKey, UnknownParent, disablement_kdf, ed25519_key)
from meshnode.tka.aum import Signature
from meshnode.tka.authority import compute_active_chain, compute_state_at, pick_next
from meshnode.tka.key import Key, KeyKind
from meshnode.tka.limits import MAX_DISABLEMENT_VALUES, MAX_KEYS

from .tka_helpers import DISABLEMENT, genesis, key, priv


def test_create_and_bootstrap_agree() -> None:
    a1, _, g = genesis(key(1, 2), signer=priv(1))
    a2 = Authority.bootstrap(MemoryStore(), g)
    assert a1.head == a2.head == g.hash
    assert a2.key_trusted(key(1).key_id) and not a2.key_trusted(key(2).key_id)


def test_bootstrap_refuses_non_empty_store_and_bad_genesis() -> None:
    _, store, g = genesis(key(1), signer=priv(1))
    with pytest.raises(StateError, match="tailchonk is not empty"):
        Authority.bootstrap(store, g)
    with pytest.raises(InvalidAUM, match="must be checkpoint"):
        Authority.bootstrap(MemoryStore(), AUM(AUMKind.NO_OP))
    with pytest.raises(InvalidAUM, match="missing state"):
        Authority.bootstrap(MemoryStore(), AUM(AUMKind.CHECKPOINT))
    with pytest.raises(InvalidAUM, match="at least one disablement"):
        Authority.bootstrap(MemoryStore(), AUM(AUMKind.CHECKPOINT, state=State()))
    # A genesis signed by a key it does not trust.
    forged = priv(2).sign_aum(replace(g, signatures=()))
    with pytest.raises(UnknownKey):
        Authority.bootstrap(MemoryStore(), forged)


def _noop_with_seed(parent: bytes, seed: int) -> AUM:
    # Tailscale's fakeAUM: a NoOp whose KeyID only changes its hash.
    return AUM(AUMKind.NO_OP, prev=parent, key_id=bytes([seed]))


def test_fork_resolution_lowest_hash() -> None:
    a, store, g = genesis(key(1), signer=priv(1))
    l1 = priv(1).sign_aum(_noop_with_seed(g.hash, 2))
    l2 = priv(1).sign_aum(_noop_with_seed(g.hash, 3))
    a = a.inform(store, [l1, l2])
    assert a.head == min(l1.hash, l2.hash)


def test_fork_resolution_signature_weight_beats_hash() -> None:
    a, store, g = genesis(key(1, 1), key(2, 2), signer=priv(1))
    # Find seeds so that the light AUM has the lower hash: only weight can make the heavy one win.
    for seed in range(50):
        light = priv(1).sign_aum(_noop_with_seed(g.hash, seed))
        heavy = priv(2).sign_aum(_noop_with_seed(g.hash, seed + 100))
        if light.hash < heavy.hash:
            break
    assert light.hash < heavy.hash
    for order in ([light, heavy], [heavy, light]):
        store2 = MemoryStore()
        a2 = Authority.bootstrap(store2, g).inform(store2, order)
        assert a2.head == heavy.hash


def test_fork_resolution_prefers_remove_key() -> None:
    a, store, g = genesis(key(1), key(2), signer=priv(1))
    remove = priv(1).sign_aum(AUM(AUMKind.REMOVE_KEY, prev=g.hash, key_id=key(2).key_id))
    for seed in range(50):
        noop = priv(1).sign_aum(_noop_with_seed(g.hash, seed))
        if noop.hash < remove.hash:
            break
    assert noop.hash < remove.hash
    a = a.inform(store, [noop, remove])
    assert a.head == remove.hash
    assert not a.key_trusted(key(2).key_id)
    assert pick_next(a.state, [noop, remove]) == remove


def test_open_picks_chain_through_last_active_ancestor() -> None:
    # Tailscale's TestOpenAuthority: two unrelated chains in one store; the hint decides.
    k = key(1, 2)
    store = MemoryStore()
    g1 = AUM(AUMKind.ADD_KEY, key=k)
    i1 = _noop_with_seed(g1.hash, 2)
    l1 = _noop_with_seed(i1.hash, 13)
    g2 = _noop_with_seed(b"", 8).with_parent(None)
    l4 = _noop_with_seed(g2.hash, 9)
    store.commit_verified([g1, i1, l1, g2, l4])
    with pytest.raises(StorageError, match="multiple distinct chains"):
        Authority.open(store)
    store.set_last_active_ancestor(i1.hash)
    a = Authority.open(store)
    assert a.head == l1.hash and a.key_trusted(k.key_id)


def test_compute_state_at_each_point() -> None:
    a, store, g = genesis(key(1), signer=priv(1))
    ups = a.updater(priv(1)).add_key(key(2)).no_op().finalize(store)
    a = a.inform(store, ups)
    assert compute_state_at(store, g.hash).get_key(key(2).key_id) is None
    for u in ups:
        st = compute_state_at(store, u.hash)
        assert st.last_aum_hash == u.hash and st.get_key(key(2).key_id) is not None
    with pytest.raises(UnknownParent):
        compute_state_at(store, bytes(32))


def test_inform_linear_and_fork_from_past() -> None:
    a, store, g = genesis(key(1), signer=priv(1))
    base = a
    ups = a.updater(priv(1)).add_key(key(2)).add_key(key(3)).finalize(store)
    a = a.inform(store, ups)
    assert a.head == ups[-1].hash and len(a.keys) == 3
    # A fork from genesis with the same weight: the lower hash wins, even if it discards two AUMs.
    fork = base.updater(priv(1)).no_op().finalize(MemoryStore())
    a2 = a.inform(store, fork)
    if ups[0].hash < fork[0].hash:
        assert a2.head == ups[-1].hash and len(a2.keys) == 3
    else:
        assert a2.head == fork[0].hash and len(a2.keys) == 1
    assert Authority.open(store).head == a2.head


def test_updates_are_all_or_nothing_with_precise_errors() -> None:
    a, store, g = genesis(key(1), signer=priv(1))
    good = a.updater(priv(1)).add_key(key(2)).finalize(store)[0]
    untrusted = priv(9).sign_aum(AUM(AUMKind.NO_OP, prev=good.hash))
    before = set(store.all_hashes())
    with pytest.raises(UnknownKey, match="update 1 .* not trusted"):
        a.inform(store, [good, untrusted])
    assert set(store.all_hashes()) == before  # the valid first update was not committed either

    bad_sig = good.with_signatures((Signature(good.signatures[0].key_id, bytes(64)),))
    with pytest.raises(InvalidSignature, match="invalid signature"):
        a.inform(store, [bad_sig])
    with pytest.raises(InvalidSignature, match="unsigned"):
        a.inform(store, [good.with_signatures(())])
    orphan = priv(1).sign_aum(AUM(AUMKind.NO_OP, prev=bytes(32)))
    with pytest.raises(UnknownParent, match="send its ancestors first"):
        a.inform(store, [orphan])
    with pytest.raises(InvalidAUM, match="missing parent"):
        a.inform(store, [priv(1).sign_aum(AUM(AUMKind.NO_OP))])
    a = a.inform(store, [good])
    with pytest.raises(ReplayedAUM, match="replayed"):
        a.inform(store, [good], allow_known=False)
    assert a.inform(store, [good]).head == a.head  # sync overlap: idempotent


def test_state_errors() -> None:
    a, store, g = genesis(key(1), signer=priv(1))
    last = priv(1).sign_aum(AUM(AUMKind.REMOVE_KEY, prev=g.hash, key_id=key(1).key_id))
    with pytest.raises(StateError, match="last key"):
        a.inform(store, [last])
    dup = priv(1).sign_aum(AUM(AUMKind.ADD_KEY, prev=g.hash, key=key(1)))
    with pytest.raises(StateError, match="already exists"):
        a.inform(store, [dup])
    wrong_ids = priv(1).sign_aum(AUM(AUMKind.CHECKPOINT, prev=g.hash,
                                     state=State(disablement_values=(DISABLEMENT,), keys=(key(1),))))
    with pytest.raises(StateError, match="stateID"):
        a.inform(store, [wrong_ids])
    with pytest.raises(UnknownKey):
        a.updater(priv(1)).remove_key(key(5).key_id)


def test_limits() -> None:
    many = tuple(ed25519_key(bytes([i % 256, i // 256]) + bytes(30)) for i in range(MAX_KEYS + 1))
    with pytest.raises(LimitExceeded, match="too many keys"):
        genesis(*many, signer=priv(1))
    with pytest.raises(LimitExceeded, match="too many disablement"):
        AUM(AUMKind.CHECKPOINT, state=State(
            disablement_values=tuple(bytes([i]) * 32 for i in range(MAX_DISABLEMENT_VALUES + 1)),
            keys=(key(1),))).static_validate()
    with pytest.raises(LimitExceeded, match="metadata too big"):
        ed25519_key(priv(1).public, meta={"k": "v" * 512}).static_validate()
    with pytest.raises(LimitExceeded, match="excessive key weight"):
        key(1, 4097).static_validate()
    with pytest.raises(InvalidAUM, match="non-zero"):
        key(1, 0).static_validate()
    # Exactly at the key limit, adding one more is refused by the builder and by every verifier.
    full = (key(1),) + many[: MAX_KEYS - 1]
    a, store, g = genesis(*full, signer=priv(1))
    with pytest.raises(LimitExceeded, match="maximum number of keys"):
        a.updater(priv(1)).add_key(key(2))
    over = priv(1).sign_aum(AUM(AUMKind.ADD_KEY, prev=g.hash, key=key(2)))
    with pytest.raises(LimitExceeded):
        a.inform(store, [over])


def test_chain_scan_limit() -> None:
    a, store, g = genesis(key(1), signer=priv(1))
    b = a.updater(priv(1))
    for _ in range(20):
        b.no_op()
    a = a.inform(store, b.finalize(store))
    with pytest.raises(LimitExceeded, match="iteration limit"):
        compute_active_chain(store, None, max_iter=10)
    with pytest.raises(LimitExceeded):
        a.inform(store, [g] * 2001)


def test_checkpoint_every_50_keeps_state() -> None:
    a, store, g = genesis(key(1), signer=priv(1))
    a = a.inform(store, a.updater(priv(1)).add_key(key(2)).finalize(store))
    kinds = []
    for _ in range(60):
        ups = a.updater(priv(1)).no_op().finalize(store)
        kinds += [u.kind for u in ups]
        a = a.inform(store, ups)
    assert AUMKind.CHECKPOINT in kinds
    assert a.key_trusted(key(2).key_id) and a.state_ids() == (7, 9)
    reopened = Authority.open(store)
    assert reopened.head == a.head and reopened.state == a.state


def test_disablement_secret() -> None:
    secret = b"\x01\x02\x03"
    a, _, _ = genesis(key(1), signer=priv(1))
    state = State(disablement_values=(disablement_kdf(secret),), keys=(key(1),))
    a, _ = Authority.create(MemoryStore(), state, priv(1))
    assert a.valid_disablement(secret)
    assert not a.valid_disablement(b"\x01\x02\x04")
    assert not a.valid_disablement(b"")


def test_unknown_future_kind_is_ignored_but_chained() -> None:
    a, store, g = genesis(key(1), signer=priv(1))
    future = priv(1).sign_aum(AUM(42, prev=g.hash))
    a = a.inform(store, [future])
    assert a.head == future.hash and a.key_trusted(key(1).key_id)


def test_unknown_key_kind_refused() -> None:
    with pytest.raises(InvalidAUM, match="key kind"):
        Key(KeyKind.INVALID, 1, priv(1).public).static_validate()
