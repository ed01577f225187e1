"""The DERP login and steady-state machines of both ends (sans-I/O: bytes in, events and bytes out).

Login, as in Tailscale's `derp/derp.go`:
  server -> client  SERVER_KEY   magic "DERP🔑" + the server's public key
  client -> server  CLIENT_INFO  the client's node key + NaCl box (nonce first) of its ClientInfo JSON,
                                 sealed from the node key to the server key: proof the client holds
                                 the private half of the key it claims
  server -> client  SERVER_INFO  NaCl box of {"version":2}, sealed from the server key to the node key

The glue feeds received bytes to `receive()`, writes whatever `take_output()` returns, and acts on the
events. A `ServerSession` stops after CLIENT_INFO with a `ClientHello` event and holds later frames
until the glue decides admission and calls `accept()` (or closes the connection).
"""

from __future__ import annotations

import enum
import hmac
import json
from dataclasses import dataclass
from typing import Any, Union

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from .frames import (KEY_LEN, MAX_CLIENT_INFO_LEN, MAX_FRAME_LEN, MAX_PACKET_SIZE, PROTOCOL_VERSION, ClientInfoFrame, ClosePeer,
                     ForwardPacket, Frame, FrameError, FrameReader, FrameType, Health, KeepAlive, NotePreferred, Ping,
                     Pong, SendPacket, ServerInfoFrame, ServerKey, Unknown, WatchConns, parse_frame)


class LoginError(FrameError):
    """The other end failed the login: wrong frame, a box that does not open, bad JSON."""


class PermissionDenied(FrameError):
    """A mesh-only frame (forward, watch, close peer) from a client without the mesh key."""


