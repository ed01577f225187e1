"""Tailnet Lock as a node and the control server run it: thin state machines over the pure core,
ready for the daemon and the control server to drive (no sockets, no clocks, storage injected).

The protocol between them (to be carried over the node protocol; JSON bodies):
- the map carries the control server's chain head (`tka_head`, base32) or null when the lock is off;
- a node with no chain asks for the bootstrap AUM (`ControlChain.bootstrap_aum`) and calls
  `NodeLock.bootstrap`;
- a node whose head differs sends `NodeLock.offer()`; the control server answers with
  `ControlChain.answer(offer)`; the node calls `NodeLock.apply(answer)` and sends back what it returns
  (`ControlChain.receive`);
- when the map says the lock is off, the node fetches the disablement secret from the control server
  and calls `NodeLock.disable(secret)`, which only obeys a secret that matches its own chain: a
  control server cannot switch the lock off by itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, TypeVar

from .authority import Authority
from .aum import AUM
from .cli_format import format_public
from .enforce import PeerFilter, VerifyCache, filter_peers, self_locked_out
from .errors import NodeKeyNotAuthorized, StateError, TKAError, UnknownKey
from .key import Key
from .nodesig import NodeKeySignature, node_key_authorized, resign, sign_direct
from .signing import LockPrivateKey
from .store import ChainStore
from .sync import SyncOffer, SyncResponse, aums_from_wire, aums_to_wire, answer_offer, apply_response, make_offer

P = TypeVar("P")


@dataclass(frozen=True)
class TrustedKey:
    key: str        # tlpub:HEX
    votes: int
    is_self: bool
    meta: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class LockStatus:
    """What `meshnode status`/`lock status` show about the lock on this node."""

    enabled: bool
    locally_disabled: bool
    node_lock_key: str
    head: str | None
    trusted_keys: tuple[TrustedKey, ...]
    self_locked_out: str | None     # why this node is locked out, or None
    last_refusal: str | None        # the last update from the network that was refused, and why

    def to_json(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "locally_disabled": self.locally_disabled,
                "node_lock_key": self.node_lock_key, "head": self.head,
                "trusted_keys": [{"key": k.key, "votes": k.votes, "self": k.is_self, "meta": dict(k.meta)}
                                 for k in self.trusted_keys],
                "self_locked_out": self.self_locked_out, "last_refusal": self.last_refusal}


class NodeLock:
    """The lock on one node. Not thread-safe: the daemon's control loop is its only user."""

    def __init__(self, store: ChainStore, lock_key: LockPrivateKey, *, locally_disabled: bool = False) -> None:
        self._store = store
        self._key = lock_key
        self.locally_disabled = locally_disabled
        self._authority = Authority.open(store) if store.heads() else None
        self._cache = VerifyCache()
        self.last_refusal: str | None = None

    @property
    def authority(self) -> Authority | None:
        return self._authority

    @property
    def head(self) -> str | None:
        return str(self._authority.head) if self._authority else None

    @property
    def store(self) -> ChainStore:
        return self._store

    def needs_sync(self, control_head: str | None) -> bool:
        """True when the map's head differs from ours (and the lock is on at the control server)."""
        return control_head is not None and control_head != self.head

    def bootstrap(self, aum: bytes) -> None:
        """Start the chain from the control server's bootstrap AUM (a signed checkpoint)."""
        if self._authority is not None:
            raise StateError("Tailnet Lock is already initialised on this node")
        self._authority = self._guard(lambda: Authority.bootstrap(self._store, AUM.parse(aum)))

    def offer(self) -> dict[str, Any]:
        if self._authority is None:
            raise StateError("Tailnet Lock is not initialised on this node: bootstrap first")
        return make_offer(self._authority, self._store).to_wire()

    def apply(self, answer: Any) -> list[str]:
        """Apply the control server's answer to our offer; return the AUMs (wire form) it lacks.
        A refused update leaves the chain as it was and is kept in `last_refusal` for `status`."""
        if self._authority is None:
            raise StateError("Tailnet Lock is not initialised on this node: bootstrap first")
        authority = self._authority

        def step() -> tuple[Authority, list[AUM]]:
            return apply_response(authority, self._store, SyncResponse.from_wire(answer))

        self._authority, back = self._guard(step)
        return aums_to_wire(back)

    def _guard(self, fn: Callable[[], Any]) -> Any:
        try:
            result = fn()
        except TKAError as exc:
            self.last_refusal = f"{type(exc).__name__}: {exc}"
            raise
        return result

    def modify(self, add: Sequence[Key] = (), remove: Sequence[bytes] = (),
               votes: Mapping[bytes, int] | None = None) -> list[AUM]:
        """`lock add`/`lock remove` on this node: AUMs signed with this node's lock key, applied here
        (the next sync sends them to the control server)."""
        if self._authority is None:
            raise StateError("Tailnet Lock is not enabled")
        if not self._authority.key_trusted(self._key.public):
            raise UnknownKey(f"this node's lock key {format_public(self._key.public)} is not trusted")
        b = self._authority.updater(self._key)
        for k in add:
            b.add_key(k)
        for kid in remove:
            b.remove_key(kid)
        for kid, n in (votes or {}).items():
            b.set_key_vote(kid, n)
        updates = b.finalize(self._store)
        self._authority = self._authority.inform(self._store, updates, allow_known=False)
        return updates

    def sign_node_key(self, node_key: bytes, rotation_key: bytes | None = None) -> bytes:
        """`lock sign NODEKEY [ROTATION-KEY]`: the signature to send to the control server."""
        if self._authority is None:
            raise StateError("Tailnet Lock is not enabled")
        if not self._authority.key_trusted(self._key.public):
            raise UnknownKey(f"this node's lock key {format_public(self._key.public)} is not trusted")
        return sign_direct(self._key, node_key, rotation_key).serialize()

    def rotate(self, new_node_key: bytes, old: bytes) -> bytes:
        """The signature of this node's new node key after a rotation (Tailscale's ResignNKS at
        registration): a rotation signature made with this node's lock key, nesting `old` (this
        node's current signature), which must name that key as its rotation (wrapping) key.
        Checked against the chain before it is returned, so a registration never carries a
        signature the control server (or any peer) would refuse. Raises NodeKeyNotAuthorized or
        StateError (the lock is off here) with the reason."""
        if self._authority is None:
            raise StateError("Tailnet Lock is not enabled")
        try:
            old_sig = NodeKeySignature.parse(old)
        except TKAError as exc:
            raise NodeKeyNotAuthorized(f"this node's signature cannot be read: {exc}") from None
        wrapping = old_sig.wrapping_public()
        if wrapping != self._key.public:
            named = format_public(wrapping) if wrapping else "no rotation key"
            raise NodeKeyNotAuthorized(f"this node's signature names {named}, not this node's lock key "
                                       f"{format_public(self._key.public)}: a trusted node must sign the new "
                                       "node key (`meshnode lock sign`)")
        new = resign(self._key, new_node_key, old)
        node_key_authorized(self._authority.state, new_node_key, new)
        return new

    def filter_peers(self, peers: Sequence[P], *, node_key: Callable[[P], str | bytes],
                     signature: Callable[[P], str | bytes | None]) -> PeerFilter[P]:
        """The peers this node may talk to (all of them when the lock is off or locally disabled)."""
        state = None if self._authority is None or self.locally_disabled else self._authority.state
        return filter_peers(state, peers, node_key=node_key, signature=signature, cache=self._cache)

    def compact(self, now: float) -> None:
        """Drop AUMs older than two weeks beyond the last 24 (call after a sync, say daily)."""
        if self._authority is not None:
            self._authority = self._authority.compact(self._store, now)

    def disable(self, secret: bytes) -> bool:
        """Turn the lock off here if `secret` is a disablement secret of our chain; True if it was."""
        if self._authority is None:
            return True
        if not self._authority.valid_disablement(secret):
            self.last_refusal = "invalid disablement secret from the control server"
            return False
        self._store.clear()
        self._authority = None
        return True

    def status(self, node_key: bytes | None = None, signature: bytes | None = None) -> LockStatus:
        a = self._authority
        me = self._key.public
        return LockStatus(
            enabled=a is not None, locally_disabled=self.locally_disabled, node_lock_key=format_public(me),
            head=self.head,
            trusted_keys=tuple(TrustedKey(format_public(k.key_id), k.votes, k.key_id == me, tuple(sorted((k.meta or {}).items())))
                               for k in (a.keys if a else ())),
            self_locked_out=(self_locked_out(a.state, node_key, signature) if a is not None and node_key is not None
                             else None),
            last_refusal=self.last_refusal)


