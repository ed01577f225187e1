"""DERP frames, byte-compatible with Tailscale's `derp/derp.go` (protocol version 2).

Every frame is one type byte, a 4-byte big-endian payload length, then the payload. This module
turns payloads into frozen values and back; it does no I/O. `FrameReader` cuts a byte stream into
frames and refuses a header that announces more than its limit before any of that payload arrives,
so a hostile peer cannot make us buffer 4 GiB.

Every parse error is a `FrameError` (a `ValueError`); nothing else escapes the parsers.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass
from typing import Union

MAGIC = "DERP🔑".encode()          # 8 bytes: 44 45 52 50 f0 9f 94 91
KEY_LEN = 32
NONCE_LEN = 24
FRAME_HEADER_LEN = 5
MAX_PACKET_SIZE = 64 << 10          # data bytes of one relayed packet
MAX_INFO_LEN = 1 << 20
MAX_CLIENT_INFO_LEN = 256 << 10     # the server's limit before it trusts the client
PROTOCOL_VERSION = 2
KEEPALIVE_SECONDS = 60.0
# The largest frame either side ever needs: a forward-packet frame of a maximal packet.
MAX_FRAME_LEN = 2 * KEY_LEN + MAX_PACKET_SIZE
DISCO_MAGIC = "TS💬".encode()       # 6 bytes: 54 53 f0 9f 92 ac
_DISCO_MIN_LEN = len(DISCO_MAGIC) + KEY_LEN + NONCE_LEN
_HEADER = struct.Struct(">BI")


class FrameError(ValueError):
    """Bytes that are not a valid DERP frame (or not the frame expected now)."""


class FrameTooLarge(FrameError):
    """A frame header announcing a payload longer than the reader accepts."""


class FrameType(enum.IntEnum):
    SERVER_KEY = 0x01
    CLIENT_INFO = 0x02
    SERVER_INFO = 0x03
    SEND_PACKET = 0x04
    RECV_PACKET = 0x05
    KEEP_ALIVE = 0x06
    NOTE_PREFERRED = 0x07
    PEER_GONE = 0x08
    PEER_PRESENT = 0x09
    FORWARD_PACKET = 0x0A
    WATCH_CONNS = 0x10
    CLOSE_PEER = 0x11
    PING = 0x12
    PONG = 0x13
    HEALTH = 0x14
    RESTARTING = 0x15


class PeerGoneReason(enum.IntEnum):
    DISCONNECTED = 0x00   # the peer was connected here and left
    NOT_HERE = 0x01       # the server does not know this peer


class PeerPresentFlags(enum.IntFlag):
    REGULAR = 1 << 0
    MESH_PEER = 1 << 1
    PROBER = 1 << 2
    NOT_IDEAL = 1 << 3


def looks_like_disco(packet: bytes) -> bool:
    """Whether a relayed packet is a disco message (Tailscale's `disco.LooksLikeDiscoWrapper`)."""
    return len(packet) >= _DISCO_MIN_LEN and packet[:6] == DISCO_MAGIC


def encode_frame(ftype: int, payload: bytes = b"") -> bytes:
    """One frame on the wire: type byte, big-endian length, payload."""
    return _HEADER.pack(ftype, len(payload)) + payload


# --- frame values ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerKey:
    key: bytes                        # the server's Curve25519 public key (not a WireGuard key of a node)

    def encode(self) -> bytes:
        return encode_frame(FrameType.SERVER_KEY, MAGIC + self.key)


@dataclass(frozen=True, slots=True)
class ClientInfoFrame:
    key: bytes                        # the client's node public key
    sealed: bytes                     # 24-byte nonce + NaCl box of the ClientInfo JSON

    def encode(self) -> bytes:
        return encode_frame(FrameType.CLIENT_INFO, self.key + self.sealed)


@dataclass(frozen=True, slots=True)
class ServerInfoFrame:
    sealed: bytes                     # 24-byte nonce + NaCl box of the ServerInfo JSON

    def encode(self) -> bytes:
        return encode_frame(FrameType.SERVER_INFO, self.sealed)


@dataclass(frozen=True, slots=True)
class SendPacket:
    dst: bytes
    packet: bytes

    def encode(self) -> bytes:
        return encode_frame(FrameType.SEND_PACKET, self.dst + self.packet)


@dataclass(frozen=True, slots=True)
class RecvPacket:
    src: bytes
    packet: bytes

    def encode(self) -> bytes:
        return encode_frame(FrameType.RECV_PACKET, self.src + self.packet)


@dataclass(frozen=True, slots=True)
class ForwardPacket:
    src: bytes
    dst: bytes
    packet: bytes

    def encode(self) -> bytes:
        return encode_frame(FrameType.FORWARD_PACKET, self.src + self.dst + self.packet)


@dataclass(frozen=True, slots=True)
class KeepAlive:
    def encode(self) -> bytes:
        return encode_frame(FrameType.KEEP_ALIVE)


@dataclass(frozen=True, slots=True)
class NotePreferred:
    preferred: bool

    def encode(self) -> bytes:
        return encode_frame(FrameType.NOTE_PREFERRED, b"\x01" if self.preferred else b"\x00")


@dataclass(frozen=True, slots=True)
class PeerGone:
    key: bytes
    reason: PeerGoneReason | int = PeerGoneReason.DISCONNECTED

    def encode(self) -> bytes:
        return encode_frame(FrameType.PEER_GONE, self.key + bytes([int(self.reason)]))


@dataclass(frozen=True, slots=True)
class PeerPresent:
    key: bytes
    ip: str | None = None             # the client's address as the server saw it
    port: int = 0
    flags: int = 0

    def encode(self) -> bytes:
        ip16 = ipaddress.ip_address(self.ip or "::").packed
        if len(ip16) == 4:            # Go's netip.Addr.As16: IPv4 as ::ffff:a.b.c.d
            ip16 = b"\x00" * 10 + b"\xff\xff" + ip16
        return encode_frame(FrameType.PEER_PRESENT,
                            self.key + ip16 + struct.pack(">H", self.port) + bytes([self.flags]))


@dataclass(frozen=True, slots=True)
class WatchConns:
    def encode(self) -> bytes:
        return encode_frame(FrameType.WATCH_CONNS)


@dataclass(frozen=True, slots=True)
class ClosePeer:
    key: bytes

    def encode(self) -> bytes:
        return encode_frame(FrameType.CLOSE_PEER, self.key)


@dataclass(frozen=True, slots=True)
class Ping:
    data: bytes                       # 8 bytes, echoed in the Pong

    def encode(self) -> bytes:
        return encode_frame(FrameType.PING, self.data)


@dataclass(frozen=True, slots=True)
class Pong:
    data: bytes

    def encode(self) -> bytes:
        return encode_frame(FrameType.PONG, self.data)


@dataclass(frozen=True, slots=True)
class Health:
    problem: str                      # empty: the connection is healthy again

    def encode(self) -> bytes:
        return encode_frame(FrameType.HEALTH, self.problem.encode())


@dataclass(frozen=True, slots=True)
class Restarting:
    reconnect_in_ms: int
    try_for_ms: int

    def encode(self) -> bytes:
        return encode_frame(FrameType.RESTARTING, struct.pack(">II", self.reconnect_in_ms, self.try_for_ms))


@dataclass(frozen=True, slots=True)
class Unknown:
    """A frame type this version does not know; both ends skip these, as Tailscale's do."""

    type: int
    payload: bytes

    def encode(self) -> bytes:
        return encode_frame(self.type, self.payload)


Frame = Union[ServerKey, ClientInfoFrame, ServerInfoFrame, SendPacket, RecvPacket, ForwardPacket, KeepAlive,
              NotePreferred, PeerGone, PeerPresent, WatchConns, ClosePeer, Ping, Pong, Health, Restarting,
              Unknown]


# --- parsing ---------------------------------------------------------------------------------------


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise FrameError(what)


def _packet(payload: bytes, keys: int, what: str) -> tuple[bytes, ...]:
    _need(len(payload) >= keys * KEY_LEN, f"short {what} frame")
    body = payload[keys * KEY_LEN:]
    _need(len(body) <= MAX_PACKET_SIZE, f"{what}: packet of {len(body)} bytes exceeds {MAX_PACKET_SIZE}")
    return tuple(payload[i * KEY_LEN:(i + 1) * KEY_LEN] for i in range(keys)) + (body,)


def _server_key(p: bytes) -> Frame:
    # Tailscale allows bytes after the key "for future use".
    _need(len(p) >= len(MAGIC) + KEY_LEN and p[:len(MAGIC)] == MAGIC, "invalid server greeting")
    return ServerKey(p[len(MAGIC):len(MAGIC) + KEY_LEN])


def _client_info(p: bytes) -> Frame:
    _need(len(p) >= KEY_LEN + NONCE_LEN, "short client info")
    _need(len(p) <= MAX_CLIENT_INFO_LEN, "long client info")
    return ClientInfoFrame(p[:KEY_LEN], p[KEY_LEN:])


def _server_info(p: bytes) -> Frame:
    _need(len(p) >= NONCE_LEN, "short server info")
    _need(len(p) <= NONCE_LEN + MAX_INFO_LEN, "long server info")
    return ServerInfoFrame(p)


def _peer_gone(p: bytes) -> Frame:
    _need(len(p) >= KEY_LEN, "short peer gone frame")
    # Old servers send only the key; the reason byte then means "disconnected".
    reason = p[KEY_LEN] if len(p) > KEY_LEN else 0
    try:
        reason = PeerGoneReason(reason)
    except ValueError:
        pass
    return PeerGone(p[:KEY_LEN], reason)


def _peer_present(p: bytes) -> Frame:
    _need(len(p) >= KEY_LEN, "short peer present frame")
    ip, port, flags = None, 0, 0
    if len(p) >= KEY_LEN + 18:
        addr = ipaddress.IPv6Address(p[KEY_LEN:KEY_LEN + 16])
        ip = str(addr.ipv4_mapped or addr)
        port = struct.unpack(">H", p[KEY_LEN + 16:KEY_LEN + 18])[0]
        if len(p) >= KEY_LEN + 19:
            flags = p[KEY_LEN + 18]
    return PeerPresent(p[:KEY_LEN], ip, port, flags)


def _eight(p: bytes, what: str) -> bytes:
    # Tailscale reads 8 bytes and skips up to ~1000 bytes of "future extensibility".
    _need(len(p) >= 8, f"short {what}")
    _need(len(p) <= 1000, f"{what} body too large")
    return p[:8]


def _exact(p: bytes, n: int, what: str) -> bytes:
    _need(len(p) == n, f"{what} frame wrong size")
    return p


def _health(p: bytes) -> Frame:
    try:
        return Health(p.decode())
    except UnicodeDecodeError as exc:
        raise FrameError(f"health frame: {exc}") from None


def _restarting(p: bytes) -> Frame:
    _need(len(p) >= 8, "short restarting frame")
    return Restarting(*struct.unpack(">II", p[:8]))


_PARSERS = {
    FrameType.SERVER_KEY: _server_key,
    FrameType.CLIENT_INFO: _client_info,
    FrameType.SERVER_INFO: _server_info,
    FrameType.SEND_PACKET: lambda p: SendPacket(*_packet(p, 1, "send packet")),
    FrameType.RECV_PACKET: lambda p: RecvPacket(*_packet(p, 1, "recv packet")),
    FrameType.FORWARD_PACKET: lambda p: ForwardPacket(*_packet(p, 2, "forward packet")),
    FrameType.KEEP_ALIVE: lambda p: KeepAlive(),
    FrameType.NOTE_PREFERRED: lambda p: NotePreferred(_exact(p, 1, "note preferred") != b"\x00"),
    FrameType.PEER_GONE: _peer_gone,
    FrameType.PEER_PRESENT: _peer_present,
    FrameType.WATCH_CONNS: lambda p: (_exact(p, 0, "watch conns"), WatchConns())[1],
    FrameType.CLOSE_PEER: lambda p: ClosePeer(_exact(p, KEY_LEN, "close peer")),
    FrameType.PING: lambda p: Ping(_eight(p, "ping")),
    FrameType.PONG: lambda p: Pong(_eight(p, "pong")),
    FrameType.HEALTH: _health,
    FrameType.RESTARTING: _restarting,
}


def parse_frame(ftype: int, payload: bytes) -> Frame:
    """The value of one frame's payload. Raises `FrameError` for a malformed payload."""
    parser = _PARSERS.get(ftype)  # type: ignore[call-overload]
    if parser is None:
        return Unknown(ftype, bytes(payload))
    return parser(bytes(payload))


class FrameReader:
    """Cuts a byte stream into `(type, payload)` pairs. `max_frame` bounds one payload: a header that
    announces more raises `FrameTooLarge` at once (the connection must then be closed)."""

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME_LEN) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Add bytes; return every frame now complete, in order."""
        buf = self._buf
        buf += data
        out: list[tuple[int, bytes]] = []
        pos = 0
        n = len(buf)
        with memoryview(buf) as view:        # one copy per payload, not two
            while n - pos >= FRAME_HEADER_LEN:
                ftype, length = _HEADER.unpack_from(buf, pos)
                if length > self.max_frame:
                    raise FrameTooLarge(f"frame type 0x{ftype:02x} of {length} bytes exceeds the limit of "
                                        f"{self.max_frame}")
                end = pos + FRAME_HEADER_LEN + length
                if end > n:
                    break
                out.append((ftype, view[pos + FRAME_HEADER_LEN:end].tobytes()))
                pos = end
        if pos:
            del buf[:pos]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)
