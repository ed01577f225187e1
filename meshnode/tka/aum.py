"""Authority Update Messages (tka/aum.go): the signed, hash-linked updates that make up the chain.

An AUM's identity is the BLAKE2s-256 digest of its canonical CBOR encoding; its signatures are over
the digest of the same encoding without the signatures (the "signing hash"). Field numbers, omission
rules and null handling match Go's struct tags so that the bytes, and hence the hashes, are
Tailscale's.
"""

from __future__ import annotations

import base64
import enum
import hashlib
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any, Mapping

from .canonical import Fields, decode, encode
from .errors import DecodeError, InvalidAUM
from .key import Key
from .limits import ED25519_SIGNATURE_SIZE

if TYPE_CHECKING:
    from .state import State

HASH_SIZE = 32


class AUMHash(bytes):
    """The 32-byte BLAKE2s digest of an AUM; str() is Tailscale's text form (base32, no padding)."""

    def __new__(cls, raw: bytes) -> "AUMHash":
        if len(raw) != HASH_SIZE:
            raise DecodeError(f"an AUM hash is {HASH_SIZE} bytes, got {len(raw)}")
        return super().__new__(cls, raw)

    def __str__(self) -> str:
        return base64.b32encode(self).decode().rstrip("=")

    def __repr__(self) -> str:
        return f"AUMHash({self})"

    @classmethod
    def from_text(cls, text: str) -> "AUMHash":
        """Parse the base32 text form (as in sync offers, file names and `lock log`)."""
        t = text.strip().upper()
        try:
            raw = base64.b32decode(t + "=" * (-len(t) % 8))
        except (ValueError, base64.binascii.Error) as exc:
            raise DecodeError(f"AUM hash {text!r}: not base32: {exc}") from None
        return cls(raw)


class AUMKind(enum.IntEnum):
    """AUM types; the numbers are on the wire, never reorder."""

    INVALID = 0
    ADD_KEY = 1
    REMOVE_KEY = 2
    NO_OP = 3
    UPDATE_KEY = 4
    CHECKPOINT = 5


def kind_label(kind: int) -> str:
    """Tailscale's name for an AUM kind (`lock log` prints it)."""
    names = {0: "invalid", 1: "add-key", 2: "remove-key", 3: "no-op", 4: "update-key", 5: "checkpoint"}
    return names.get(kind, f"AUM?<{kind}>")


@dataclass(frozen=True)
class Signature:
    """One signature over an AUM's signing hash, by the key named by key_id (tkatype.Signature)."""

    key_id: bytes | None = None
    signature: bytes | None = None

    def to_cbor(self) -> dict[int, Any]:
        return {1: self.key_id, 2: self.signature}

    @classmethod
    def from_cbor(cls, value: Any, what: str) -> "Signature":
        f = Fields(value, what)
        return cls(f.bytes_(1, "key_id"), f.bytes_(2, "signature"))


