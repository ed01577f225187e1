"""Compaction (tka/tailchonk.go Compact): deleting old AUMs so a long-lived chain stays within the
scan limits (every walk of the chain stops at 2000 AUMs).

Kept: the last `min_chain` AUMs of the active chain and back to the newest checkpoint that is old
enough (the new oldest ancestor), AUMs younger than `min_age`, every descendant of a kept AUM, and
every AUM between a kept AUM and the new ancestor. Everything else goes. `now` is passed in.
"""

from __future__ import annotations

from .aum import AUMHash, AUMKind
from .errors import StorageError
from .store import ChainStore

MIN_CHAIN = 24
MIN_AGE = 14 * 24 * 3600.0

_ACTIVE, _YOUNG, _LEAF, _ANCESTOR, _CANDIDATE = 1, 2, 4, 8, 16
_RETAIN = _ACTIVE | _YOUNG | _LEAF | _ANCESTOR


def compact(store: ChainStore, head: bytes, now: float, *, min_chain: int = MIN_CHAIN,
            min_age: float = MIN_AGE) -> AUMHash:
    """Delete the AUMs compaction does not keep; return (and record) the new oldest ancestor."""
    if min_chain <= 0 or min_age <= 0:
        raise ValueError("min_chain and min_age must be positive")
    verdict: dict[bytes, int] = {bytes(h): 0 for h in store.all_hashes()}
    for h in verdict:
        if store.commit_time(h) > now - min_age:
            verdict[h] |= _YOUNG
    ancestor = _mark_active_chain(store, verdict, min_chain, bytes(head))
    _mark_descendants(store, verdict)
    ancestor = _mark_ancestor_intersection(store, verdict, ancestor)
    store.set_last_active_ancestor(ancestor)
    store.purge([h for h, v in verdict.items() if not v & _RETAIN])
    return AUMHash(ancestor)


def _mark_active_chain(store: ChainStore, verdict: dict[bytes, int], min_chain: int, head: bytes) -> bytes:
    nxt = store.aum(head)
    if nxt is None:
        raise StorageError(f"head {AUMHash(head)} is not stored")
    for _ in range(min_chain):
        h = bytes(nxt.hash)
        verdict[h] |= _ACTIVE
        parent = nxt.parent
        if parent is None or store.aum(parent) is None:
            return h  # the stored chain is shorter than min_chain: nothing to cut
        nxt = store.aum(parent)
    ancestor: bytes | None = None
    while True:
        h = bytes(nxt.hash)
        verdict[h] |= _ACTIVE
        parent = nxt.parent
        if nxt.kind == AUMKind.CHECKPOINT:
            ancestor = h
            if not verdict[h] & _YOUNG or parent is None:
                break
        prev = store.aum(parent) if parent is not None else None
        if prev is None:
            # Go errors here; stopping at the newest checkpoint found is the safe equivalent.
            if ancestor is None:
                raise StorageError("no checkpoint to compact to")
            break
        nxt = prev
    while nxt.parent is not None:
        verdict[bytes(nxt.parent)] = verdict.get(bytes(nxt.parent), 0) | _CANDIDATE
        prev = store.aum(nxt.parent)
        if prev is None:
            break
        nxt = prev
    return ancestor


def _mark_descendants(store: ChainStore, verdict: dict[bytes, int]) -> None:
    scan = [h for h, v in verdict.items() if v & _RETAIN]
    while scan:
        nxt = []
        for h in scan:
            if verdict[h] & _LEAF:
                continue
            verdict[h] |= _LEAF
            nxt += [bytes(c.hash) for c in store.child_aums(h)]
        scan = nxt


def _mark_ancestor_intersection(store: ChainStore, verdict: dict[bytes, int], candidate: bytes) -> bytes:
    scan = [h for h, v in verdict.items() if v & _RETAIN and h != candidate]
    adjusted = False
    while scan:
        nxt = []
        for h in scan:
            if verdict[h] & _ANCESTOR:
                continue
            verdict[h] |= _ANCESTOR
            aum = store.aum(h)
            if aum is None or aum.parent is None:
                raise StorageError("reached genesis AUM without intersecting with candidate ancestor")
            parent = bytes(aum.parent)
            pv = verdict.get(parent, 0)
            if pv & _RETAIN:
                continue
            if pv & _CANDIDATE:
                # A kept AUM joins the active chain before the candidate: move the candidate back and
                # keep the active AUMs in between.
                candidate, adjusted = parent, True
                verdict[parent] = pv | _ANCESTOR
                cur = parent
                while True:
                    for c in store.child_aums(cur):
                        ch = bytes(c.hash)
                        v = verdict.get(ch, 0)
                        if v & _CANDIDATE and not v & _ACTIVE:
                            verdict[ch] = v | _ANCESTOR
                            cur = ch
                            break
                    else:
                        break
            nxt.append(parent)
        scan = nxt
    if adjusted:
        aum = store.aum(candidate)
        while aum is not None:
            h = bytes(aum.hash)
            verdict[h] |= _ACTIVE
            if aum.kind == AUMKind.CHECKPOINT:
                return h
            if aum.parent is None:
                raise StorageError("reached genesis AUM without finding a checkpoint to compact to")
            aum = store.aum(aum.parent)
        raise StorageError("compaction target vanished from the store")
    return candidate
