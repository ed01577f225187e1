"""Node-key signatures (direct, rotation, credential) and the node-side peer filter."""

from __future__ import annotations

import base64
from dataclasses import dataclass, replace

import pytest

from meshnode.tka import DecodeError, NodeKeyNotAuthorized, NodeKeySignature, SigKind
from meshnode.tka.enforce import LockoutReason, filter_peers, self_locked_out
from meshnode.tka.limits import MAX_NESTED_LEVELS
from meshnode.tka.nodesig import (resign, sign_by_credential, sign_credential, sign_direct,
                                  sign_rotation, unwrap_authkey, wrap_authkey)

from .tka_helpers import genesis, key, node_key, priv


@pytest.fixture()
def lock():  # authority trusting key 1 (2 votes)
    a, store, _ = genesis(key(1, 2), signer=priv(1))
    return a


def test_direct(lock) -> None:
    sig = sign_direct(priv(1), node_key(1)).serialize()
    assert lock.node_key_authorized(node_key(1), sig).kind == SigKind.DIRECT
    with pytest.raises(NodeKeyNotAuthorized, match="does not authorize nodeKey"):
        lock.node_key_authorized(node_key(2), sig)
    with pytest.raises(NodeKeyNotAuthorized, match="not trusted"):
        lock.node_key_authorized(node_key(1), sign_direct(priv(2), node_key(1)).serialize())
    forged = replace(sign_direct(priv(2), node_key(1)), key_id=priv(1).public).serialize()
    with pytest.raises(NodeKeyNotAuthorized, match="invalid signature"):
        lock.node_key_authorized(node_key(1), forged)


def test_rotation(lock) -> None:
    rot = priv(7)
    first = sign_direct(priv(1), node_key(1), rotation_key=rot.public)
    second = sign_rotation(rot, node_key(2), first)
    assert lock.node_key_authorized(node_key(2), second.serialize()).prev_node_keys() == [node_key(1)]
    # Signed by anyone but the named rotation key: refused.
    with pytest.raises(NodeKeyNotAuthorized, match="invalid signature"):
        lock.node_key_authorized(node_key(2), sign_rotation(priv(8), node_key(2), first).serialize())
    # A tampered inner signature breaks the whole chain.
    bad_inner = replace(first, signature=bytes(64))
    with pytest.raises(NodeKeyNotAuthorized, match="nested"):
        lock.node_key_authorized(node_key(2), sign_rotation(rot, node_key(2), bad_inner).serialize())
    # A direct signature without a rotation key cannot be rotated.
    plain = sign_direct(priv(1), node_key(1))
    with pytest.raises(NodeKeyNotAuthorized, match="missing rotation key"):
        lock.node_key_authorized(node_key(2), sign_rotation(rot, node_key(2), plain).serialize())


def test_rotation_nesting_up_to_decoder_limit(lock) -> None:
    rot = priv(7)
    sig = sign_direct(priv(1), node_key(0), rotation_key=rot.public)
    for i in range(1, MAX_NESTED_LEVELS):
        sig = sign_rotation(rot, node_key(i), sig)
    lock.node_key_authorized(node_key(MAX_NESTED_LEVELS - 1), sig.serialize())
    deeper = sign_rotation(rot, node_key(99), sig)
    with pytest.raises(NodeKeyNotAuthorized, match="nested deeper"):
        lock.node_key_authorized(node_key(99), deeper.serialize())


def test_resign_trims_long_chains(lock) -> None:
    rot = priv(7)
    sig = sign_direct(priv(1), node_key(0), rotation_key=rot.public).serialize()
    for i in range(1, 20):
        sig = resign(rot, node_key(i), sig)
        decoded = lock.node_key_authorized(node_key(i), sig)
        assert len(decoded.prev_node_keys()) == min(i, 15)
    assert resign(rot, node_key(19), sig) == sig  # same node key: unchanged


def test_credential_and_wrapped_authkey(lock) -> None:
    delegate = priv(5)
    cred = sign_credential(priv(1), delegate.public)
    with pytest.raises(NodeKeyNotAuthorized, match="credential signatures cannot authorize"):
        lock.node_key_authorized(node_key(1), cred.serialize())
    wrapped = unwrap_authkey(wrap_authkey("mk-auth-123", cred, delegate))
    assert wrapped is not None and wrapped.authkey == "mk-auth-123"
    sig = sign_by_credential(wrapped, node_key(3)).serialize()
    assert lock.node_key_authorized(node_key(3), sig).kind == SigKind.ROTATION
    with pytest.raises(NodeKeyNotAuthorized):
        lock.node_key_authorized(node_key(4), sig)
    with pytest.raises(DecodeError):
        unwrap_authkey("mk-auth-123--TLnotbase64!-x")
    with pytest.raises(DecodeError, match="delimiter"):
        unwrap_authkey("mk-auth-123--TLabc")


def test_garbage_signature_blobs(lock) -> None:
    for blob in (b"", b"\x00", b"\xa1\x01\x01", b"\xff" * 40, sign_direct(priv(1), node_key(1)).serialize()[:-1]):
        with pytest.raises(NodeKeyNotAuthorized):
            lock.node_key_authorized(node_key(1), blob)


