"""Authority state (tka/state.go): the trusted keys and disablement values at one point of the chain,
and how each kind of AUM changes it."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from argon2.low_level import Type, hash_secret_raw

from .canonical import Fields
from .errors import DecodeError, InvalidAUM, LimitExceeded, StateError, UnknownKey
from .key import Key
from .limits import DISABLEMENT_LENGTH, MAX_DISABLEMENT_VALUES, MAX_KEYS

if TYPE_CHECKING:
    from .aum import AUM

# DisablementKDF: Go's argon2.Key, which is Argon2i (version 0x13), time=4, memory=16 MiB, 4 lanes.
DISABLEMENT_SALT = b"tailscale network-lock disablement salt"
ARGON2_TIME = 4
ARGON2_MEMORY_KIB = 16 * 1024
ARGON2_THREADS = 4


def argon2i_key(secret: bytes, salt: bytes, time: int, memory_kib: int, threads: int, length: int) -> bytes:
    """Go's golang.org/x/crypto/argon2.Key: Argon2i v1.3 raw output."""
    return hash_secret_raw(secret, salt, time_cost=time, memory_cost=memory_kib, parallelism=threads,
                           hash_len=length, type=Type.I, version=19)


def disablement_kdf(secret: bytes) -> bytes:
    """The public disablement value stored in the state for a secret; it cannot be reversed."""
    return argon2i_key(secret, DISABLEMENT_SALT, ARGON2_TIME, ARGON2_MEMORY_KIB, ARGON2_THREADS,
                       DISABLEMENT_LENGTH)


