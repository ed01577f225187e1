"""RFC 5389 binding request / success response codec, as Tailscale's `net/stun/stun.go` writes them.

A request is the 20-byte header (type 0x0001, length, magic cookie 0x2112A442, 12-byte transaction
ID), a SOFTWARE attribute "tailnode" and a FINGERPRINT (CRC-32 of everything before it XOR
0x5354554e). A response carries XOR-MAPPED-ADDRESS: the port XOR 0x2112, the address XOR the cookie
(and, for IPv6, the transaction ID). Sans-I/O; every parse error is a `StunError`.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import struct
import zlib
from dataclasses import dataclass

MAGIC_COOKIE = b"\x21\x12\xa4\x42"
HEADER_LEN = 20
SOFTWARE = b"tailnode"                 # 8 bytes: no padding (Tailscale's choice, kept for its servers)
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
_FP_XOR = 0x5354554E
_U16 = struct.Struct(">H")


class Attr(enum.IntEnum):
    MAPPED_ADDRESS = 0x0001
    XOR_MAPPED_ADDRESS = 0x0020
    XOR_MAPPED_ADDRESS_ALT = 0x8020     # pre-RFC servers
    SOFTWARE = 0x8022
    FINGERPRINT = 0x8028


class StunError(ValueError):
    """Bytes that are not the STUN message expected (the message says what is wrong)."""


class NotStun(StunError):
    """Not a STUN packet at all (top bits or magic cookie wrong): the datagram belongs to someone else."""


@dataclass(frozen=True, slots=True)
class BindingResponse:
    txid: bytes
    ip: str
    port: int


def new_txid() -> bytes:
    return os.urandom(12)


def is_stun(b: bytes) -> bool:
    """Whether a datagram looks like STUN (Tailscale's `stun.Is`): demux on a shared UDP socket."""
    return len(b) >= HEADER_LEN and b[0] & 0xC0 == 0 and b[4:8] == MAGIC_COOKIE


def fingerprint(b: bytes) -> int:
    return (zlib.crc32(b) ^ _FP_XOR) & 0xFFFFFFFF


def request(txid: bytes) -> bytes:
    """A binding request, identical to Tailscale's `stun.Request(txid)`."""
    if len(txid) != 12:
        raise ValueError("a transaction ID is 12 bytes")
    attrs_len = 4 + len(SOFTWARE) + 8
    b = struct.pack(">HH", BINDING_REQUEST, attrs_len) + MAGIC_COOKIE + txid
    b += struct.pack(">HH", Attr.SOFTWARE, len(SOFTWARE)) + SOFTWARE
    return b + struct.pack(">HHI", Attr.FINGERPRINT, 4, fingerprint(b))


def _attrs(b: bytes) -> list[tuple[int, bytes]]:
    out = []
    pos = 0
    while pos < len(b):
        if len(b) - pos < 4:
            raise StunError("malformed attributes")
        atype, alen = struct.unpack_from(">HH", b, pos)
        padded = (alen + 3) & ~3
        pos += 4
        if padded > len(b) - pos:
            raise StunError("malformed attributes")
        out.append((atype, b[pos:pos + alen]))
        pos += padded
    return out


def parse_request(b: bytes) -> bytes:
    """The transaction ID of a binding request. Any RFC 5389 binding request is accepted (not only
    Tailscale's); a FINGERPRINT, when present, must be last and right."""
    if not is_stun(b):
        raise NotStun("not a STUN packet")
    if _U16.unpack_from(b)[0] != BINDING_REQUEST:
        raise StunError("not a binding request")
    length = _U16.unpack_from(b, 2)[0]
    if length != len(b) - HEADER_LEN or length % 4:
        raise StunError("length field does not match the packet")
    attrs = _attrs(b[HEADER_LEN:])
    for i, (atype, value) in enumerate(attrs):
        if atype == Attr.FINGERPRINT:
            if i != len(attrs) - 1 or len(value) != 4:
                raise StunError("fingerprint must be the last attribute")
            if struct.unpack(">I", value)[0] != fingerprint(b[:-8]):
                raise StunError("bogus fingerprint")
    return bytes(b[8:20])


def response(txid: bytes, ip: str, port: int) -> bytes:
    """A binding success response with XOR-MAPPED-ADDRESS (Tailscale's `stun.Response`)."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    raw = addr.packed
    fam = 1 if len(raw) == 4 else 2
    key = MAGIC_COOKIE + txid
    xored = bytes(x ^ k for x, k in zip(raw, key))
    attr = struct.pack(">HHBBH", Attr.XOR_MAPPED_ADDRESS, 4 + len(raw), 0, fam, port ^ 0x2112) + xored
    return struct.pack(">HH", BINDING_SUCCESS, len(attr)) + MAGIC_COOKIE + txid + attr


def _address(value: bytes, txid: bytes | None) -> tuple[str, int]:
    if len(value) < 4:
        raise StunError("malformed address attribute")
    fam, port = value[1], _U16.unpack_from(value, 2)[0]
    n = {1: 4, 2: 16}.get(fam)
    if n is None or len(value) < 4 + n:
        raise StunError("malformed address attribute")
    raw = value[4:4 + n]
    if txid is not None:
        port ^= 0x2112
        raw = bytes(x ^ k for x, k in zip(raw, MAGIC_COOKIE + txid))
    addr = ipaddress.ip_address(raw)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr), port


def parse_response(b: bytes) -> BindingResponse:
    """Transaction ID and mapped address of a binding success response (XOR-MAPPED-ADDRESS, else
    MAPPED-ADDRESS), as Tailscale's `stun.ParseResponse`."""
    if not is_stun(b):
        raise NotStun("not a STUN packet")
    txid = bytes(b[8:20])
    if b[0] != 0x01 or b[1] != 0x01:
        raise StunError("not a success response")
    length = _U16.unpack_from(b, 2)[0]
    body = b[HEADER_LEN:]
    if length > len(body):
        raise StunError("malformed attributes")
    found: tuple[str, int] | None = None
    fallback: tuple[str, int] | None = None
    for atype, value in _attrs(body[:length]):
        if atype in (Attr.XOR_MAPPED_ADDRESS, Attr.XOR_MAPPED_ADDRESS_ALT):
            found = _address(value, txid)
        elif atype == Attr.MAPPED_ADDRESS:
            fallback = _address(value, None)
    got = found or fallback
    if got is None:
        raise StunError("no mapped address in the response")
    return BindingResponse(txid, got[0], got[1])
