"""The per-peer timer rules as a pure state machine over deadlines."""

from __future__ import annotations

from meshnode.wg.timers import (
    KEEPALIVE_TIMEOUT,
    REJECT_AFTER_TIME,
    REKEY_TIMEOUT,
    PeerTimers,
    Timer,
)


def timers(keepalive: int = 0) -> PeerTimers:
    return PeerTimers(lambda: 0.25, keepalive)


def test_data_sent_arms_new_handshake_once() -> None:
    t = timers()
    t.data_sent(0)
    t.data_sent(3)  # already pending: not pushed back
    assert t.deadline(Timer.NEW_HANDSHAKE) == KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + 0.25
    t.any_authenticated_packet_received(4)
    assert not t.pending(Timer.NEW_HANDSHAKE)


def test_data_received_arms_keepalive_and_remembers_a_second() -> None:
    t = timers()
    t.data_received(0)
    assert t.deadline(Timer.SEND_KEEPALIVE) == KEEPALIVE_TIMEOUT and not t.need_another_keepalive
    t.data_received(1)
    assert t.need_another_keepalive
    t.any_authenticated_packet_sent(2)
    assert not t.pending(Timer.SEND_KEEPALIVE)


def test_expired_returns_and_clears_only_due_timers() -> None:
    t = timers(keepalive=25)
    t.handshake_initiated(0)
    t.any_authenticated_packet_traversal(0)
    t.session_derived(0)
    assert t.next_deadline() == REKEY_TIMEOUT + 0.25
    assert t.expired(5) == []
    assert t.expired(5.25) == [Timer.RETRANSMIT_HANDSHAKE]
    assert t.expired(25) == [Timer.PERSISTENT_KEEPALIVE]
    assert t.expired(REJECT_AFTER_TIME * 3) == [Timer.ZERO_KEY_MATERIAL]
    assert t.next_deadline() is None


def test_handshake_complete_resets_attempts() -> None:
    t = timers()
    t.handshake_initiated(0)
    t.handshake_attempts = 7
    t.sent_last_minute_handshake = True
    t.handshake_complete(1)
    assert (t.handshake_attempts, t.sent_last_minute_handshake) == (0, False)
    assert not t.pending(Timer.RETRANSMIT_HANDSHAKE)


def test_persistent_keepalive_off_arms_nothing() -> None:
    t = timers(keepalive=0)
    t.any_authenticated_packet_traversal(0)
    assert not t.pending(Timer.PERSISTENT_KEEPALIVE)
    t.stop_all()
    assert t.next_deadline() is None
