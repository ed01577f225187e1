"""Shared builders for the Tailnet Lock tests (deterministic keys, genesis states)."""

from __future__ import annotations

from meshnode.tka import AUM, Authority, Key, LockPrivateKey, MemoryStore, State, ed25519_key

DISABLEMENT = bytes(range(32))  # a well-formed disablement value (the KDF is exercised separately)


def priv(n: int) -> LockPrivateKey:
    return LockPrivateKey(bytes([n]) * 32)


def key(n: int, votes: int = 1) -> Key:
    return ed25519_key(priv(n).public, votes)


def genesis(*keys: Key, signer: LockPrivateKey, store: MemoryStore | None = None,
            state_ids: tuple[int, int] = (7, 9)) -> tuple[Authority, MemoryStore, AUM]:
    store = store if store is not None else MemoryStore()
    state = State(disablement_values=(DISABLEMENT,), keys=tuple(keys),
                  state_id1=state_ids[0], state_id2=state_ids[1])
    authority, g = Authority.create(store, state, signer)
    return authority, store, g


def node_key(n: int) -> bytes:
    return bytes([0xA0 + n % 16]) * 31 + bytes([n // 16])
