"""PCP (RFC 6887) messages: the ANNOUNCE and MAP requests and their responses.

Layout (big endian), RFC 6887 sections 7.1, 7.2 and 11.1, and Tailscale's net/portmapper/pcp.go:
  request header   ver=2 op:u8 reserved:u16 lifetime:u32 client_ip:16                  (24 bytes)
  response header  ver=2 op|0x80 reserved:u8 result:u8 lifetime:u32 epoch:u32 reserved:12 (24)
  MAP payload      nonce:12 protocol:u8 reserved:3 internal:u16 external:u16 external_ip:16 (36)
IPv4 addresses travel as IPv4-mapped IPv6 (::ffff:a.b.c.d). An error response may carry the header
alone (a server that does not know the version or opcode cannot echo a payload it cannot read).
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

PORT = 5351
VERSION = 2
OP_ANNOUNCE = 0
OP_MAP = 1
OP_REPLY = 0x80
PROTO_UDP = 17
LIFETIME = 7200
MAX_SIZE = 1100                 # RFC 6887 7: messages are at most 1100 bytes
# RFC 6887 8.1.1: IRT 3 s, doubling to MRT 1024 s, each with a random factor of +-10 %.
IRT = 3.0
MRT = 1024.0

_HEADER = struct.Struct("!BBHI16s")
_RESP_HEADER = struct.Struct("!BBBBII12s")
_MAP = struct.Struct("!12sB3sHH16s")


class PcpError(ValueError):
    """Not a PCP response we can read."""


class PcpResult(enum.IntEnum):
    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13

    def describe(self) -> str:
        return _WORDS[self]

    @property
    def long_lifetime(self) -> bool:
        """RFC 6887 7.4: errors a retry will not fix soon (the others are short-lived)."""
        return self in (PcpResult.UNSUPP_VERSION, PcpResult.NOT_AUTHORIZED, PcpResult.MALFORMED_REQUEST,
                        PcpResult.UNSUPP_OPCODE, PcpResult.UNSUPP_OPTION, PcpResult.MALFORMED_OPTION,
                        PcpResult.UNSUPP_PROTOCOL, PcpResult.ADDRESS_MISMATCH)


_WORDS = {
    PcpResult.SUCCESS: "success",
    PcpResult.UNSUPP_VERSION: "the gateway does not speak PCP version 2",
    PcpResult.NOT_AUTHORIZED: "the gateway supports PCP but mapping is turned off (not authorized)",
    PcpResult.MALFORMED_REQUEST: "the gateway could not read the request (malformed request)",
    PcpResult.UNSUPP_OPCODE: "the gateway does not support this request (unsupported opcode)",
    PcpResult.UNSUPP_OPTION: "the gateway does not support a mandatory option",
    PcpResult.MALFORMED_OPTION: "the gateway could not read an option (malformed option)",
    PcpResult.NETWORK_FAILURE: "the gateway has no public address yet (network failure)",
    PcpResult.NO_RESOURCES: "the gateway has no mappings left (no resources)",
    PcpResult.UNSUPP_PROTOCOL: "the gateway does not map this protocol",
    PcpResult.USER_EX_QUOTA: "this host has used up its mapping quota at the gateway",
    PcpResult.CANNOT_PROVIDE_EXTERNAL: "the gateway cannot give the external port or address asked for",
    PcpResult.ADDRESS_MISMATCH: ("the gateway saw a different source address than the one in the request "
                                 "(another NAT in between: address mismatch)"),
    PcpResult.EXCESSIVE_REMOTE_PEERS: "the gateway cannot add more remote peers",
}


def result_words(code: int) -> str:
    try:
        return PcpResult(code).describe()
    except ValueError:
        return f"unknown PCP result code {code}"


@dataclass(frozen=True, slots=True)
class PcpResponse:
    op: int                     # the request's op (the reply bit removed)
    result: int
    lifetime: int
    epoch: int
    nonce: bytes = b""          # MAP responses only
    protocol: int = 0
    internal_port: int = 0
    external_port: int = 0
    external_ip: str | None = None


def _ip16(ip: str) -> bytes:
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + addr.packed).packed
    return addr.packed


def _ip_str(b: bytes) -> str:
    addr = ipaddress.IPv6Address(b)
    return str(addr.ipv4_mapped) if addr.ipv4_mapped is not None else str(addr)


def announce_request(client_ip: str) -> bytes:
    return _HEADER.pack(VERSION, OP_ANNOUNCE, 0, 0, _ip16(client_ip))


def map_request(client_ip: str, nonce: bytes, internal_port: int, lifetime: int, *,
                external_port: int = 0, external_ip: str = "0.0.0.0") -> bytes:
    """A MAP of UDP `internal_port`; lifetime 0 deletes it (RFC 6887 15). The suggested external
    address 0.0.0.0 (as ::ffff:0.0.0.0) asks for an IPv4 mapping."""
    if len(nonce) != 12:
        raise ValueError("a PCP mapping nonce has 12 bytes")
    return (_HEADER.pack(VERSION, OP_MAP, 0, lifetime, _ip16(client_ip))
            + _MAP.pack(nonce, PROTO_UDP, b"\0\0\0", internal_port, external_port, _ip16(external_ip)))


def parse_response(data: bytes) -> PcpResponse:
    if len(data) < 24:
        raise PcpError(f"PCP response of {len(data)} bytes (at least 24)")
    if len(data) > MAX_SIZE or len(data) % 4:
        raise PcpError(f"PCP response of {len(data)} bytes (a multiple of 4, at most {MAX_SIZE})")
    version, op, _, result, lifetime, epoch, _ = _RESP_HEADER.unpack_from(data)
    if version != VERSION:
        raise PcpError(f"not PCP version 2 (version {version})")
    if not op & OP_REPLY:
        raise PcpError(f"a request, not a response (op {op})")
    op &= ~OP_REPLY
    if op == OP_MAP and len(data) >= 24 + _MAP.size:
        nonce, proto, _, internal, external, ext_ip = _MAP.unpack_from(data, 24)
        return PcpResponse(op, result, lifetime, epoch, nonce=nonce, protocol=proto,
                           internal_port=internal, external_port=external, external_ip=_ip_str(ext_ip))
    if op == OP_MAP and result == PcpResult.SUCCESS:
        raise PcpError(f"MAP success response of {len(data)} bytes (at least 60)")
    return PcpResponse(op, result, lifetime, epoch)
