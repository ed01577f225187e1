"""The sliding anti-replay window for transport counters (RFC 6479 semantics, 2048 bits wide like
wireguard-go's), kept as one Python int used as a bitmap: bit i set means counter `last - i` seen."""

from __future__ import annotations

WINDOW_SIZE = 2048
_MASK = (1 << WINDOW_SIZE) - 1
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1


class ReplayWindow:
    """Accepts each counter at most once and refuses counters older than the window."""

    __slots__ = ("last", "bitmap")

    def __init__(self) -> None:
        self.last = -1
        self.bitmap = 0

    def might_accept(self, counter: int) -> bool:
        """The cheap pre-check before spending a decryption; does not change the window."""
        if counter > self.last:
            return counter < REJECT_AFTER_MESSAGES
        diff = self.last - counter
        return diff < WINDOW_SIZE and not (self.bitmap >> diff) & 1

    def accept(self, counter: int) -> bool:
        """Record `counter` (after its packet authenticated); False if it is a replay or too old."""
        last = self.last
        if counter > last:
            if counter >= REJECT_AFTER_MESSAGES:
                return False
            shift = counter - last
            self.bitmap = ((self.bitmap << shift) | 1) & _MASK if shift < WINDOW_SIZE else 1
            self.last = counter
            return True
        diff = last - counter
        if diff >= WINDOW_SIZE:
            return False
        bit = 1 << diff
        if self.bitmap & bit:
            return False
        self.bitmap |= bit
        return True