@dataclass(frozen=True)
class State:
    """The authority's state. `last_aum_hash` is the hash of the AUM that produced it (None inside a
    checkpoint's own encoding). None and empty tuples differ on the wire (null against empty array)."""

    last_aum_hash: bytes | None = None
    disablement_values: tuple[bytes, ...] | None = None
    keys: tuple[Key, ...] | None = None
    state_id1: int = 0
    state_id2: int = 0

    # -- encoding ---------------------------------------------------------------------------------

    def to_cbor(self) -> dict[int, Any]:
        out: dict[int, Any] = {
            1: self.last_aum_hash,
            2: list(self.disablement_values) if self.disablement_values is not None else None,
            3: [k.to_cbor() for k in self.keys] if self.keys is not None else None,
        }
        if self.state_id1:
            out[4] = self.state_id1
        if self.state_id2:
            out[5] = self.state_id2
        return out

    @classmethod
    def from_cbor(cls, value: Any) -> "State":
        f = Fields(value, "state")
        last = f.bytes_(1, "last_aum_hash")
        if last is not None and len(last) != 32:
            # Go decodes this field into a [32]byte and fails on any other length.
            raise DecodeError(f"state.last_aum_hash: {len(last)} bytes, want 32")
        dvs = f.opt_list(2, "disablement_values")
        if dvs is not None and not all(isinstance(d, bytes) for d in dvs):
            raise DecodeError("state.disablement_values: expected byte strings")
        keys = f.opt_list(3, "keys")
        return cls(
            last_aum_hash=last,
            disablement_values=tuple(dvs) if dvs is not None else None,
            keys=tuple(Key.from_cbor(k, f"state.keys[{i}]") for i, k in enumerate(keys)) if keys is not None else None,
            state_id1=f.uint(4, "state_id1"),
            state_id2=f.uint(5, "state_id2"),
        )

    # -- queries ----------------------------------------------------------------------------------

    def get_key(self, key_id: bytes) -> Key | None:
        """The trusted key with this KeyID, or None."""
        for k in self.keys or ():
            if k.key_id == key_id:
                return k
        return None

    def check_disablement(self, secret: bytes) -> bool:
        """True if `secret` is one of the disablement secrets (compared in constant time)."""
        derived = disablement_kdf(secret)
        ok = False
        for candidate in self.disablement_values or ():
            ok |= hmac.compare_digest(derived, candidate)
        return ok

    def static_validate_checkpoint(self) -> None:
        """Raise unless the state may be carried by a checkpoint AUM (staticValidateCheckpoint)."""
        if self.last_aum_hash is not None:
            raise InvalidAUM("cannot specify a parent AUM")
        dvs = self.disablement_values or ()
        if not dvs:
            raise InvalidAUM("at least one disablement secret required")
        if len(dvs) > MAX_DISABLEMENT_VALUES:
            raise LimitExceeded(f"too many disablement values ({len(dvs)}, max {MAX_DISABLEMENT_VALUES})")
        for i, ds in enumerate(dvs):
            if len(ds) != DISABLEMENT_LENGTH:
                raise InvalidAUM(f"disablement[{i}]: invalid length (got {len(ds)}, want {DISABLEMENT_LENGTH})")
        if len(set(dvs)) != len(dvs):
            raise InvalidAUM("duplicate disablement values")
        keys = self.keys or ()
        if not keys:
            raise InvalidAUM("at least one key is required")
        if len(keys) > MAX_KEYS:
            raise LimitExceeded(f"too many keys ({len(keys)}, max {MAX_KEYS})")
        for i, k in enumerate(keys):
            try:
                k.static_validate()
            except InvalidAUM as exc:
                raise type(exc)(f"key[{i}]: {exc}") from None
        ids = [k.key_id for k in keys]
        if len(set(ids)) != len(ids):
            raise InvalidAUM("duplicate keys")

    # -- transitions ------------------------------------------------------------------------------

    def _after(self, update: "AUM", **changes: Any) -> "State":
        return replace(self, last_aum_hash=bytes(update.hash), **changes)

    def apply_verified(self, update: "AUM") -> "State":
        """The state after `update`, which must already be verified (applyVerifiedAUM)."""
        from .aum import AUMKind

        if self.last_aum_hash is not None and self.last_aum_hash != update.prev:
            raise StateError("parent AUMHash mismatch")
        kind = update.kind
        if kind == AUMKind.NO_OP:
            return self._after(update)
        if kind == AUMKind.CHECKPOINT:
            if update.state is None:
                raise StateError("missing checkpoint state")
            if update.state.state_id1 != self.state_id1 or update.state.state_id2 != self.state_id2:
                raise StateError("checkpointed state has an incorrect stateID")
            return replace(update.state, last_aum_hash=bytes(update.hash))
        if kind == AUMKind.ADD_KEY:
            if update.key is None:
                raise StateError("no key to add provided")
            if self.get_key(update.key.key_id) is not None:
                raise StateError(f"key tlpub:{update.key.key_id.hex()} already exists")
            keys = self.keys or ()
            if len(keys) >= MAX_KEYS:
                # Go enforces this only in its update builder; enforcing it here too means a chain
                # that grows past the limit is refused by every node instead of only by honest signers.
                raise LimitExceeded(f"cannot add key: maximum number of keys ({MAX_KEYS}) reached")
            return self._after(update, keys=keys + (update.key,))
        if kind == AUMKind.UPDATE_KEY:
            kid = update.key_id or b""
            k = self.get_key(kid)
            if k is None:
                raise UnknownKey(f"key tlpub:{kid.hex()} not found")
            if update.votes is not None:
                k = k.with_votes(update.votes)
            if update.meta is not None:
                k = k.with_meta(update.meta)
            try:
                k.static_validate()
            except InvalidAUM as exc:
                raise type(exc)(f"updated key fails validation: {exc}") from None
            return self._after(update, keys=tuple(k if x.key_id == kid else x for x in self.keys or ()))
        if kind == AUMKind.REMOVE_KEY:
            kid = update.key_id or b""
            keys = self.keys or ()
            idx = next((i for i, x in enumerate(keys) if x.key_id == kid), None)
            if idx is None:
                raise UnknownKey(f"key tlpub:{kid.hex()} not found")
            return self._after(update, keys=keys[:idx] + keys[idx + 1:])
        # A kind from a newer version: the compatibility contract says we may ignore it.
        return self._after(update)
