"""Node-key rotation (Tailscale's SigRotation / ResignNKS): the encoding of a rotation signature
checked against bytes assembled by hand from tka/sig.go's field numbers (Tailscale's own tests carry
no serialized rotation signature: they build them with random keys), `NodeLock.rotate`'s refusals,
and which rotation key `lock sign` and `lock init` name."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import nacl.signing
import pytest

from meshnode.node.lockcli import run_in_daemon
from meshnode.tka import MemoryStore, NodeKeyNotAuthorized, NodeKeySignature, SigKind
from meshnode.tka.cli_format import format_public
from meshnode.tka.errors import StateError
from meshnode.tka.nodelock import NodeLock
from meshnode.tka.nodesig import resign, sign_direct
from meshnode.tka.statedir import LockDir

from .tka_helpers import genesis, key, node_key, priv


def _b(raw: bytes) -> bytes:
    """A CBOR byte string (major type 2) of 32 or 64 bytes, as in the vectors below."""
    return bytes([0x58, len(raw)]) + raw


def test_rotation_signature_bytes_match_a_hand_assembled_vector() -> None:
    # Field numbers (tka/sig.go, `cbor:"N,keyasint"`): 1 SigKind, 2 Pubkey, 3 KeyID, 4 Signature,
    # 5 Nested, 6 WrappingPubkey; SigDirect = 1, SigRotation = 2; maps in ascending key order.
    signer, rot = nacl.signing.SigningKey(b"\x01" * 32), nacl.signing.SigningKey(b"\x02" * 32)
    nk1, nk2 = b"\x11" * 32, b"\x22" * 32
    kid, wrap = bytes(signer.verify_key), bytes(rot.verify_key)
    direct_body = [b"\x01\x01", b"\x02" + _b(nk1), b"\x03" + _b(kid)]
    direct_hash = hashlib.blake2s(b"\xa4" + b"".join(direct_body) + b"\x06" + _b(wrap), digest_size=32).digest()
    direct = (b"\xa5" + b"".join(direct_body) + b"\x04" + _b(signer.sign(direct_hash).signature)
              + b"\x06" + _b(wrap))
    rot_hash = hashlib.blake2s(b"\xa3\x01\x02\x02" + _b(nk2) + b"\x05" + direct, digest_size=32).digest()
    rotation = b"\xa4\x01\x02\x02" + _b(nk2) + b"\x04" + _b(rot.sign(rot_hash).signature) + b"\x05" + direct

    from meshnode.tka import LockPrivateKey
    ours_direct = sign_direct(LockPrivateKey(b"\x01" * 32), nk1, wrap).serialize()
    assert ours_direct == direct
    assert resign(LockPrivateKey(b"\x02" * 32), nk2, direct) == rotation
    assert resign(LockPrivateKey(b"\x02" * 32), nk1, direct) == direct   # same key: unchanged
    a, _, _ = genesis(key(1), signer=priv(1))
    got = a.node_key_authorized(nk2, rotation)
    assert got.kind == SigKind.ROTATION and got.prev_node_keys() == [nk1]


def test_node_lock_rotate_refusals() -> None:
    _, store, _ = genesis(key(1), signer=priv(1))
    me = priv(5)
    node = NodeLock(store, me)
    new = node.rotate(node_key(2), sign_direct(priv(1), node_key(1), me.public).serialize())
    assert NodeKeySignature.parse(new).kind == SigKind.ROTATION
    again = node.rotate(node_key(3), new)   # a chain of rotations
    assert NodeKeySignature.parse(again).prev_node_keys() == [node_key(2), node_key(1)]
    with pytest.raises(NodeKeyNotAuthorized, match=f"names {format_public(priv(6).public)}, not this node"):
        node.rotate(node_key(2), sign_direct(priv(1), node_key(1), priv(6).public).serialize())
    with pytest.raises(NodeKeyNotAuthorized, match="names no rotation key"):
        node.rotate(node_key(2), sign_direct(priv(1), node_key(1)).serialize())
    with pytest.raises(NodeKeyNotAuthorized, match="cannot be read"):
        node.rotate(node_key(2), b"\xa1\x01\x01junk")
    # A signature by a key the chain does not trust is not re-signed into something peers refuse.
    with pytest.raises(NodeKeyNotAuthorized, match="not trusted"):
        node.rotate(node_key(2), sign_direct(priv(9), node_key(1), me.public).serialize())
    with pytest.raises(StateError, match="not enabled"):
        NodeLock(MemoryStore(), me).rotate(node_key(2), new)


def test_lock_sign_names_the_nodes_lock_key_as_rotation_key(tmp_path: Path) -> None:
    me = format_public(LockDir(tmp_path).lock_key().public)
    assert run_in_daemon(tmp_path, "init", {"n": 1, "args": [me]}, {})[1] is None
    theirs = format_public(priv(8).public)
    extra = {"peers": [{"name": "n1", "node_key": base64.b64encode(node_key(1)).decode(), "lock_key": theirs}]}

    def signed(target: bytes, rotation_key: str | None = None) -> NodeKeySignature:
        params = {"target": "nodekey:" + target.hex()}
        if rotation_key:
            params["rotation_key"] = rotation_key
        out, err = run_in_daemon(tmp_path, "sign", params, extra)
        assert err is None, err
        return NodeKeySignature.parse(base64.b64decode(out.strip()))

    assert signed(node_key(1)).wrapping_pubkey == priv(8).public            # from the map
    assert signed(node_key(1), format_public(priv(9).public)).wrapping_pubkey == priv(9).public  # explicit wins
    assert signed(node_key(2)).wrapping_pubkey is None                       # unknown node: none


def test_lock_init_signs_trusted_peers_with_their_own_rotation_key(tmp_path: Path) -> None:
    me = format_public(LockDir(tmp_path).lock_key().public)
    theirs = format_public(priv(8).public)
    extra = {"peers": [{"name": "n1", "node_key": base64.b64encode(node_key(1)).decode(), "lock_key": theirs}]}
    out, err = run_in_daemon(tmp_path, "init", {"n": 1, "args": [me, theirs]}, extra)
    assert err is None and "Signed the node keys of: n1" in out
    sig = LockDir(tmp_path).outbox().signatures[base64.b64encode(node_key(1)).decode()]
    assert NodeKeySignature.parse(base64.b64decode(sig)).wrapping_pubkey == priv(8).public
