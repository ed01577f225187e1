"""NAT-PMP (RFC 6886) messages: the public-address and UDP-map requests and their responses.

Layout (big endian), as in RFC 6886 section 3 and Tailscale's net/portmapper/portmapper.go:
  public address request   ver=0 op=0                                            (2 bytes)
  public address response  ver=0 op=128 result:u16 epoch:u32 address:4           (12 bytes)
  UDP map request          ver=0 op=1 reserved:u16 internal:u16 external:u16 lifetime:u32 (12)
  UDP map response         ver=0 op=129 result:u16 epoch:u32 internal:u16 external:u16 lifetime:u32 (16)
A gateway that refuses a request may answer with just the first 8 bytes (version, op, result,
epoch), so an error response is accepted at 8 bytes or more.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

PORT = 5351
VERSION = 0
OP_PUBLIC_ADDRESS = 0
OP_MAP_UDP = 1
OP_REPLY = 0x80
LIFETIME = 7200                 # RFC 6886 recommends two hours
# RFC 6886 3.1: the first retransmission after 250 ms, doubling, nine tries in all.
INITIAL_TIMEOUT = 0.250
MAX_TRIES = 9


class PmpError(ValueError):
    """Not a NAT-PMP response we can read."""


class PmpResult(enum.IntEnum):
    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2
    NETWORK_FAILURE = 3
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5

    def describe(self) -> str:
        return _WORDS[self]


_WORDS = {
    PmpResult.SUCCESS: "success",
    PmpResult.UNSUPPORTED_VERSION: "the gateway does not speak this NAT-PMP version",
    PmpResult.NOT_AUTHORIZED: "the gateway supports NAT-PMP but mapping is turned off (not authorized)",
    PmpResult.NETWORK_FAILURE: "the gateway has no public address yet (network failure)",
    PmpResult.OUT_OF_RESOURCES: "the gateway has no mappings left (out of resources)",
    PmpResult.UNSUPPORTED_OPCODE: "the gateway does not support this request (unsupported opcode)",
}


def result_words(code: int) -> str:
    try:
        return PmpResult(code).describe()
    except ValueError:
        return f"unknown NAT-PMP result code {code}"


@dataclass(frozen=True, slots=True)
class PmpResponse:
    op: int                 # the request's op (the reply bit removed)
    result: int
    epoch: int              # seconds since the gateway's start of epoch
    public_ip: str | None = None     # public address response
    internal_port: int = 0           # map response
    external_port: int = 0
    lifetime: int = 0


def public_address_request() -> bytes:
    return bytes([VERSION, OP_PUBLIC_ADDRESS])


def map_udp_request(internal_port: int, external_port: int, lifetime: int) -> bytes:
    """lifetime 0 with external port 0 deletes the mapping (RFC 6886 3.4)."""
    return struct.pack("!BBHHHI", VERSION, OP_MAP_UDP, 0, internal_port, external_port, lifetime)


def parse_response(data: bytes) -> PmpResponse:
    if len(data) < 8:
        raise PmpError(f"NAT-PMP response of {len(data)} bytes (at least 8)")
    version, op, result, epoch = struct.unpack_from("!BBHI", data)
    if version != VERSION:
        raise PmpError(f"not NAT-PMP (version {version})")
    if not op & OP_REPLY:
        raise PmpError(f"a request, not a response (op {op})")
    op &= ~OP_REPLY
    if result != PmpResult.SUCCESS:
        return PmpResponse(op, result, epoch)
    if op == OP_PUBLIC_ADDRESS:
        if len(data) < 12:
            raise PmpError(f"public address response of {len(data)} bytes (12)")
        ip = ipaddress.IPv4Address(data[8:12])
        return PmpResponse(op, result, epoch, public_ip=None if ip.is_unspecified else str(ip))
    if op == OP_MAP_UDP:
        if len(data) < 16:
            raise PmpError(f"map response of {len(data)} bytes (16)")
        internal, external, lifetime = struct.unpack_from("!HHI", data, 8)
        return PmpResponse(op, result, epoch, internal_port=internal, external_port=external,
                           lifetime=lifetime)
    raise PmpError(f"unexpected NAT-PMP op {op}")
