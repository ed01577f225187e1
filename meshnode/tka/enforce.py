"""Node-side enforcement of Tailnet Lock, as a pure function (Tailscale's tkaFilterNetmapLocked).

Given the node's lock state and the peers of a network map, decide which peers the node may talk
to. A peer is locked out when it carries no node-key signature, when its signature does not verify
under the keys the authority trusts, or when its node key was rotated away (a newer rotation
signature lists it as a previous key, or two peers claim the same rotation chain).

Wiring, for the daemon (not done yet, see README "Tailnet Lock"): on every new network map, before it
reaches the WireGuard engine, the router, the packet filter and the DNS view,

    result = filter_peers(lock_state, netmap.peers, node_key=lambda p: p.node_key,
                          signature=lambda p: p.key_signature, cache=self._lock_cache)
    netmap = dataclasses.replace(netmap, peers=result.admitted)

and keep `result.locked_out` for `status` (each entry says why). `lock_state` is None when the lock
is disabled on this node (or locally disabled with `lock local-disable`): then every peer passes.
"""

from __future__ import annotations

import base64
import binascii
import enum
from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

from .errors import NodeKeyNotAuthorized
from .nodesig import NodeKeySignature, SigKind, node_key_authorized
from .state import State

P = TypeVar("P")


class LockoutReason(enum.Enum):
    NO_SIGNATURE = "no-signature"
    INVALID_SIGNATURE = "invalid-signature"
    ROTATED_AWAY = "rotated-away"
    BAD_NODE_KEY = "bad-node-key"


@dataclass(frozen=True)
class LockedOut(Generic[P]):
    peer: P
    reason: LockoutReason
    detail: str


@dataclass(frozen=True)
class PeerFilter(Generic[P]):
    """Peers in their original order, split in two."""

    admitted: tuple[P, ...]
    locked_out: tuple[LockedOut[P], ...]


def decode_node_key(value: str | bytes) -> bytes:
    """A node key as 32 raw bytes from raw bytes, standard base64 (the map's form) or `nodekey:HEX`."""
    if isinstance(value, bytes):
        raw = value
    elif value.startswith("nodekey:"):
        try:
            raw = bytes.fromhex(value[len("nodekey:"):])
        except ValueError:
            raise ValueError(f"node key {value!r}: not hex") from None
    else:
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"node key {value!r}: not base64") from None
    if len(raw) != 32:
        raise ValueError(f"node key: {len(raw)} bytes, want 32")
    return raw


def decode_signature_blob(value: str | bytes | None) -> bytes | None:
    """A node-key signature as carried in a map: raw bytes, or standard base64 text; None if absent."""
    if value is None or value == "" or value == b"":
        return None
    if isinstance(value, bytes):
        return value
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return b"\x00"  # undecodable: verification then fails with a clear reason


class VerifyCache:
    """Verdicts of signature checks under one lock state, so a new map only pays for new or changed
    peers (an Ed25519 check is ~0.1 ms; a 1000-peer map would cost ~80 ms on every update). Owned by
    the caller; emptied when the state changes; bounded."""

    def __init__(self, max_entries: int = 65536) -> None:
        self._state_key: bytes | None = None
        self._entries: dict[tuple[bytes, bytes], NodeKeySignature | str] = {}
        self._max = max_entries

    def check(self, lock: State, node_key: bytes, blob: bytes) -> NodeKeySignature | str:
        """The decoded signature, or the reason it does not authorize `node_key`."""
        state_key = (lock.last_aum_hash or b"") + b"".join(k.key_id for k in lock.keys or ())
        if state_key != self._state_key:
            self._state_key, self._entries = state_key, {}
        hit = self._entries.get((node_key, blob))
        if hit is not None:
            return hit
        try:
            verdict: NodeKeySignature | str = node_key_authorized(lock, node_key, blob)
        except NodeKeyNotAuthorized as exc:
            verdict = str(exc)
        if len(self._entries) >= self._max:
            self._entries.clear()
        self._entries[(node_key, blob)] = verdict
        return verdict


