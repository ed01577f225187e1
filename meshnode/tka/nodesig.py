"""Node-key signatures (tka/sig.go): how a trusted key vouches for a node key.

Three shapes, all canonical CBOR:
- direct: a trusted key signs the node key (optionally naming a rotation key, `wrapping_pubkey`);
- rotation: the rotation key named inside a nested signature signs a new node key, so a node can
  change its node key without a trusted signer being online;
- credential: a trusted key delegates to a one-off key (pre-signed auth keys); it only authorizes a
  node key once wrapped in a rotation signature made with that one-off key.
"""

from __future__ import annotations

import base64
import enum
import hashlib
from dataclasses import dataclass, replace
from typing import Any

from .canonical import Fields, decode, encode
from .errors import DecodeError, InvalidSignature, NodeKeyNotAuthorized, UnknownKey
from .key import Key, KeyKind
from .limits import ED25519_PUBLIC_SIZE
from .signing import LockPrivateKey, verify
from .state import State

NODE_KEY_SIZE = 32
MAX_PREV_KEYS = 15  # a rotation chain longer than this is re-rooted (maybeTrimRotationSignatureChain)


class SigKind(enum.IntEnum):
    INVALID = 0
    DIRECT = 1
    ROTATION = 2
    CREDENTIAL = 3

    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class NodeKeySignature:
    """A signature authorizing a node key (NodeKeySignature); None fields are omitted on the wire."""

    kind: int
    pubkey: bytes | None = None
    key_id: bytes | None = None
    signature: bytes | None = None
    nested: "NodeKeySignature | None" = None
    wrapping_pubkey: bytes | None = None

    def to_cbor(self, with_signature: bool = True) -> dict[int, Any]:
        out: dict[int, Any] = {1: int(self.kind)}
        if self.pubkey:
            out[2] = self.pubkey
        if self.key_id:
            out[3] = self.key_id
        if with_signature and self.signature:
            out[4] = self.signature
        if self.nested is not None:
            out[5] = self.nested.to_cbor()
        if self.wrapping_pubkey:
            out[6] = self.wrapping_pubkey
        return out

    def serialize(self) -> bytes:
        return encode(self.to_cbor())

    @property
    def sig_hash(self) -> bytes:
        """BLAKE2s-256 of the encoding without the outer signature (nested signatures included)."""
        return hashlib.blake2s(encode(self.to_cbor(with_signature=False)), digest_size=32).digest()

    @classmethod
    def parse(cls, data: bytes) -> "NodeKeySignature":
        """Decode a serialized signature; like AUM.parse, bytes must re-encode identically."""
        sig = cls.from_cbor(decode(data, "node-key signature"))
        if sig.serialize() != bytes(data):
            raise DecodeError("node-key signature: not in Tailscale's encoding (unknown field, or "
                              "empty value where the field must be omitted)")
        return sig

    @classmethod
    def from_cbor(cls, value: Any, what: str = "node-key signature") -> "NodeKeySignature":
        f = Fields(value, what)
        nested = f.opt_map(5, "nested")
        return cls(
            kind=f.uint(1, "kind", max_value=255),
            pubkey=f.bytes_(2, "pubkey") or None,
            key_id=f.bytes_(3, "key_id") or None,
            signature=f.bytes_(4, "signature") or None,
            nested=cls.from_cbor(nested, what + ".nested") if nested is not None else None,
            wrapping_pubkey=f.bytes_(6, "wrapping_pubkey") or None,
        )

    # -- structure --------------------------------------------------------------------------------

    def wrapping_public(self) -> bytes | None:
        """The key that must sign a signature embedding this one (rotation key), if any."""
        if self.wrapping_pubkey:
            return self.wrapping_pubkey
        if self.kind == SigKind.ROTATION and self.nested is not None:
            return self.nested.wrapping_public()
        return None

    def authorizing_key_id(self) -> bytes:
        """The KeyID of the trusted key at the root of this signature (unverified)."""
        if self.kind in (SigKind.DIRECT, SigKind.CREDENTIAL):
            if not self.key_id:
                raise InvalidSignature("invalid signature: no keyID present")
            return self.key_id
        if self.kind == SigKind.ROTATION:
            if self.nested is None:
                raise InvalidSignature("invalid signature: rotation signature missing nested signature")
            return self.nested.authorizing_key_id()
        raise InvalidSignature(f"unhandled signature type: {self.kind}")

    def prev_node_keys(self) -> list[bytes]:
        """Node keys rotated out, newest first (RotationDetails.PrevNodeKeys)."""
        out: list[bytes] = []
        nested = self.nested if self.kind == SigKind.ROTATION else None
        while nested is not None:
            if nested.pubkey:
                out.append(nested.pubkey)
            if nested.kind != SigKind.ROTATION:
                break
            nested = nested.nested
        return out

    def verify(self, node_key: bytes | None, trusted: Key) -> None:
        """Raise InvalidSignature unless this signature, made under `trusted`, authorizes `node_key`
        (verifySignature). Credential signatures certify a key, not a node key."""
        if self.kind != SigKind.CREDENTIAL and node_key != self.pubkey:
            raise InvalidSignature("signature does not authorize nodeKey")
        if self.kind == SigKind.ROTATION:
            if self.nested is None:
                raise InvalidSignature("nested signatures must nest a signature")
            rotation_key = self.nested.wrapping_public()
            if rotation_key is None:
                raise InvalidSignature("missing rotation key")
            if len(rotation_key) != ED25519_PUBLIC_SIZE:
                raise InvalidSignature(f"bad rotation key length: {len(rotation_key)}")
            if not verify(rotation_key, self.sig_hash, self.signature):
                raise InvalidSignature("invalid signature")
            nested_key = None if self.nested.kind == SigKind.CREDENTIAL else self.nested.pubkey
            if self.nested.kind != SigKind.CREDENTIAL and len(self.nested.pubkey or b"") != NODE_KEY_SIZE:
                raise InvalidSignature("nested pubkey: not a node key")
            try:
                self.nested.verify(nested_key, trusted)
            except InvalidSignature as exc:
                raise InvalidSignature(f"nested: {exc}") from None
            return
        if self.kind in (SigKind.DIRECT, SigKind.CREDENTIAL):
            if self.nested is not None:
                raise InvalidSignature(f"invalid signature: signatures of type {SigKind(self.kind).label()} "
                                       "cannot nest another signature")
            if trusted.kind != KeyKind.ED25519:
                raise InvalidSignature(f"unhandled key type: {trusted.kind}")
            if len(trusted.public or b"") != ED25519_PUBLIC_SIZE:
                raise InvalidSignature(f"ed25519 key has wrong length: {len(trusted.public or b'')}")
            if not verify(trusted.public or b"", self.sig_hash, self.signature):
                raise InvalidSignature("invalid signature")
            return
        raise InvalidSignature(f"unhandled signature type: {self.kind}")