@dataclass(frozen=True)
class AUM:
    """An Authority Update Message. `prev` is the parent's hash (None only for a genesis AUM).
    Fields left None are omitted from the encoding, as Go's `omitempty` does."""

    kind: int
    prev: bytes | None = None
    key: Key | None = None
    key_id: bytes | None = None
    state: "State | None" = None
    votes: int | None = None
    meta: Mapping[str, str] | None = field(default=None, hash=False)
    signatures: tuple[Signature, ...] = ()

    # -- encoding ---------------------------------------------------------------------------------

    def to_cbor(self, with_signatures: bool = True) -> dict[int, Any]:
        out: dict[int, Any] = {1: int(self.kind), 2: self.prev}
        if self.key is not None:
            out[3] = self.key.to_cbor()
        if self.key_id:
            out[4] = self.key_id
        if self.state is not None:
            out[5] = self.state.to_cbor()
        if self.votes is not None:
            out[6] = self.votes
        if self.meta:
            out[7] = dict(self.meta)
        if with_signatures and self.signatures:
            out[23] = [s.to_cbor() for s in self.signatures]
        return out

    @cached_property
    def serialized(self) -> bytes:
        """The canonical CBOR bytes (Serialize)."""
        return encode(self.to_cbor())

    @cached_property
    def hash(self) -> AUMHash:
        """BLAKE2s-256 over the whole AUM, signatures included: its identity in the chain."""
        return AUMHash(hashlib.blake2s(self.serialized, digest_size=32).digest())

    @cached_property
    def sig_hash(self) -> bytes:
        """BLAKE2s-256 over the AUM without its signatures: what each signature signs."""
        return hashlib.blake2s(encode(self.to_cbor(with_signatures=False)), digest_size=32).digest()

    @classmethod
    def parse(cls, data: bytes) -> "AUM":
        """Decode canonical AUM bytes (Unserialize); raise DecodeError on malformed input.

        Stricter than Go, which re-encodes what it decoded: bytes that do not re-encode identically
        (an unknown field, a null where a field must be absent) are refused, so an AUM's hash is
        always the hash of the bytes received and no byte can change without changing it."""
        aum = cls.from_cbor(decode(data, "AUM"))
        if aum.serialized != bytes(data):
            raise DecodeError("AUM: not in Tailscale's encoding (unknown field, or null/empty value "
                              "where the field must be omitted)")
        return aum

    @classmethod
    def from_cbor(cls, value: Any) -> "AUM":
        from .state import State  # state.py imports this module

        f = Fields(value, "AUM")
        key = f.opt_map(3, "key")
        state = f.opt_map(5, "state")
        sigs = f.opt_list(23, "signatures") or []
        return cls(
            kind=f.uint(1, "kind", max_value=255),
            prev=f.bytes_(2, "prev"),
            key=Key.from_cbor(key, "AUM.key") if key is not None else None,
            key_id=f.bytes_(4, "key_id") or None,
            state=State.from_cbor(state) if state is not None else None,
            votes=f.opt_uint(6, "votes"),
            meta=f.str_map(7, "meta") or None,
            signatures=tuple(Signature.from_cbor(s, f"AUM.signatures[{i}]") for i, s in enumerate(sigs)),
        )

    # -- structure --------------------------------------------------------------------------------

    @property
    def parent(self) -> AUMHash | None:
        """The parent's hash, or None for a genesis AUM."""
        return AUMHash(self.prev) if self.prev else None

    def with_parent(self, parent: bytes | None) -> "AUM":
        return replace(self, prev=bytes(parent) if parent is not None else None, signatures=())

    def with_signatures(self, signatures: tuple[Signature, ...]) -> "AUM":
        return replace(self, signatures=tuple(signatures))

    def static_validate(self) -> None:
        """Raise InvalidAUM (or LimitExceeded) unless the AUM is well-formed for its kind."""
        if self.key is not None:
            self.key.static_validate()
        if self.prev is not None and len(self.prev) == 0:
            raise InvalidAUM("absent parent must be represented by a nil slice")
        if self.prev is not None and len(self.prev) != HASH_SIZE:
            # Not in Go (which would silently truncate or pad when copying); a parent of any other
            # length can never match a hash.
            raise InvalidAUM(f"parent hash is {len(self.prev)} bytes, want {HASH_SIZE}")
        for i, sig in enumerate(self.signatures):
            if len(sig.key_id or b"") != 32 or len(sig.signature or b"") != ED25519_SIGNATURE_SIZE:
                raise InvalidAUM(f"signature {i} has missing keyID or malformed signature")
        if self.state is not None:
            try:
                self.state.static_validate_checkpoint()
            except InvalidAUM as exc:
                raise type(exc)(f"checkpoint state: {exc}") from None
        k = self.kind
        if k == AUMKind.ADD_KEY:
            if self.key is None:
                raise InvalidAUM("AddKey AUMs must contain a key")
            if self.key_id is not None or self.state is not None or self.votes is not None or self.meta is not None:
                raise InvalidAUM("AddKey AUMs may only specify a Key")
        elif k == AUMKind.REMOVE_KEY:
            if not self.key_id:
                raise InvalidAUM("RemoveKey AUMs must specify a key ID")
            if self.key is not None or self.state is not None or self.votes is not None or self.meta is not None:
                raise InvalidAUM("RemoveKey AUMs may only specify a KeyID")
        elif k == AUMKind.UPDATE_KEY:
            if not self.key_id:
                raise InvalidAUM("UpdateKey AUMs must specify a key ID")
            if self.meta is None and self.votes is None:
                raise InvalidAUM("UpdateKey AUMs must contain an update to votes or key metadata")
            if self.key is not None or self.state is not None:
                raise InvalidAUM("UpdateKey AUMs may only specify KeyID, Votes, and Meta")
        elif k == AUMKind.CHECKPOINT:
            if self.state is None:
                raise InvalidAUM("Checkpoint AUMs must specify the state")
            if self.key_id is not None or self.key is not None or self.votes is not None or self.meta is not None:
                raise InvalidAUM("Checkpoint AUMs may only specify State")
        # NoOp and kinds from future versions carry no constraint: old clients must ignore them.

    def weight(self, state: "State") -> int:
        """Sum of the votes of the distinct trusted keys that signed (signatures must be verified)."""
        seen: set[bytes] = set()
        total = 0
        for sig in self.signatures:
            kid = bytes(sig.key_id or b"")
            if kid in seen:
                continue
            key = state.get_key(kid)
            if key is None:
                continue  # unknown keys do not count
            seen.add(kid)
            total += key.votes
        return total
