"""Keys trusted by the authority (tka/key.go): an Ed25519 public key with its votes and metadata."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Mapping

from .canonical import Fields
from .errors import DecodeError, InvalidAUM, LimitExceeded
from .limits import ED25519_PUBLIC_SIZE, MAX_KEY_VOTES, MAX_META_BYTES


class KeyKind(enum.IntEnum):
    INVALID = 0
    ED25519 = 1  # Tailscale's Key25519

    def label(self) -> str:
        return "25519" if self is KeyKind.ED25519 else "invalid"


@dataclass(frozen=True)
class Key:
    """A key of the authority. `public` None and b"" differ on the wire (CBOR null against an empty
    byte string), exactly as a nil and an empty slice do in Go."""

    kind: int = KeyKind.INVALID
    votes: int = 0
    public: bytes | None = None
    meta: Mapping[str, str] | None = field(default=None, hash=False)

    @property
    def key_id(self) -> bytes:
        """The KeyID: for Ed25519 keys, the 32-byte public key itself."""
        if self.kind != KeyKind.ED25519:
            raise InvalidAUM(f"unknown key kind: {self.kind}")
        return bytes(self.public or b"")

    def static_validate(self) -> None:
        """Raise unless the key is well-formed (Key.StaticValidate)."""
        if self.votes > MAX_KEY_VOTES:
            raise LimitExceeded(f"excessive key weight: {self.votes} > {MAX_KEY_VOTES}")
        if self.votes == 0:
            raise InvalidAUM("key votes must be non-zero")
        meta_bytes = sum(len(k.encode()) + len(v.encode()) for k, v in (self.meta or {}).items())
        if meta_bytes > MAX_META_BYTES:
            raise LimitExceeded(f"key metadata too big ({meta_bytes} > {MAX_META_BYTES})")
        if self.kind != KeyKind.ED25519:
            raise InvalidAUM(f"unrecognized key kind: {self.kind}")

    def with_votes(self, votes: int) -> "Key":
        return Key(self.kind, votes, self.public, self.meta)

    def with_meta(self, meta: Mapping[str, str]) -> "Key":
        return Key(self.kind, self.votes, self.public, dict(meta))

    def to_cbor(self) -> dict[int, Any]:
        out: dict[int, Any] = {1: int(self.kind), 2: self.votes, 3: self.public}
        if self.meta:
            out[12] = dict(self.meta)
        return out

    @classmethod
    def from_cbor(cls, value: Any, what: str = "key") -> "Key":
        f = Fields(value, what)
        return cls(kind=f.uint(1, "kind", max_value=255), votes=f.uint(2, "votes"),
                   public=f.bytes_(3, "public"), meta=f.str_map(12, "meta") or None)


def ed25519_key(public: bytes, votes: int = 1, meta: Mapping[str, str] | None = None) -> Key:
    """A trusted Ed25519 key, as `lock init`/`lock add` create them (one vote unless told)."""
    if len(public) != ED25519_PUBLIC_SIZE:
        raise DecodeError(f"an Ed25519 public key is {ED25519_PUBLIC_SIZE} bytes, got {len(public)}")
    return Key(KeyKind.ED25519, votes, bytes(public), dict(meta) if meta else None)