def node_key_authorized(state: State, node_key: bytes, blob: bytes) -> NodeKeySignature:
    """Check that `blob` (a serialized signature) authorizes `node_key` under `state`; return the
    decoded signature. Raises NodeKeyNotAuthorized, with the reason, otherwise."""
    try:
        sig = NodeKeySignature.parse(blob)
    except DecodeError as exc:
        raise NodeKeyNotAuthorized(f"unserialize: {exc}") from None
    if sig.kind == SigKind.CREDENTIAL:
        raise NodeKeyNotAuthorized("credential signatures cannot authorize nodes on their own")
    try:
        kid = sig.authorizing_key_id()
        key = state.get_key(kid)
        if key is None:
            raise UnknownKey(f"key: signing key tlpub:{kid.hex()} is not trusted")
        sig.verify(node_key, key)
    except InvalidSignature as exc:
        raise NodeKeyNotAuthorized(str(exc)) from None
    return sig


# -- making signatures ----------------------------------------------------------------------------

def sign_direct(signer: LockPrivateKey, node_key: bytes, rotation_key: bytes | None = None) -> NodeKeySignature:
    """A direct signature of `node_key` by a trusted key (`lock sign NODEKEY [ROTATION-KEY]`)."""
    if len(node_key) != NODE_KEY_SIZE:
        raise DecodeError(f"a node key is {NODE_KEY_SIZE} bytes, got {len(node_key)}")
    sig = NodeKeySignature(SigKind.DIRECT, pubkey=node_key, key_id=signer.public,
                           wrapping_pubkey=rotation_key or None)
    return replace(sig, signature=signer.sign(sig.sig_hash))


