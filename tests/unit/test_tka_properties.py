"""Property tests: convergence of forked chains whatever the delivery order, and refusal of every
tampered byte."""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from meshnode.tka import (AUM, Authority, DecodeError, MemoryStore, NodeKeyNotAuthorized, NodeKeySignature,
                          TKAError)
from meshnode.tka.nodesig import sign_direct, sign_rotation

from .tka_helpers import genesis, key, node_key, priv

SIGNERS = [1, 2, 3, 4]
GENESIS_KEYS = (key(1, 1), key(2, 2), key(3, 1))

op = st.tuples(st.sampled_from(["add", "remove", "noop", "votes", "meta"]),
               st.sampled_from(SIGNERS), st.sampled_from(SIGNERS), st.integers(1, 5))


def _apply_ops(a: Authority, store: MemoryStore, ops) -> tuple[list[AUM], list[Authority]]:
    """Make each op an AUM signed by a key trusted at that point (skipping ops that cannot apply)."""
    out, history = [], []
    for kind, signer, target, votes in ops:
        if not a.key_trusted(priv(signer).public):
            continue
        b = a.updater(priv(signer))
        try:
            if kind == "add":
                b.add_key(key(target, votes))
            elif kind == "remove":
                b.remove_key(key(target).key_id)
            elif kind == "votes":
                b.set_key_vote(key(target).key_id, votes)
            elif kind == "meta":
                b.set_key_meta(key(target).key_id, {"name": f"k{votes}"})
            else:
                b.no_op()
        except TKAError:
            continue
        ups = b.finalize(store)
        a = a.inform(store, ups)
        out += ups
        history.append(a)
    return out, history


def _merge(data, first: list[AUM], second: list[AUM], second_after: int) -> list[AUM]:
    """A random interleaving keeping each fork's order; `second` may only start after
    `second_after` AUMs of `first` (its parent)."""
    i = j = 0
    out = []
    while i < len(first) or j < len(second):
        can_second = j < len(second) and i >= second_after
        take_first = i < len(first) and (not can_second or data.draw(st.booleans()))
        if take_first:
            out.append(first[i])
            i += 1
        else:
            out.append(second[j])
            j += 1
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops_a=st.lists(op, max_size=6), ops_b=st.lists(op, min_size=1, max_size=6), data=st.data())
def test_forks_converge_in_any_delivery_order(ops_a, ops_b, data) -> None:
    base, store_a, g = genesis(*GENESIS_KEYS, signer=priv(1))
    fork_a, _ = _apply_ops(base, store_a, ops_a)
    fork_at = data.draw(st.integers(0, len(fork_a)))
    # Fork B grows from the same genesis after the first `fork_at` AUMs of fork A.
    store_b = MemoryStore()
    b = Authority.bootstrap(store_b, g)
    if fork_at:
        b = b.inform(store_b, fork_a[:fork_at])
    fork_b, _ = _apply_ops(b, store_b, ops_b)
    hashes_a = {x.hash for x in fork_a}
    event("real fork" if any(x.hash not in hashes_a for x in fork_b) else "no fork")

    results = []
    for _node in range(3):
        order = _merge(data, fork_a, fork_b, fork_at)
        store = MemoryStore()
        a = Authority.bootstrap(store, g)
        pos = 0
        while pos < len(order):
            n = data.draw(st.integers(1, max(1, len(order) - pos)))
            a = a.inform(store, order[pos:pos + n])
            pos += n
        reopened = Authority.open(store)
        assert (reopened.head, reopened.state) == (a.head, a.state)
        results.append((a.head, a.state))
    assert all(r == results[0] for r in results)


def _chain() -> tuple[AUM, list[AUM]]:
    a, store, g = genesis(key(1), signer=priv(1))
    ups = a.updater(priv(1)).add_key(key(2, 3)).finalize(store)
    a = a.inform(store, ups)
    ups2 = a.updater(priv(2)).no_op().remove_key(key(1).key_id).finalize(store)
    return g, ups + ups2