class State(enum.Enum):
    AWAIT_SERVER_KEY = "await-server-key"      # client
    AWAIT_SERVER_INFO = "await-server-info"    # client
    AWAIT_CLIENT_INFO = "await-client-info"    # server
    AWAIT_ADMISSION = "await-admission"        # server: the glue decides
    READY = "ready"


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """What a client says about itself (Tailscale's `derp.ClientInfo`)."""

    version: int = PROTOCOL_VERSION
    mesh_key: bytes | None = None     # 32 bytes; only servers of one region hold it
    can_ack_pings: bool = True
    is_prober: bool = False
    app_name: str = ""

    def to_json(self) -> bytes:
        """The JSON Go's encoding/json writes for this struct (field order and omitempty included)."""
        out: dict[str, Any] = {}
        if self.mesh_key:
            out["meshKey"] = self.mesh_key.hex()
        if self.version:
            out["version"] = self.version
        out["CanAckPings"] = self.can_ack_pings
        if self.is_prober:
            out["IsProber"] = True
        if self.app_name:
            out["AppName"] = self.app_name
        return json.dumps(out, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "ClientInfo":
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise LoginError(f"client info: invalid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise LoginError("client info: not a JSON object")
        # Go's decoder matches field names case-insensitively.
        low = {str(k).lower(): v for k, v in obj.items()}
        mesh = low.get("meshkey")
        mesh_key = None
        if mesh:
            try:
                mesh_key = bytes.fromhex(str(mesh).strip())
            except ValueError:
                raise LoginError("client info: meshKey is not hexadecimal") from None
            if len(mesh_key) != 32:
                raise LoginError("client info: meshKey must be 32 bytes")
        version = low.get("version", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise LoginError("client info: version is not a number")
        app = low.get("appname", "")
        return cls(version=version, mesh_key=mesh_key, can_ack_pings=low.get("canackpings") is True,
                   is_prober=low.get("isprober") is True, app_name=app if isinstance(app, str) else "")


@dataclass(frozen=True, slots=True)
class ClientHello:
    """Server side: a client proved it holds `key`; admit it (`accept`) or close the connection."""

    key: bytes
    info: ClientInfo


@dataclass(frozen=True, slots=True)
class LoggedIn:
    """Client side: the server answered the login."""

    server_key: bytes
    server_info: dict[str, Any]


Event = Union[ClientHello, LoggedIn, Frame]


def _seal(private: bytes, peer: bytes, message: bytes, nonce: bytes | None) -> bytes:
    box = Box(PrivateKey(private), PublicKey(peer))
    return bytes(box.encrypt(message, nonce))      # nonce || box, as Go's SealTo


def _open(private: bytes, peer: bytes, sealed: bytes) -> bytes:
    try:
        return Box(PrivateKey(private), PublicKey(peer)).decrypt(sealed)
    except (CryptoError, ValueError, TypeError):
        raise LoginError("cannot open the login box (wrong key?)") from None


def public_key(private: bytes) -> bytes:
    """The Curve25519 public key of a 32-byte private key."""
    return bytes(PrivateKey(private).public_key)


class ClientSession:
    """One DERP connection as the client sees it."""

    def __init__(self, private_key: bytes, info: ClientInfo = ClientInfo(), *, nonce: bytes | None = None) -> None:
        self.private_key = private_key
        self.public_key = public_key(private_key)
        self.info = info
        self.server_key: bytes | None = None
        self.state = State.AWAIT_SERVER_KEY
        self._reader = FrameReader()
        self._out = bytearray()
        self._nonce = nonce            # fixed only in tests (golden vectors)

    def take_output(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        for ftype, payload in self._reader.feed(data):
            ev = self._frame(ftype, payload)
            if ev is not None:
                events.append(ev)
        return events

    def _frame(self, ftype: int, payload: bytes) -> Event | None:
        if self.state is State.AWAIT_SERVER_KEY:
            if ftype != FrameType.SERVER_KEY:
                raise LoginError(f"expected the server key frame, got type 0x{ftype:02x}")
            frame = parse_frame(ftype, payload)
            assert isinstance(frame, ServerKey)
            self.server_key = frame.key
            sealed = _seal(self.private_key, frame.key, self.info.to_json(), self._nonce)
            self._out += ClientInfoFrame(self.public_key, sealed).encode()
            self.state = State.AWAIT_SERVER_INFO
            return None
        frame = parse_frame(ftype, payload)
        if self.state is State.AWAIT_SERVER_INFO:
            if not isinstance(frame, ServerInfoFrame):
                # Tailscale's client tolerates (skips) keepalives before the server info.
                if isinstance(frame, (KeepAlive, Unknown)):
                    return None
                if isinstance(frame, Health) and frame.problem:
                    raise LoginError(f"refused by the server: {frame.problem}")
                raise LoginError(f"expected the server info frame, got {type(frame).__name__}")
            assert self.server_key is not None
            try:
                info = json.loads(_open(self.private_key, self.server_key, frame.sealed))
            except ValueError:
                raise LoginError("server info: invalid JSON") from None
            if not isinstance(info, dict):
                raise LoginError("server info: not a JSON object")
            self.state = State.READY
            return LoggedIn(self.server_key, info)
        if isinstance(frame, Ping):
            self._out += Pong(frame.data).encode()
        if isinstance(frame, (ServerKey, ServerInfoFrame, Unknown)):
            return None
        return frame

    # Frames the client sends once logged in. They are plain encoders: the session keeps no state.
    @staticmethod
    def send(dst: bytes, packet: bytes) -> bytes:
        if len(dst) != KEY_LEN:
            raise ValueError("destination key must be 32 bytes")
        return SendPacket(dst, packet).encode()


class ServerSession:
    """One DERP connection as the server sees it."""

    def __init__(self, private_key: bytes, mesh_key: bytes | None = None, *, nonce: bytes | None = None) -> None:
        self.private_key = private_key
        self.public_key = public_key(private_key)
        self.mesh_key = mesh_key
        self.state = State.AWAIT_CLIENT_INFO
        self.client_key: bytes | None = None
        self.client_info: ClientInfo | None = None
        self.can_mesh = False
        # Until login the client may only send a client-info frame; bound it accordingly.
        self._reader = FrameReader(max_frame=MAX_CLIENT_INFO_LEN)
        self._held: list[tuple[int, bytes]] = []
        self._out = bytearray()
        self._nonce = nonce

    def greeting(self) -> bytes:
        """The first bytes the server writes: its key."""
        return ServerKey(self.public_key).encode()

    def take_output(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        for ftype, payload in self._reader.feed(data):
            if self.state is State.READY:
                ev = self._frame(ftype, payload)
                if ev is not None:
                    events.append(ev)
            elif self.state is State.AWAIT_ADMISSION:
                self._held.append((ftype, payload))
            else:
                events.append(self._hello(ftype, payload))
        return events

    def _hello(self, ftype: int, payload: bytes) -> ClientHello:
        if ftype != FrameType.CLIENT_INFO:
            raise LoginError(f"expected the client info frame, got type 0x{ftype:02x}")
        frame = parse_frame(ftype, payload)
        assert isinstance(frame, ClientInfoFrame)
        info = ClientInfo.from_json(_open(self.private_key, frame.key, frame.sealed))
        self.client_key, self.client_info = frame.key, info
        self.can_mesh = bool(self.mesh_key and info.mesh_key and hmac.compare_digest(self.mesh_key, info.mesh_key))
        self.state = State.AWAIT_ADMISSION
        self._reader.max_frame = MAX_FRAME_LEN
        return ClientHello(frame.key, info)

    def accept(self) -> tuple[bytes, list[Event]]:
        """Admit the client: the server-info frame to write, and the events of frames held meanwhile."""
        if self.state is not State.AWAIT_ADMISSION:
            raise LoginError("accept() before the client info arrived")
        assert self.client_key is not None
        sealed = _seal(self.private_key, self.client_key, b'{"version":%d}' % PROTOCOL_VERSION, self._nonce)
        self.state = State.READY
        events = [ev for ftype, payload in self._held if (ev := self._frame(ftype, payload)) is not None]
        self._held.clear()
        return ServerInfoFrame(sealed).encode(), events

    def _frame(self, ftype: int, payload: bytes) -> Event | None:
        if ftype == 0x04 and KEY_LEN <= len(payload) <= KEY_LEN + MAX_PACKET_SIZE:
            return SendPacket(payload[:KEY_LEN], payload[KEY_LEN:])   # the hot path, parsed inline
        frame = parse_frame(ftype, payload)
        if isinstance(frame, (SendPacket, NotePreferred)):
            return frame
        if isinstance(frame, Ping):
            self._out += Pong(frame.data).encode()
            return frame
        if isinstance(frame, (ForwardPacket, WatchConns, ClosePeer)):
            if not self.can_mesh:
                raise PermissionDenied(f"{type(frame).__name__} needs the mesh key")
            return frame
        # Anything else from a client (including frames only servers send) is skipped, as Tailscale does.
        return None
