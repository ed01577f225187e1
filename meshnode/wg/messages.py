"""WireGuard's four message formats on the wire: types, sizes and the offsets the MACs cover."""

from __future__ import annotations

import enum
import struct


class MessageType(enum.IntEnum):
    """The little-endian u32 that opens every message (three reserved zero bytes included)."""

    INITIATION = 1
    RESPONSE = 2
    COOKIE_REPLY = 3
    TRANSPORT = 4


INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TRANSPORT_HEADER_SIZE = 16
TRANSPORT_MIN_SIZE = TRANSPORT_HEADER_SIZE + 16  # a keepalive: header and tag only
PADDING_MULTIPLE = 16

# type(4) sender(4) ephemeral(32) static(48) timestamp(28) mac1(16) mac2(16)
INITIATION = struct.Struct("<II32s48s28s16s16s")
# type(4) sender(4) receiver(4) ephemeral(32) empty(16) mac1(16) mac2(16)
RESPONSE = struct.Struct("<III32s16s16s16s")
# type(4) receiver(4) nonce(24) cookie(32)
COOKIE_REPLY = struct.Struct("<II24s32s")
# type(4) receiver(4) counter(8)
TRANSPORT_HEADER = struct.Struct("<IIQ")

# The MACs cover everything before them: mac1 the body, mac2 the body and mac1.
INITIATION_MAC1_OFFSET = INITIATION_SIZE - 32
RESPONSE_MAC1_OFFSET = RESPONSE_SIZE - 32

# The first four bytes of each type as they appear on the wire; the hot path compares these.
TRANSPORT_PREFIX = struct.pack("<I", MessageType.TRANSPORT)
INITIATION_PREFIX = struct.pack("<I", MessageType.INITIATION)
RESPONSE_PREFIX = struct.pack("<I", MessageType.RESPONSE)
COOKIE_REPLY_PREFIX = struct.pack("<I", MessageType.COOKIE_REPLY)


def padded_length(length: int, mtu: int) -> int:
    """Plaintext length after WireGuard's padding to 16 bytes, never beyond the MTU."""
    if mtu <= 0:
        return (length + PADDING_MULTIPLE - 1) & ~(PADDING_MULTIPLE - 1)
    last = length % mtu if length > mtu else length
    padded = (last + PADDING_MULTIPLE - 1) & ~(PADDING_MULTIPLE - 1)
    return length - last + min(padded, mtu)