def sign_credential(signer: LockPrivateKey, delegate_public: bytes) -> NodeKeySignature:
    """A credential delegating to `delegate_public` (pre-signed auth keys)."""
    sig = NodeKeySignature(SigKind.CREDENTIAL, key_id=signer.public, wrapping_pubkey=delegate_public)
    return replace(sig, signature=signer.sign(sig.sig_hash))


def sign_rotation(rotation_key: LockPrivateKey, node_key: bytes, nested: NodeKeySignature) -> NodeKeySignature:
    """A rotation signature: `rotation_key` (named in `nested`) vouches for the new `node_key`."""
    sig = NodeKeySignature(SigKind.ROTATION, pubkey=node_key, nested=nested)
    return replace(sig, signature=rotation_key.sign(sig.sig_hash))


def resign(rotation_key: LockPrivateKey, node_key: bytes, old: bytes) -> bytes:
    """Re-sign a node's signature for its new node key (ResignNKS), trimming long rotation chains."""
    old_sig = NodeKeySignature.parse(old)
    if old_sig.pubkey == node_key:
        return old
    nested = _trim_rotation_chain(old_sig, rotation_key)
    return sign_rotation(rotation_key, node_key, nested).serialize()


def _trim_rotation_chain(sig: NodeKeySignature, priv: LockPrivateKey) -> NodeKeySignature:
    if sig.kind != SigKind.ROTATION:
        return sig
    prev = [sig.pubkey or b""] + sig.prev_node_keys()
    if len(prev) <= MAX_PREV_KEYS:
        return sig
    root = sig
    while root.kind == SigKind.ROTATION and root.nested is not None:
        root = root.nested
    result = root
    for i in range(MAX_PREV_KEYS - 2, -1, -1):
        result = sign_rotation(priv, prev[i], result)
    return result


# -- pre-signed (wrapped) auth keys ---------------------------------------------------------------

def wrap_authkey(authkey: str, credential: NodeKeySignature, delegate: LockPrivateKey) -> str:
    """`AUTHKEY--TL<credential>-<private>`, Tailscale's wrapped auth key (raw std base64). The private
    part is Go's 64-byte ed25519 private key (seed then public)."""
    sig = base64.b64encode(credential.serialize()).decode().rstrip("=")
    priv = base64.b64encode(delegate.seed + delegate.public).decode().rstrip("=")
    return f"{authkey}--TL{sig}-{priv}"


@dataclass(frozen=True)
class WrappedAuthkey:
    authkey: str
    credential: NodeKeySignature
    delegate: LockPrivateKey


def unwrap_authkey(text: str) -> WrappedAuthkey | None:
    """Split a wrapped auth key (DecodeWrappedAuthkey); None if `text` is a plain auth key.
    Raises DecodeError for a key that has the wrapping marker but is malformed."""
    authkey, sep, suffix = text.partition("--TL")
    if not sep:
        return None
    sig_b64, sep, priv_b64 = suffix.partition("-")
    if not sep:
        raise DecodeError("wrapped auth key: did not find delimiter")
    try:
        raw_sig = base64.b64decode(sig_b64 + "=" * (-len(sig_b64) % 4), validate=True)
        raw_priv = base64.b64decode(priv_b64 + "=" * (-len(priv_b64) % 4), validate=True)
    except ValueError as exc:
        raise DecodeError(f"wrapped auth key: {exc}") from None
    credential = NodeKeySignature.parse(raw_sig)
    if len(raw_priv) != 64:
        raise DecodeError(f"wrapped auth key: private key is {len(raw_priv)} bytes, want 64")
    delegate = LockPrivateKey(raw_priv[:32])
    if delegate.public != raw_priv[32:]:
        raise DecodeError("wrapped auth key: private key does not match its public half")
    return WrappedAuthkey(authkey, credential, delegate)


def sign_by_credential(wrapped: WrappedAuthkey, node_key: bytes) -> NodeKeySignature:
    """The signature a node joining with a wrapped auth key presents for its node key."""
    if wrapped.credential.kind != SigKind.CREDENTIAL:
        raise InvalidSignature(f"wrapped signature must be a credential, got {wrapped.credential.kind}")
    return sign_rotation(wrapped.delegate, node_key, wrapped.credential)