class ControlChain:
    """The chain of one tailnet at the control server: it stores and relays AUMs and checks them like
    any node (every signature is verified), but it holds no signing key and cannot forge one. It keeps
    the whole history (no compaction, as Tailscale's control plane), so a node that compacted its own
    chain or was offline for long still finds a common AUM."""

    def __init__(self, store: ChainStore) -> None:
        self._store = store
        self._authority = Authority.open(store) if store.heads() else None

    @property
    def head(self) -> str | None:
        """What goes in every map as `tka_head` (None: the lock is off)."""
        return str(self._authority.head) if self._authority else None

    def init(self, genesis: bytes) -> None:
        """`lock init` on a node sends its genesis AUM here."""
        if self._authority is not None:
            raise StateError("Tailnet Lock is already enabled on this tailnet")
        self._authority = Authority.bootstrap(self._store, AUM.parse(genesis))

    def bootstrap_aum(self) -> bytes:
        if self._authority is None:
            raise StateError("Tailnet Lock is not enabled on this tailnet")
        return self._authority.oldest_ancestor.serialized

    def answer(self, offer: Any) -> dict[str, Any]:
        if self._authority is None:
            raise StateError("Tailnet Lock is not enabled on this tailnet")
        return answer_offer(self._authority, self._store, SyncOffer.from_wire(offer)).to_wire()

    def receive(self, aums: Any, *, allow_known: bool = True) -> str:
        """AUMs a node sends (new updates, or what we lacked); verified, all or nothing. New head.
        With `allow_known=False` (the node protocol: a node sends only what its sync found missing
        here) an AUM already stored is refused as a `ReplayedAUM`."""
        if self._authority is None:
            raise StateError("Tailnet Lock is not enabled on this tailnet")
        updates = aums_from_wire(aums)
        if updates:
            self._authority = self._authority.inform(self._store, updates, allow_known=allow_known)
        return str(self._authority.head)

    def check_signature(self, node_key: bytes, blob: bytes) -> NodeKeySignature:
        """Refuse a node-key signature that does not verify before storing it on the node."""
        if self._authority is None:
            raise StateError("Tailnet Lock is not enabled on this tailnet")
        return node_key_authorized(self._authority.state, node_key, blob)

    def disable(self, secret: bytes) -> bool:
        """`lock disable`: if the secret is valid, the lock is off for the tailnet (the caller keeps
        the secret to hand to nodes, which check it against their own chain)."""
        if self._authority is None or not self._authority.valid_disablement(secret):
            return False
        self._store.clear()
        self._authority = None
        return True

    def locked_out(self, node_key: bytes, blob: bytes | None) -> str | None:
        """Why a node is locked out (for `control nodes ls`), or None."""
        if self._authority is None:
            return None
        if not blob:
            return "no node-key signature"
        try:
            node_key_authorized(self._authority.state, node_key, blob)
        except NodeKeyNotAuthorized as exc:
            return str(exc)
        return None


__all__ = ["ControlChain", "LockStatus", "NodeLock", "TrustedKey"]