@dataclass(frozen=True)
class Peer:
    name: str
    node_key: str
    key_signature: str | None


def _peer(name: str, nk: bytes, sig: NodeKeySignature | bytes | None) -> Peer:
    blob = sig.serialize() if isinstance(sig, NodeKeySignature) else sig
    return Peer(name, base64.b64encode(nk).decode(), base64.b64encode(blob).decode() if blob else None)


def _filter(lock, peers):
    return filter_peers(lock, peers, node_key=lambda p: p.node_key, signature=lambda p: p.key_signature)


def test_filter_peers_reasons_and_order(lock) -> None:
    rot = priv(7)
    first = sign_direct(priv(1), node_key(1), rotation_key=rot.public)
    peers = [
        _peer("signed", node_key(0), sign_direct(priv(1), node_key(0))),
        _peer("unsigned", node_key(2), None),
        _peer("untrusted", node_key(3), sign_direct(priv(9), node_key(3))),
        _peer("old-key", node_key(1), first),
        _peer("garbage", node_key(4), b"\x01\x02"),
        Peer("bad-key", "nope", None),
        _peer("rotated", node_key(5), sign_rotation(rot, node_key(5), first)),
    ]
    r = _filter(lock.state, peers)
    assert [p.name for p in r.admitted] == ["signed", "rotated"]
    reasons = {x.peer.name: x.reason for x in r.locked_out}
    assert reasons == {"unsigned": LockoutReason.NO_SIGNATURE, "untrusted": LockoutReason.INVALID_SIGNATURE,
                       "old-key": LockoutReason.ROTATED_AWAY, "garbage": LockoutReason.INVALID_SIGNATURE,
                       "bad-key": LockoutReason.BAD_NODE_KEY}
    assert [x.peer.name for x in r.locked_out] == ["unsigned", "untrusted", "old-key", "garbage", "bad-key"]
    assert _filter(None, peers).admitted == tuple(peers)


def test_filter_peers_clones_and_shared_auth_keys(lock) -> None:
    rot = priv(7)
    first = sign_direct(priv(1), node_key(1), rotation_key=rot.public)
    clones = [_peer("a", node_key(2), sign_rotation(rot, node_key(2), first)),
              _peer("b", node_key(3), sign_rotation(rot, node_key(3), first))]
    r = _filter(lock.state, clones)
    assert r.admitted == () and {x.reason for x in r.locked_out} == {LockoutReason.ROTATED_AWAY}
    # One reusable pre-signed auth key brings up many nodes: all admitted.
    wrapped = unwrap_authkey(wrap_authkey("k", sign_credential(priv(1), priv(5).public), priv(5)))
    fleet = [_peer(f"n{i}", node_key(i), sign_by_credential(wrapped, node_key(i))) for i in range(3)]
    assert len(_filter(lock.state, fleet).admitted) == 3


def test_removing_the_signing_key_locks_its_nodes_out(lock) -> None:
    a, store, _ = genesis(key(1), key(2), signer=priv(1))
    peers = [_peer("by1", node_key(1), sign_direct(priv(1), node_key(1))),
             _peer("by2", node_key(2), sign_direct(priv(2), node_key(2)))]
    assert len(_filter(a.state, peers).admitted) == 2
    a = a.inform(store, a.updater(priv(1)).remove_key(key(2).key_id).finalize(store))
    r = _filter(a.state, peers)
    assert [p.name for p in r.admitted] == ["by1"]
    assert "not trusted" in r.locked_out[0].detail


def test_self_locked_out(lock) -> None:
    nk = base64.b64encode(node_key(1)).decode()
    assert self_locked_out(None, nk, None) is None
    assert "not signed" in self_locked_out(lock.state, nk, None)
    good = base64.b64encode(sign_direct(priv(1), node_key(1)).serialize()).decode()
    assert self_locked_out(lock.state, nk, good) is None
    assert "not valid" in self_locked_out(lock.state, base64.b64encode(node_key(2)).decode(), good)


def test_verify_cache_follows_the_lock_state(lock) -> None:
    from meshnode.tka.enforce import VerifyCache

    a, store, _ = genesis(key(1), key(2), signer=priv(1))
    cache = VerifyCache(max_entries=2)
    peers = [_peer(f"p{i}", node_key(i), sign_direct(priv(2), node_key(i))) for i in range(3)]
    peers.append(_peer("bad", node_key(9), sign_direct(priv(9), node_key(9))))
    for _ in range(2):
        r = filter_peers(a.state, peers, node_key=lambda p: p.node_key, signature=lambda p: p.key_signature,
                         cache=cache)
        assert [p.name for p in r.admitted] == ["p0", "p1", "p2"]
    # Removing key 2 changes the state: cached verdicts must not survive it.
    a = a.inform(store, a.updater(priv(1)).remove_key(key(2).key_id).finalize(store))
    r = filter_peers(a.state, peers, node_key=lambda p: p.node_key, signature=lambda p: p.key_signature, cache=cache)
    assert r.admitted == ()
