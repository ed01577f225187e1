"""Synchronising chains between a node and the control server (tka/sync.go), sans I/O.

The exchange, both ways (each end may hold AUMs the other lacks):
1. A sends its offer: its head and a few ancestors, newest first, the last being its oldest AUM.
2. B computes from that offer the AUMs A is missing (`missing_aums`) and sends them with its own offer.
3. A applies them (`Authority.inform`, which verifies every signature: the relay cannot forge), then
   computes and sends what B is missing from B's offer.
On the wire (JSON, as Tailscale's TKASyncOfferRequest/TKASyncSendRequest): hashes in base32 text,
AUMs as standard base64 of their canonical bytes.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, Sequence

from .authority import Authority, _fast_forward, compute_state_at
from .aum import AUM, AUMHash, AUMKind
from .errors import DecodeError, LimitExceeded, NoIntersection, UnknownParent
from .limits import MAX_SYNC_HEAD_INTERSECTION_ITER, MAX_SYNC_ITER
from .store import ChainStore

MAX_OFFER_ANCESTORS = 64
# Besides every checkpoint (as Tailscale sends), ancestors at exponentially growing distances from
# head (4, 16, 64, ...) so that a peer that is a little behind finds a recent common AUM even when no
# checkpoint is near. The remote end accepts any subset of ancestors, so this stays compatible.
_SKIP_START, _SKIP_SHIFT = 4, 2


@dataclass(frozen=True)
class SyncOffer:
    head: AUMHash
    ancestors: tuple[AUMHash, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"head": str(self.head), "ancestors": [str(a) for a in self.ancestors]}

    @classmethod
    def from_wire(cls, obj: Any) -> "SyncOffer":
        if not isinstance(obj, dict) or not isinstance(obj.get("head"), str):
            raise DecodeError("sync offer: expected an object with a text 'head'")
        anc = obj.get("ancestors", [])
        if not isinstance(anc, list) or not all(isinstance(a, str) for a in anc):
            raise DecodeError("sync offer: 'ancestors' must be a list of hashes")
        if len(anc) > MAX_OFFER_ANCESTORS:
            raise LimitExceeded(f"sync offer: {len(anc)} ancestors (max {MAX_OFFER_ANCESTORS})")
        return cls(AUMHash.from_text(obj["head"]), tuple(AUMHash.from_text(a) for a in anc))


def aums_to_wire(aums: Sequence[AUM]) -> list[str]:
    return [base64.b64encode(a.serialized).decode() for a in aums]


def aums_from_wire(items: Any) -> list[AUM]:
    """Decode AUMs received from the network (each strictly parsed; signatures checked later by
    Authority.inform)."""
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise DecodeError("AUMs: expected a list of base64 strings")
    if len(items) > MAX_SYNC_ITER:
        raise LimitExceeded(f"{len(items)} AUMs at once (max {MAX_SYNC_ITER})")
    out = []
    for i, x in enumerate(items):
        try:
            raw = base64.b64decode(x, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise DecodeError(f"AUM {i}: not base64: {exc}") from None
        out.append(AUM.parse(raw))
    return out


def make_offer(authority: Authority, store: ChainStore) -> SyncOffer:
    """Our offer: head, then checkpoints and exponentially spaced ancestors, then the oldest AUM."""
    oldest = authority.oldest_ancestor.hash
    ancestors: list[AUMHash] = []
    curs: AUMHash | None = authority.head
    next_skip, distance = _SKIP_START, 0
    for _ in range(MAX_SYNC_HEAD_INTERSECTION_ITER):
        aum = store.aum(curs) if curs is not None else None
        if aum is None or aum.hash == oldest:
            break
        if distance and (aum.kind == AUMKind.CHECKPOINT or distance == next_skip):
            if len(ancestors) < MAX_OFFER_ANCESTORS - 1:
                ancestors.append(aum.hash)
        if distance == next_skip:
            next_skip <<= _SKIP_SHIFT
        distance += 1
        curs = aum.parent
    ancestors.append(oldest)
    return SyncOffer(authority.head, tuple(ancestors))


@dataclass(frozen=True)
class _Intersection:
    up_to_date: bool = False
    head: AUMHash | None = None   # the remote's head is in our chain: send what follows it
    tail: AUMHash | None = None   # an ancestor of the remote is in our chain: send from there


def _intersection(store: ChainStore, local: SyncOffer, remote: SyncOffer) -> _Intersection:
    if remote.head == local.head:
        return _Intersection(up_to_date=True, head=local.head)
    if store.aum(remote.head) is not None:
        curs: AUMHash | None = local.head
        for _ in range(MAX_SYNC_HEAD_INTERSECTION_ITER):
            aum = store.aum(curs) if curs is not None else None
            if aum is None:
                break
            if aum.hash == remote.head:
                return _Intersection(head=aum.hash)
            curs = aum.parent
    for a in remote.ancestors:
        try:
            state = compute_state_at(store, a, MAX_SYNC_ITER)
        except UnknownParent:
            continue
        end, _ = _fast_forward(store, MAX_SYNC_ITER, state, lambda c, _s: c.hash == local.head)
        if end.hash == local.head:
            return _Intersection(tail=a)
    raise NoIntersection("no intersection: the other chain shares no AUM with ours "
                         "(a different authority, or compacted past its history)")


def missing_aums(authority: Authority, store: ChainStore, remote: SyncOffer) -> list[AUM]:
    """The AUMs, oldest first, that the holder of `remote` needs to reach our head (MissingAUMs)."""
    local = make_offer(authority, store)
    inter = _intersection(store, local, remote)
    if inter.up_to_date:
        return []
    start = inter.head if inter.head is not None else inter.tail
    assert start is not None
    out: list[AUM] = []

    def collect(curs: AUM, _state: object) -> bool:
        if curs.hash != start:
            out.append(curs)
        return False

    _fast_forward(store, MAX_SYNC_ITER, compute_state_at(store, start, MAX_SYNC_ITER), collect)
    return out


@dataclass(frozen=True)
class SyncResponse:
    """What the side that received an offer sends back: its own offer and what the offerer lacks."""

    offer: SyncOffer
    missing: tuple[AUM, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"offer": self.offer.to_wire(), "missing_aums": aums_to_wire(self.missing)}

    @classmethod
    def from_wire(cls, obj: Any) -> "SyncResponse":
        if not isinstance(obj, dict):
            raise DecodeError("sync response: expected an object")
        return cls(SyncOffer.from_wire(obj.get("offer")), tuple(aums_from_wire(obj.get("missing_aums", []))))


def answer_offer(authority: Authority, store: ChainStore, remote: SyncOffer) -> SyncResponse:
    """Step 2 of the exchange, on the side that received `remote`."""
    return SyncResponse(make_offer(authority, store), tuple(missing_aums(authority, store, remote)))


def apply_response(authority: Authority, store: ChainStore,
                   response: SyncResponse) -> tuple[Authority, list[AUM]]:
    """Step 3, on the offerer: apply what the other side sent (verified, all or nothing), then return
    the new authority and the AUMs the other side lacks (to send it)."""
    if response.missing:
        authority = authority.inform(store, list(response.missing))
    return authority, missing_aums(authority, store, response.offer)
