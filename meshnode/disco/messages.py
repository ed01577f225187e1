"""The plaintext disco messages (tailscale disco/disco.go): a type byte, a version byte (0), and
the body. Only the three messages direct paths need are understood: Ping, Pong, CallMeMaybe.

Endpoints are `(host, port)` with the host in its canonical text form (IPv4 as a.b.c.d): on the
wire every address is 16 bytes, IPv4 as ::ffff:a.b.c.d, then a big-endian port."""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

MAGIC = "TS💬".encode()  # 54 53 f0 9f 92 ac
KEY_LEN = 32
NONCE_LEN = 24
TX_ID_LEN = 12
HEADER_LEN = 2
VERSION = 0
_EP_LEN = 18  # 16-byte address + 2-byte port
_ZERO_KEY = bytes(KEY_LEN)
_PORT = struct.Struct("!H")

Endpoint = tuple[str, int]


class DiscoError(ValueError):
    """A disco datagram or message that cannot be used (short, unknown type, bad seal...)."""


class MessageType(enum.IntEnum):
    PING = 0x01
    PONG = 0x02
    CALL_ME_MAYBE = 0x03


@dataclass(frozen=True)
class Ping:
    """"Are you there?" sent to one candidate endpoint; `node_key` is the sender's WireGuard key."""

    tx_id: bytes
    node_key: bytes | None = None
    padding: int = 0


@dataclass(frozen=True)
class Pong:
    """The answer to a Ping: its tx id and the address the ping came from, as the answerer saw it
    (our public address through any NAT)."""

    tx_id: bytes
    src: Endpoint


@dataclass(frozen=True)
class CallMeMaybe:
    """"Ping me at these endpoints now": sent through the relay so both sides send at once."""

    endpoints: tuple[Endpoint, ...] = ()


Message = Ping | Pong | CallMeMaybe


def canonical_endpoint(host: str, port: int) -> Endpoint:
    """(host, port) with the host parsed and printed canonically; IPv4-mapped IPv6 as IPv4."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        raise DiscoError(f"not an IP address: {host!r}") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not 0 <= port <= 0xFFFF:
        raise DiscoError(f"port out of range: {port}")
    return (str(ip), port)


def _pack_endpoint(ep: Endpoint) -> bytes:
    host, port = canonical_endpoint(*ep)
    ip = ipaddress.ip_address(host)
    raw = ip.packed if ip.version == 6 else b"\0" * 10 + b"\xff\xff" + ip.packed
    return raw + _PORT.pack(port)


def _unpack_endpoint(data: bytes) -> Endpoint:
    ip = ipaddress.IPv6Address(data[:16])
    host = str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else str(ip)
    return (host, _PORT.unpack_from(data, 16)[0])


def encode(msg: Message) -> bytes:
    """The plaintext wire form of `msg` (what goes inside the box)."""
    if isinstance(msg, Ping):
        if len(msg.tx_id) != TX_ID_LEN or msg.padding < 0:
            raise DiscoError("a ping needs a 12-byte tx id and padding >= 0")
        key = b""
        if msg.node_key is not None and msg.node_key != _ZERO_KEY:
            if len(msg.node_key) != KEY_LEN:
                raise DiscoError("a node key is 32 bytes")
            key = msg.node_key
        return bytes((MessageType.PING, VERSION)) + msg.tx_id + key + bytes(msg.padding)
    if isinstance(msg, Pong):
        if len(msg.tx_id) != TX_ID_LEN:
            raise DiscoError("a pong needs a 12-byte tx id")
        return bytes((MessageType.PONG, VERSION)) + msg.tx_id + _pack_endpoint(msg.src)
    if isinstance(msg, CallMeMaybe):
        return bytes((MessageType.CALL_ME_MAYBE, VERSION)) + b"".join(
            _pack_endpoint(ep) for ep in msg.endpoints)
    raise DiscoError(f"not a disco message: {type(msg).__name__}")


def decode(data: bytes) -> Message:
    """Parse a plaintext message; raises DiscoError (only) for anything unusable. As in Go, a
    newer version of a known message is read as far as we understand it."""
    if len(data) < HEADER_LEN:
        raise DiscoError("short message")
    kind, version, body = data[0], data[1], bytes(data[2:])
    if kind == MessageType.PING:
        if len(body) < TX_ID_LEN:
            raise DiscoError("short ping")
        rest = body[TX_ID_LEN:]
        key: bytes | None = None
        if len(rest) >= KEY_LEN and rest[:KEY_LEN] != _ZERO_KEY:
            key, rest = rest[:KEY_LEN], rest[KEY_LEN:]
        return Ping(body[:TX_ID_LEN], key, len(rest))
    if kind == MessageType.PONG:
        if len(body) < TX_ID_LEN + _EP_LEN:
            raise DiscoError("short pong")
        return Pong(body[:TX_ID_LEN], _unpack_endpoint(body[TX_ID_LEN:]))
    if kind == MessageType.CALL_ME_MAYBE:
        # Go ignores a body it cannot read (and other versions) rather than failing.
        if version != VERSION or not body or len(body) % _EP_LEN:
            return CallMeMaybe()
        return CallMeMaybe(tuple(_unpack_endpoint(body[i:i + _EP_LEN])
                                 for i in range(0, len(body), _EP_LEN)))
    raise DiscoError(f"unsupported message type 0x{kind:02x}")
