"""Making updates (tka/builder.go): a batch of signed AUMs from the current head, with a checkpoint
added whenever the chain since the last one would reach CHECKPOINT_EVERY AUMs."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Mapping

from .aum import AUM, AUMKind
from .errors import InvalidAUM, LimitExceeded, StateError, UnknownKey
from .key import Key
from .limits import CHECKPOINT_EVERY, MAX_KEYS
from .signing import LockPrivateKey
from .store import ChainStore

if TYPE_CHECKING:
    from .authority import Authority


class UpdateBuilder:
    """Collects changes; `finalize` returns the AUMs to pass to Authority.inform on every node."""

    def __init__(self, authority: "Authority", signer: LockPrivateKey | None) -> None:
        self._a = authority
        self._signer = signer
        self._state = authority.state
        self._parent = bytes(authority.head)
        self._out: list[AUM] = []

    def _make(self, update: AUM) -> None:
        update = update.with_parent(self._parent)
        if self._signer is not None:
            update = self._signer.sign_aum(update)
        update.static_validate()
        self._state = self._state.apply_verified(update)
        self._parent = bytes(update.hash)
        self._out.append(update)

    def add_key(self, key: Key) -> "UpdateBuilder":
        if self._state.get_key(key.key_id) is not None:
            raise StateError(f"cannot add key tlpub:{key.key_id.hex()}: already exists")
        if len(self._state.keys or ()) >= MAX_KEYS:
            raise LimitExceeded(f"cannot add key tlpub:{key.key_id.hex()}: maximum number of keys reached")
        self._make(AUM(AUMKind.ADD_KEY, key=key))
        return self

    def remove_key(self, key_id: bytes) -> "UpdateBuilder":
        if self._state.get_key(key_id) is None:
            raise UnknownKey(f"key tlpub:{key_id.hex()} is not trusted")
        if len(self._state.keys or ()) == 1:
            raise StateError("cannot remove the last trusted key; disable the lock instead")
        self._make(AUM(AUMKind.REMOVE_KEY, key_id=key_id))
        return self

    def set_key_vote(self, key_id: bytes, votes: int) -> "UpdateBuilder":
        if self._state.get_key(key_id) is None:
            raise UnknownKey(f"key tlpub:{key_id.hex()} is not trusted")
        self._make(AUM(AUMKind.UPDATE_KEY, key_id=key_id, votes=votes))
        return self

    def set_key_meta(self, key_id: bytes, meta: Mapping[str, str]) -> "UpdateBuilder":
        if not meta:
            # An empty map is omitted on the wire, leaving an UpdateKey that every verifier refuses.
            raise InvalidAUM("key metadata update must set at least one entry")
        if self._state.get_key(key_id) is None:
            raise UnknownKey(f"key tlpub:{key_id.hex()} is not trusted")
        self._make(AUM(AUMKind.UPDATE_KEY, key_id=key_id, meta=dict(meta)))
        return self

    def no_op(self) -> "UpdateBuilder":
        self._make(AUM(AUMKind.NO_OP))
        return self

    def _checkpoint(self) -> None:
        state = self._a.state
        for update in self._out:
            state = state.apply_verified(update)
        self._make(AUM(AUMKind.CHECKPOINT, state=replace(state, last_aum_hash=None)))

    def finalize(self, store: ChainStore) -> list[AUM]:
        """The signed AUMs, adding a checkpoint when one is due (Finalize)."""
        need_checkpoint = True
        cursor = self._a.head
        for _ in range(len(self._out), CHECKPOINT_EVERY):
            aum = store.aum(cursor)
            if aum is None or aum.kind == AUMKind.CHECKPOINT or aum.parent is None:
                need_checkpoint = False
                break
            cursor = aum.parent
        if need_checkpoint:
            self._checkpoint()
        if self._out and self._out[0].parent != self._a.head:
            raise StateError(f"updates no longer apply to head: based on {self._out[0].parent} "
                             f"but head is {self._a.head}")
        return list(self._out)
