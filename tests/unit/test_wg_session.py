"""Session lifecycle: previous/current/next keypairs as the initiator and the responder move them."""

from __future__ import annotations

from meshnode.wg.noise import SessionKeys
from meshnode.wg.peer import Peer, PeerConfig
from meshnode.wg.session import Keypair


def kp(peer: Peer, index: int, initiator: bool) -> Keypair:
    return Keypair(SessionKeys(bytes(32), bytes(32), index, index + 100, initiator), peer, 0.0)


def make_peer() -> Peer:
    return Peer(PeerConfig(bytes(32)), None, lambda: 0.0)


def test_initiator_promotes_at_once_and_keeps_one_previous() -> None:
    p = make_peer()
    k1, k2, k3 = kp(p, 1, True), kp(p, 2, True), kp(p, 3, True)
    assert p.install_initiated(k1) == []
    assert p.install_initiated(k2) == []
    assert (p.previous, p.current) == (k1, k2)
    assert p.install_initiated(k3) == [k1]
    assert (p.previous, p.current, p.next) == (k2, k3, None)


def test_responder_waits_for_confirmation() -> None:
    p = make_peer()
    k1, k2 = kp(p, 1, False), kp(p, 2, False)
    p.install_responded(k1)
    assert (p.current, p.next) == (None, k1)
    assert p.confirm_next(k2) is None  # not the pending one
    assert p.confirm_next(k1) == [] and p.current is k1 and p.next is None
    assert p.confirm_next(k1) is None  # only once


def test_initiation_while_a_response_is_pending() -> None:
    p = make_peer()
    cur, nxt, new = kp(p, 1, True), kp(p, 2, False), kp(p, 3, True)
    p.install_initiated(cur)
    p.install_responded(nxt)
    # Our own initiation completes first: the unconfirmed `next` becomes previous, `cur` goes.
    assert p.install_initiated(new) == [cur]
    assert (p.previous, p.current, p.next) == (nxt, new, None)