G, UPDATES = _chain()


@settings(max_examples=300, deadline=None)
@given(which=st.integers(0, len(UPDATES)), pos=st.integers(0, 10_000), xor=st.integers(1, 255))
def test_any_tampered_aum_byte_is_refused(which, pos, xor) -> None:
    aums = [G] + UPDATES
    raw = bytearray(aums[which].serialized)
    raw[pos % len(raw)] ^= xor
    store = MemoryStore()
    try:
        tampered = AUM.parse(bytes(raw))
    except DecodeError:
        return
    try:
        if which == 0:
            Authority.bootstrap(store, tampered)
        else:
            a = Authority.bootstrap(store, G)
            if which > 1:
                a = a.inform(store, UPDATES[:which - 1])
            a.inform(store, [tampered])
    except TKAError:
        return
    raise AssertionError(f"tampered AUM accepted: byte {pos % len(raw)} ^ {xor:#x}")


_LOCK = genesis(key(1), signer=priv(1))[0]
_DIRECT = sign_direct(priv(1), node_key(1), rotation_key=priv(7).public)
_ROTATED = sign_rotation(priv(7), node_key(2), _DIRECT)


@settings(max_examples=300, deadline=None)
@given(rotated=st.booleans(), pos=st.integers(0, 10_000), xor=st.integers(1, 255))
def test_any_tampered_node_key_signature_byte_is_refused(rotated, pos, xor) -> None:
    sig, nk = (_ROTATED, node_key(2)) if rotated else (_DIRECT, node_key(1))
    raw = bytearray(sig.serialize())
    _LOCK.node_key_authorized(nk, bytes(raw))
    raw[pos % len(raw)] ^= xor
    try:
        _LOCK.node_key_authorized(nk, bytes(raw))
    except NodeKeyNotAuthorized:
        return
    raise AssertionError(f"tampered signature accepted: byte {pos % len(raw)} ^ {xor:#x}")


cbor_values = st.recursive(
    st.none() | st.integers(0, 2**64 - 1) | st.integers(-5, -1) | st.binary(max_size=40) | st.text(max_size=5)
    | st.booleans(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.integers(0, 30) | st.text(max_size=3), children, max_size=6),
    max_leaves=15)


aum_like = st.fixed_dictionaries(
    {1: st.integers(0, 6), 2: st.none() | st.binary(min_size=32, max_size=32)},
    optional={3: st.fixed_dictionaries({1: st.integers(0, 2), 2: st.integers(0, 5), 3: st.none() | st.binary(max_size=33)}),
              4: st.binary(max_size=33), 6: st.integers(0, 5), 7: st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
              23: st.lists(st.fixed_dictionaries({1: st.binary(max_size=32), 2: st.none() | st.binary(max_size=64)}), max_size=2),
              9: cbor_values})


@settings(max_examples=250, deadline=None)
@given(value=aum_like | st.dictionaries(st.integers(0, 30), cbor_values, max_size=6) | cbor_values)
def test_decoders_accept_only_what_they_reencode(value) -> None:
    import cbor2

    raw = cbor2.dumps(value, canonical=True)
    for parse, serialize, lock_check in (
        (AUM.parse, lambda a: a.serialized, None),
        (NodeKeySignature.parse, lambda s: s.serialize(), True),
    ):
        try:
            obj = parse(raw)
        except DecodeError:
            event(f"{parse.__qualname__}: refused")
            continue
        event(f"{parse.__qualname__}: accepted")
        assert serialize(obj) == raw
        if lock_check:
            try:
                _LOCK.node_key_authorized(node_key(1), raw)
            except NodeKeyNotAuthorized:
                pass


@settings(max_examples=400, deadline=None)
@given(raw=st.binary(max_size=200))
def test_random_bytes_only_raise_decode_errors(raw) -> None:
    for parse in (AUM.parse, NodeKeySignature.parse):
        try:
            parse(raw)
        except DecodeError:
            pass