def filter_peers(lock: State | None, peers: Sequence[P], *, node_key: Callable[[P], str | bytes],
                 signature: Callable[[P], str | bytes | None],
                 cache: VerifyCache | None = None) -> PeerFilter[P]:
    """Split `peers` into those admitted under `lock` and those locked out, with the reason.
    `lock` is the authority's current state (Authority.state), or None when the lock is off.
    Pass the same `cache` from one map to the next to verify only what changed."""
    if lock is None:
        return PeerFilter(tuple(peers), ())
    rejected: dict[int, LockedOut[P]] = {}
    keys: dict[int, bytes] = {}
    tracker = _RotationTracker()
    for i, p in enumerate(peers):
        try:
            nk = decode_node_key(node_key(p))
        except ValueError as exc:
            rejected[i] = LockedOut(p, LockoutReason.BAD_NODE_KEY, str(exc))
            continue
        keys[i] = nk
        blob = decode_signature_blob(signature(p))
        if blob is None:
            rejected[i] = LockedOut(p, LockoutReason.NO_SIGNATURE, "no node-key signature")
            continue
        if cache is not None:
            verdict = cache.check(lock, nk, blob)
        else:
            try:
                verdict = node_key_authorized(lock, nk, blob)
            except NodeKeyNotAuthorized as exc:
                verdict = str(exc)
        if isinstance(verdict, str):
            rejected[i] = LockedOut(p, LockoutReason.INVALID_SIGNATURE, f"signature check failed: {verdict}")
            continue
        sig = verdict
        if sig.kind == SigKind.ROTATION:
            tracker.add(nk, sig)
    obsolete = tracker.obsolete_keys()
    admitted: list[P] = []
    locked: list[LockedOut[P]] = []
    for i, p in enumerate(peers):
        if i in rejected:
            locked.append(rejected[i])
        elif keys[i] in obsolete:
            locked.append(LockedOut(p, LockoutReason.ROTATED_AWAY,
                                    "node key was rotated away by a newer rotation signature"))
        else:
            admitted.append(p)
    return PeerFilter(tuple(admitted), tuple(locked))


def self_locked_out(lock: State | None, node_key: str | bytes, signature: str | bytes | None) -> str | None:
    """Why this node itself is locked out (for `status` and health), or None if it is not."""
    if lock is None:
        return None
    blob = decode_signature_blob(signature)
    if blob is None:
        return "this node's key is not signed: run `meshnode lock sign` for it on a signing node"
    try:
        node_key_authorized(lock, decode_node_key(node_key), blob)
    except (NodeKeyNotAuthorized, ValueError) as exc:
        return f"this node's signature is not valid: {exc}"
    return None


class _RotationTracker:
    """Node keys made obsolete by rotation (rotationTracker): every previous key named in a rotation
    chain, and, among chains rooted in the same direct signature's rotation key, all but the longest
    (all of them when the longest is tied: a cloned node cannot be told from the original)."""

    def __init__(self) -> None:
        self.obsolete: set[bytes] = set()
        self.by_wrapping: dict[bytes, list[tuple[bytes, int]]] = {}

    def add(self, node_key: bytes, sig: NodeKeySignature) -> None:
        prev = sig.prev_node_keys()
        self.obsolete.update(prev)
        initial = sig
        while initial.kind == SigKind.ROTATION and initial.nested is not None:
            initial = initial.nested
        if initial.kind != SigKind.DIRECT:
            # Chains from a credential may share a wrapping key: one reusable pre-signed auth key
            # legitimately brings up many nodes.
            return
        self.by_wrapping.setdefault(initial.wrapping_pubkey or b"", []).append((node_key, len(prev)))

    def obsolete_keys(self) -> set[bytes]:
        for entries in self.by_wrapping.values():
            live = [e for e in entries if e[0] not in self.obsolete]
            if not live:
                continue
            live.sort(key=lambda e: -e[1])
            if len(live) >= 2 and live[0][1] == live[1][1]:
                self.obsolete.update(e[0] for e in live)
            else:
                self.obsolete.update(e[0] for e in live[1:])
        return self.obsolete
