"""The Tailnet Key Authority (tka/tka.go): computing the state from a stored chain, fork resolution,
verifying and applying updates, and checking node keys.

Every node runs the same deterministic rules, so every node that holds the same AUMs reaches the same
head and the same trusted keys. At a fork the child chosen is, in order: the one whose signatures
carry the most votes, then a RemoveKey, then the lowest hash.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from .aum import AUM, AUMHash, AUMKind
from .errors import (InvalidAUM, InvalidSignature, LimitExceeded, ReplayedAUM, StateError, StorageError,
                     TKAError, UnknownKey, UnknownParent)
from .key import Key
from .limits import MAX_SCAN_ITERATIONS
from .nodesig import NodeKeySignature, node_key_authorized
from .signing import LockPrivateKey, verify
from .state import State
from .store import ChainStore


# -- chain computation (pure over a store) --------------------------------------------------------

@dataclass(frozen=True)
class _Chain:
    oldest: AUM
    head: AUM
    through_active: bool = False


def _limit(max_iter: int) -> LimitExceeded:
    return LimitExceeded(f"iteration limit exceeded ({max_iter}): the chain is longer than Tailnet Lock allows")


def _chain_candidates(store: ChainStore, last_known_oldest: bytes | None, max_iter: int) -> list[_Chain]:
    """Every (oldest, head) pair reachable by walking back from each head (computeChainCandidates)."""
    candidates = []
    for head in store.heads():
        oldest, through = head, False
        for _ in range(max_iter + 1):
            parent_hash = oldest.parent
            parent = store.aum(parent_hash) if parent_hash is not None else None
            if parent is None:
                break
            oldest = parent
            if last_known_oldest is not None and parent.hash == last_known_oldest:
                through = True
        else:
            raise _limit(max_iter)
        candidates.append(_Chain(oldest, head, through))
    return candidates


def pick_next(state: State, candidates: Sequence[AUM]) -> AUM:
    """The child to follow at a fork (pickNextAUM): most signature weight, then RemoveKey, then the
    lowest hash. `state` is the state at the common parent."""
    if not candidates:
        raise ValueError("pick_next called with no candidates")
    return min(candidates, key=lambda a: (-a.weight(state), a.kind != AUMKind.REMOVE_KEY, bytes(a.hash)))


Advancer = Callable[[State, list[AUM]], "tuple[AUM, State] | None"]


def _advance_by_primary(state: State, candidates: list[AUM]) -> tuple[AUM, State] | None:
    if not candidates:
        return None
    aum = pick_next(state, candidates)
    return aum, state.apply_verified(aum)


def _fast_forward(store: ChainStore, max_iter: int, start: State,
                  done: Callable[[AUM, State], bool] | None = None,
                  advancer: Advancer = _advance_by_primary) -> tuple[AUM, State]:
    """Follow children from `start` until `done` or no child is left (fastForwardWithAdvancer)."""
    if start.last_aum_hash is None:
        raise StateError("invalid initial state")
    curs = store.aum(start.last_aum_hash)
    if curs is None:
        raise StorageError(f"reading {AUMHash(start.last_aum_hash)}: not in the store")
    state = start
    for _ in range(max_iter):
        if done is not None and done(curs, state):
            return curs, state
        step = advancer(state, store.child_aums(curs.hash))
        if step is None:
            return curs, state
        curs, state = step
    raise _limit(max_iter)


def compute_state_at(store: ChainStore, want: bytes, max_iter: int = MAX_SCAN_ITERATIONS) -> State:
    """The state right after the AUM `want` (computeStateAt): walk back to a checkpoint or genesis,
    then forward along the same path."""
    top = store.aum(want)
    if top is None:
        raise UnknownParent(f"AUM {AUMHash(want)} is not in the chain")
    curs, path = top, set()
    for i in range(max_iter + 2):
        if i > max_iter:
            raise _limit(max_iter)
        path.add(bytes(curs.hash))
        if curs.kind == AUMKind.CHECKPOINT and curs.state is not None:
            state = State(bytes(curs.hash), curs.state.disablement_values, curs.state.keys,
                          curs.state.state_id1, curs.state.state_id2)
            break
        parent = curs.parent
        if parent is None:
            if curs.kind in (AUMKind.NO_OP, AUMKind.ADD_KEY):
                state = State().apply_verified(curs)
                break
            raise InvalidAUM(f"invalid genesis update: {curs.hash} ({curs.kind})")
        prev = store.aum(parent)
        if prev is None:
            raise UnknownParent(f"reading parent {parent}: not in the chain")
        curs = prev

    def along_path(st: State, candidates: list[AUM]) -> tuple[AUM, State] | None:
        for c in candidates:
            if bytes(c.hash) in path:
                return c, st.apply_verified(c)
        raise StorageError("no candidate matching path")

    _, state = _fast_forward(store, max_iter, state, lambda c, _s: c.hash == want, along_path)
    if state.last_aum_hash != bytes(want):
        raise StorageError("unexpected fastForward outcome")
    return state


def _active_ancestor(chains: list[_Chain]) -> AUMHash:
    ancestors: dict[bytes, bool] = {}
    for c in chains:
        ancestors[bytes(c.oldest.hash)] = ancestors.get(bytes(c.oldest.hash), False) or c.through_active
    if len(ancestors) == 1:
        return AUMHash(next(iter(ancestors)))
    for h, through in ancestors.items():
        if through:
            return AUMHash(h)
    raise StorageError("multiple distinct chains")


def compute_active_chain(store: ChainStore, last_known_oldest: bytes | None,
                         max_iter: int = MAX_SCAN_ITERATIONS) -> tuple[AUM, AUM, State]:
    """(oldest ancestor, head, state at head) of the chain in use (computeActiveChain)."""
    chains = _chain_candidates(store, last_known_oldest, max_iter)
    if not chains:
        raise StorageError("no chain candidates in AUM storage")
    oldest_hash = _active_ancestor(chains)
    ancestor = store.aum(oldest_hash)
    if ancestor is None:
        raise StorageError(f"ancestor {oldest_hash} vanished from the store")
    state = compute_state_at(store, oldest_hash, max_iter)
    head, state = _fast_forward(store, max_iter, state)
    return ancestor, head, state


def verify_aum(aum: AUM, state: State, is_genesis: bool = False) -> None:
    """Raise unless `aum` is well-formed, follows `state` and is signed by keys `state` trusts
    (aumVerify)."""
    aum.static_validate()
    if not is_genesis:
        if aum.parent is None:
            raise InvalidAUM("aum has no parent")
        if state.last_aum_hash is None:
            raise StateError("cannot check update parent hash against a state with no previous AUM")
        if state.last_aum_hash != aum.prev:
            raise UnknownParent(f"aum with parent {aum.parent} cannot be applied to a state at "
                                f"{AUMHash(state.last_aum_hash)}")
    if not aum.signatures:
        raise InvalidSignature("unsigned AUM")
    for i, sig in enumerate(aum.signatures):
        key = state.get_key(sig.key_id or b"")
        if key is None:
            raise UnknownKey(f"signature {i}: key tlpub:{(sig.key_id or b'').hex()} is not trusted")
        if not verify(key.public or b"", aum.sig_hash, sig.signature):
            raise InvalidSignature(f"signature {i}: invalid signature by tlpub:{(sig.key_id or b'').hex()}")
    if aum.kind == AUMKind.REMOVE_KEY and len(state.keys or ()) == 1:
        if (state.keys or ())[0].key_id == aum.key_id:
            raise StateError("cannot remove the last key in the state")


# -- the authority --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Authority:
    """A node's view of the authority: head, oldest known ancestor and the state at head. Immutable:
    every change returns a new Authority, committed to the store first."""

    head_aum: AUM
    oldest_ancestor: AUM
    state: State

    @property
    def head(self) -> AUMHash:
        return AUMHash(self.state.last_aum_hash or b"")

    @classmethod
    def open(cls, store: ChainStore) -> "Authority":
        """The authority from a non-empty store (Open)."""
        oldest, head, state = compute_active_chain(store, store.last_active_ancestor())
        return cls(head, oldest, state)

    @classmethod
    def create(cls, store: ChainStore, state: State, signer: LockPrivateKey) -> tuple["Authority", AUM]:
        """A brand new authority whose genesis checkpoint carries `state`, signed by `signer`
        (Create). `signer` must be one of the state's keys."""
        genesis = AUM(AUMKind.CHECKPOINT, state=state)
        try:
            genesis.static_validate()
        except InvalidAUM as exc:
            raise type(exc)(f"invalid state: {exc}") from None
        genesis = signer.sign_aum(genesis)
        return cls.bootstrap(store, genesis), genesis

    @classmethod
    def bootstrap(cls, store: ChainStore, genesis: AUM) -> "Authority":
        """Start from a checkpoint received from elsewhere (Bootstrap); the store must be empty."""
        if store.heads():
            raise StateError("tailchonk is not empty")
        if genesis.kind != AUMKind.CHECKPOINT:
            raise InvalidAUM(f"bootstrap AUMs must be checkpoint messages, got {genesis.kind}")
        if genesis.state is None:
            raise InvalidAUM("bootstrap AUM is missing state")
        try:
            verify_aum(genesis, genesis.state, is_genesis=True)
        except TKAError as exc:
            raise type(exc)(f"invalid bootstrap: {exc}") from None
        store.commit_verified([genesis])
        store.set_last_active_ancestor(genesis.hash)
        return cls.open(store)

    def inform(self, store: ChainStore, updates: Sequence[AUM], *, allow_known: bool = True) -> "Authority":
        """Verify and apply `updates` (oldest first), commit them, and return the new authority
        (InformIdempotent). All or nothing: if one update is refused, nothing is stored.

        AUMs already stored are skipped (sync offers overlap), unless `allow_known` is False, for
        callers that submit AUMs as new: then a stored one is a ReplayedAUM."""
        if not updates:
            raise ValueError("inform called with no updates")
        if len(updates) > MAX_SCAN_ITERATIONS:
            raise LimitExceeded(f"{len(updates)} updates at once (max {MAX_SCAN_ITERATIONS})")
        state_at: dict[bytes, State] = {bytes(self.head): self.state}
        to_commit: list[AUM] = []
        seen: set[bytes] = set()
        prev = bytes(self.head)
        head_chain = True
        for i, update in enumerate(updates):
            h = bytes(update.hash)
            if h in seen or store.aum(h) is not None:
                if not allow_known:
                    raise ReplayedAUM(f"update {i}: AUM {update.hash} is already in the chain (replayed)")
                head_chain = False
                continue
            parent = update.parent
            if parent is None:
                raise InvalidAUM(f"update {i}: missing parent (only the genesis AUM has none)")
            state = state_at.get(bytes(parent))
            if state is None:
                try:
                    state = compute_state_at(store, parent)
                except UnknownParent:
                    raise UnknownParent(f"update {i} ({update.hash}): parent {parent} is not in the "
                                        "chain; send its ancestors first") from None
                state_at[bytes(parent)] = state
            try:
                verify_aum(update, state)
                state_at[h] = state.apply_verified(update)
            except TKAError as exc:
                raise type(exc)(f"update {i} ({update.hash}) refused: {exc}") from None
            if bytes(parent) != prev:
                head_chain = False
            prev = h
            seen.add(h)
            to_commit.append(update)
        if not to_commit:
            return self
        store.commit_verified(to_commit)
        if head_chain:
            return Authority(to_commit[-1], self.oldest_ancestor, state_at[prev])
        oldest, head, state = compute_active_chain(store, self.oldest_ancestor.hash)
        return Authority(head, oldest, state)

    # -- queries ----------------------------------------------------------------------------------

    def node_key_authorized(self, node_key: bytes, signature: bytes) -> NodeKeySignature:
        """The decoded signature if it authorizes `node_key`; NodeKeyNotAuthorized otherwise."""
        return node_key_authorized(self.state, node_key, signature)

    def key_trusted(self, key_id: bytes) -> bool:
        return self.state.get_key(key_id) is not None

    @property
    def keys(self) -> tuple[Key, ...]:
        return self.state.keys or ()

    def valid_disablement(self, secret: bytes) -> bool:
        """True if `secret` disables the lock; the caller then drops all lock state."""
        return self.state.check_disablement(secret)

    def state_ids(self) -> tuple[int, int]:
        return self.state.state_id1, self.state.state_id2

    def updater(self, signer: LockPrivateKey | None) -> "UpdateBuilder":
        from .builder import UpdateBuilder

        return UpdateBuilder(self, signer)

    def compact(self, store: ChainStore, now: float, **options: float) -> "Authority":
        """Delete old AUMs (see compact.py) and return the authority with its new oldest ancestor.
        Run it from time to time (Tailscale does on sync): without it, a chain stops opening once it
        is longer than the scan limit."""
        from .compact import compact

        ancestor = compact(store, self.head, now, **options)  # type: ignore[arg-type]
        oldest = store.aum(ancestor)
        if oldest is None:
            raise StorageError(f"ancestor {ancestor} vanished during compaction")
        return Authority(self.head_aum, oldest, self.state)

    def log(self, store: ChainStore, limit: int = 50) -> list[AUM]:
        """The active chain from head backwards, at most `limit` AUMs (`lock log`)."""
        out: list[AUM] = []
        curs: AUM | None = self.head_aum
        while curs is not None and len(out) < limit:
            out.append(curs)
            curs = store.aum(curs.parent) if curs.parent is not None else None
        return out


def updates_from(store: ChainStore, aums: Iterable[AUM]) -> list[AUM]:
    """AUMs not yet stored, in the given order (helper for callers batching what they received)."""
    return [a for a in aums if store.aum(a.hash) is None]
