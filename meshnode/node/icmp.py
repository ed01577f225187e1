"""ICMP echo for `meshnode ping`: packets as values (sans-I/O) and one blocking probe.

The probe goes to the peer's tailnet address, so it crosses the WireGuard tunnel like any traffic;
a reply proves the whole path (routing, keys, the peer's engine and kernel).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from dataclasses import dataclass

ECHO_REQUEST = 8
ECHO_REPLY = 0
_HEADER = struct.Struct("!BBHHH")


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int, payload: bytes) -> bytes:
    """An ICMPv4 echo request with a valid checksum."""
    body = _HEADER.pack(ECHO_REQUEST, 0, 0, ident, seq) + payload
    return _HEADER.pack(ECHO_REQUEST, 0, checksum(body), ident, seq) + payload


def parse_echo_reply(packet: bytes) -> tuple[int, int] | None:
    """(ident, seq) of an echo reply in a raw IPv4 packet (IP header included), else None."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) * 4
    icmp = packet[ihl:]
    if len(icmp) < _HEADER.size or checksum(icmp) != 0:
        return None
    kind, code, _sum, ident, seq = _HEADER.unpack_from(icmp)
    if kind != ECHO_REPLY or code != 0:
        return None
    return ident, seq


@dataclass(frozen=True, slots=True)
class Pong:
    address: str
    seq: int
    rtt: float  # seconds


def ping_once(address: str, seq: int, timeout: float) -> Pong | None:
    """Send one echo request to `address` (IPv4) and wait up to `timeout` for its reply (needs root)."""
    ident = os.getpid() & 0xFFFF
    payload = b"meshnode-ping" + struct.pack("!d", time.monotonic())
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        start = time.monotonic()
        sock.sendto(echo_request(ident, seq, payload), (address, 0))
        deadline = start + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            packet, src = sock.recvfrom(65535)
            if src[0] == address and parse_echo_reply(packet) == (ident, seq):
                return Pong(address, seq, time.monotonic() - start)
    return None
