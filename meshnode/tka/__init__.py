"""Tailnet Lock: Tailscale's Tailnet Key Authority (TKA), sans I/O.

A chain of signed Authority Update Messages (AUMs) decides which Ed25519 keys are trusted; trusted
keys sign node keys; every node checks its peers' node-key signatures itself, so a control server
cannot add a node that the lock's signers did not approve. Byte-compatible with Tailscale's `tka`
package (canonical CBOR, BLAKE2s-256, Ed25519, Argon2i disablement values).
"""

from .aum import AUM, AUMHash, AUMKind, Signature
from .authority import Authority, compute_state_at, pick_next, verify_aum
from .errors import (DecodeError, InvalidAUM, InvalidSignature, LimitExceeded, NodeKeyNotAuthorized,
                     NoIntersection, ReplayedAUM, StateError, StorageError, TKAError, UnknownKey,
                     UnknownParent)
from .key import Key, KeyKind, ed25519_key
from .nodesig import NodeKeySignature, SigKind
from .signing import LockPrivateKey
from .state import State, disablement_kdf
from .store import ChainStore, FileStore, MemoryStore

__all__ = [
    "AUM", "AUMHash", "AUMKind", "Authority", "ChainStore", "DecodeError", "FileStore", "InvalidAUM",
    "InvalidSignature", "Key", "KeyKind", "LimitExceeded", "LockPrivateKey", "MemoryStore",
    "NoIntersection", "NodeKeyNotAuthorized", "NodeKeySignature", "ReplayedAUM", "SigKind", "Signature",
    "State", "StateError", "StorageError", "TKAError", "UnknownKey", "UnknownParent", "compute_state_at",
    "disablement_kdf", "ed25519_key", "pick_next", "verify_aum",
]
