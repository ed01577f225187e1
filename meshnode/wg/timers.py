"""WireGuard's per-peer timer state machine (paper section 6, wireguard-go timers.go), as deadlines.

Events set or clear deadlines; `expired(now)` hands back the timers that fired. Nothing here reads
a clock or sleeps: the engine passes `now` in and asks `next_deadline()` when to call again."""

from __future__ import annotations

import enum
from typing import Callable

REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
KEEPALIVE_TIMEOUT = 10.0
MAX_TIMER_HANDSHAKES = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)
REKEY_TIMEOUT_JITTER_MAX = 1.0 / 3.0
# The initiator re-handshakes this long before the receiving key would be rejected.
REKEY_BEFORE_REJECT = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
HANDSHAKE_INITIATION_RATE = 1.0 / 50  # at most one initiation per peer per 20 ms


class Timer(enum.Enum):
    """The five per-peer timers."""

    RETRANSMIT_HANDSHAKE = "retransmit_handshake"
    SEND_KEEPALIVE = "send_keepalive"
    NEW_HANDSHAKE = "new_handshake"
    ZERO_KEY_MATERIAL = "zero_key_material"
    PERSISTENT_KEEPALIVE = "persistent_keepalive_at"


class PeerTimers:
    """Deadlines (None = not pending) plus the counters the timer rules need.

    Plain attributes named after the Timer values, not a dict keyed by enum: these are touched
    for every batch of packets and an enum hash is a Python-level call."""

    __slots__ = ("retransmit_handshake", "send_keepalive", "new_handshake", "zero_key_material",
                 "persistent_keepalive_at", "handshake_attempts", "need_another_keepalive",
                 "sent_last_minute_handshake", "persistent_keepalive", "_jitter")

    def __init__(self, jitter: Callable[[], float], persistent_keepalive: int = 0) -> None:
        self.retransmit_handshake: float | None = None
        self.send_keepalive: float | None = None
        self.new_handshake: float | None = None
        self.zero_key_material: float | None = None
        self.persistent_keepalive_at: float | None = None
        self.handshake_attempts = 0
        self.need_another_keepalive = False
        self.sent_last_minute_handshake = False
        self.persistent_keepalive = persistent_keepalive
        # A callable returning a value in [0, REKEY_TIMEOUT_JITTER_MAX): injected for determinism.
        self._jitter = jitter

    def deadline(self, timer: Timer) -> float | None:
        return getattr(self, timer.value)  # type: ignore[no-any-return]

    def set(self, timer: Timer, at: float | None) -> None:
        setattr(self, timer.value, at)

    def pending(self, timer: Timer) -> bool:
        return getattr(self, timer.value) is not None

    def data_sent(self, now: float) -> None:
        """A data packet went out: expect an answer, or re-handshake (peer may be gone)."""
        if self.new_handshake is None:
            self.new_handshake = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter()

    def data_received(self, now: float) -> None:
        """A data packet came in: answer with a keepalive unless we send something first."""
        if self.send_keepalive is None:
            self.send_keepalive = now + KEEPALIVE_TIMEOUT
        else:
            self.need_another_keepalive = True

    def any_authenticated_packet_sent(self, now: float) -> None:
        self.send_keepalive = None

    def any_authenticated_packet_received(self, now: float) -> None:
        self.new_handshake = None

    def any_authenticated_packet_traversal(self, now: float) -> None:
        if self.persistent_keepalive > 0:
            self.persistent_keepalive_at = now + self.persistent_keepalive

    def handshake_initiated(self, now: float) -> None:
        self.retransmit_handshake = now + REKEY_TIMEOUT + self._jitter()

    def handshake_complete(self, now: float) -> None:
        self.retransmit_handshake = None
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False

    def session_derived(self, now: float) -> None:
        self.zero_key_material = now + REJECT_AFTER_TIME * 3

    def stop_all(self) -> None:
        for t in Timer:
            setattr(self, t.value, None)

    def expired(self, now: float) -> list[Timer]:
        """The timers whose deadline has passed, now cleared (the caller acts on each)."""
        fired = []
        for t in Timer:
            at = getattr(self, t.value)
            if at is not None and at <= now:
                fired.append(t)
                setattr(self, t.value, None)
        return fired

    def next_deadline(self) -> float | None:
        pending = [at for t in Timer if (at := getattr(self, t.value)) is not None]
        return min(pending) if pending else None
