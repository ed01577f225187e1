"""TAI64N timestamps: the monotonic-in-practice token that lets a responder reject replayed
initiations without keeping state about past handshakes."""

from __future__ import annotations

import struct

TIMESTAMP_LEN = 12
_BASE = 0x400000000000000A  # 2^62 + 10: TAI64 label offset with the 10 s TAI-UTC difference
# wireguard-go clears the low 24 bits of the nanoseconds so the timestamp leaks less about the
# sender's clock; a peer compares timestamps only for order, so we do the same.
_WHITENER_MASK = 0x1000000 - 1
_PACK = struct.Struct(">QI")


def tai64n(unix_time: float) -> bytes:
    """The 12-byte TAI64N label of a Unix time."""
    seconds = int(unix_time)
    nanos = int((unix_time - seconds) * 1e9) & ~_WHITENER_MASK
    return _PACK.pack(_BASE + seconds, nanos)


def tai64n_to_unix(stamp: bytes) -> float:
    """Inverse of `tai64n` (to the whitened precision)."""
    seconds, nanos = _PACK.unpack(stamp)
    return (seconds - _BASE) + nanos / 1e9
