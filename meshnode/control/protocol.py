"""The node <-> control wire protocol: keys, sealed messages, replay protection, stream frames.

Sans-I/O: pure functions and one small state machine (`ReplayGuard`); time is passed in.

Security design (see the module docstring of `server.py` for the HTTP side):
- The server has a long-term Curve25519 key; its public half is served at GET /key (a node pins it
  on first use and keeps it in its state directory).
- Every node request body is `Box(machine_priv, server_pub).encrypt(json)`, with the machine public
  key in the `X-Meshnode-Machine-Key` header. Only the holder of that machine key can produce a box
  that opens under it, so the header cannot be forged: the request authenticates the machine.
- Each request carries `ts` (unix seconds). The server refuses a `ts` outside +-MAX_SKEW seconds and a
  box nonce it has already seen within that window (`ReplayGuard`), so a captured request cannot be
  replayed.
- Every answer (and every frame of the map stream) is `Box(server_priv, machine_pub)`: only that
  machine can read it, and only the server can have written it.
- Registration also proves possession of the WireGuard node key: `node_key_proof` is a box from the
  node key to the server over the machine key and timestamp, so no one can register (and so hijack
  traffic to) a node key they do not hold.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import nacl.exceptions
import nacl.utils
from nacl.public import Box, PrivateKey, PublicKey

PROTOCOL_VERSION = 1
MACHINE_KEY_HEADER = "X-Meshnode-Machine-Key"
MAX_SKEW = 120.0              # seconds a request timestamp may be off the server's clock
MAX_REQUEST_BYTES = 1 << 20   # a sealed request body; maps flow the other way
MAX_FRAME_BYTES = 256 << 20   # one stream frame (a full 10k-node map is a few MB)
KEEPALIVE_SECONDS = 15.0
_FRAME_HEADER = struct.Struct(">I")
_PROOF_CONTEXT = b"meshnode node-key proof v1\x00"


class ErrorCode(enum.Enum):
    """Why the server refused a request; sent as `{"error": code, "message": ...}`."""

    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"          # admin token missing or wrong
    BAD_SEAL = "bad_seal"                  # body does not open under the claimed machine key
    REPLAY = "replay"                      # timestamp out of window or nonce seen before
    AUTHKEY_REQUIRED = "authkey_required"
    AUTHKEY_UNKNOWN = "authkey_unknown"    # no such key, or wrong secret
    AUTHKEY_EXPIRED = "authkey_expired"
    AUTHKEY_USED = "authkey_used"          # single-use key already spent
    AUTHKEY_REVOKED = "authkey_revoked"
    NOT_REGISTERED = "not_registered"      # unknown machine, deleted or logged-out node
    NODE_EXPIRED = "node_expired"
    NODE_KEY_MISMATCH = "node_key_mismatch"
    BAD_NODE_KEY_PROOF = "bad_node_key_proof"
    TAG_NOT_ALLOWED = "tag_not_allowed"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    INTERNAL = "internal"


class ProtocolError(ValueError):
    """A message that breaks the protocol; `code` says which rule."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def generate_private_key() -> str:
    """A fresh Curve25519 private key, standard base64."""
    return base64.b64encode(bytes(PrivateKey.generate())).decode()


def decode_key(text: str, what: str = "key") -> bytes:
    """32 raw key bytes from standard base64; `ProtocolError(BAD_REQUEST)` otherwise."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{what} is not base64") from None
    if len(raw) != 32:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{what} must be 32 bytes, got {len(raw)}")
    return raw


def public_key_of(private_b64: str) -> str:
    """The base64 public key of a base64 private key."""
    return base64.b64encode(bytes(PrivateKey(decode_key(private_b64, "private key")).public_key)).decode()


@dataclass
class Channel:
    """One side of a sealed channel between a machine key and the server key."""

    private_b64: str
    peer_public_b64: str
    _box: Box = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._box = Box(PrivateKey(decode_key(self.private_b64, "private key")),
                        PublicKey(decode_key(self.peer_public_b64, "public key")))

    def seal(self, payload: dict[str, Any]) -> bytes:
        """Encrypt and authenticate one JSON object (random 24-byte nonce prepended)."""
        return bytes(self._box.encrypt(json.dumps(payload, separators=(",", ":")).encode()))

    def seal_bytes(self, data: bytes) -> bytes:
        return bytes(self._box.encrypt(data))

    def open_bytes(self, sealed: bytes) -> bytes:
        """The plaintext of a sealed message; `ProtocolError(BAD_SEAL)` if it does not open."""
        try:
            return bytes(self._box.decrypt(sealed))
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            raise ProtocolError(ErrorCode.BAD_SEAL, "the message does not open under this key") from None

    def open(self, sealed: bytes) -> tuple[bytes, dict[str, Any]]:
        """(nonce, payload) of a sealed message; `ProtocolError(BAD_SEAL)` if it does not open."""
        try:
            plain = self._box.decrypt(sealed)
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            raise ProtocolError(ErrorCode.BAD_SEAL, "the body does not open under this machine key") from None
        try:
            payload = json.loads(plain)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "the sealed body is not JSON") from None
        if not isinstance(payload, dict):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "the sealed body must be a JSON object")
        return bytes(sealed[:Box.NONCE_SIZE]), payload


class ReplayGuard:
    """Refuses stale timestamps and nonces seen within the skew window (sans-I/O; time passed in)."""

    def __init__(self, window: float = MAX_SKEW, max_entries: int = 1_000_000) -> None:
        self.window = window
        self.max_entries = max_entries
        self._seen: dict[bytes, float] = {}

    def check(self, nonce: bytes, ts: Any, now: float) -> None:
        """Accept (and remember) one request or raise `ProtocolError(REPLAY)`."""
        if not isinstance(ts, (int, float)) or isinstance(ts, bool):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "ts must be a number (unix seconds)")
        if abs(now - ts) > self.window:
            raise ProtocolError(ErrorCode.REPLAY, f"timestamp is {now - ts:.0f}s off the server clock"
                                f" (allowed {self.window:.0f}s); check the node's clock")
        if nonce in self._seen:
            raise ProtocolError(ErrorCode.REPLAY, "this request was already received (replay)")
        if len(self._seen) >= self.max_entries:
            self.prune(now)
        self._seen[nonce] = now + 2 * self.window

    def prune(self, now: float) -> None:
        """Forget nonces whose timestamps can no longer pass the window check."""
        self._seen = {n: exp for n, exp in self._seen.items() if exp > now}


def node_key_proof(node_private_b64: str, server_public_b64: str, machine_public_b64: str,
                   ts: float) -> str:
    """Proof that the sender holds the node key: a box node->server over the machine key and ts."""
    box = Box(PrivateKey(decode_key(node_private_b64, "node private key")),
              PublicKey(decode_key(server_public_b64, "server key")))
    msg = _PROOF_CONTEXT + decode_key(machine_public_b64) + repr(float(ts)).encode()
    return base64.b64encode(bytes(box.encrypt(msg))).decode()


def verify_node_key_proof(proof_b64: Any, node_public_b64: str, server_private_b64: str,
                          machine_public_b64: str, ts: float) -> None:
    """Raise `ProtocolError(BAD_NODE_KEY_PROOF)` unless `proof_b64` was made with the node key."""
    if not isinstance(proof_b64, str):
        raise ProtocolError(ErrorCode.BAD_NODE_KEY_PROOF, "node_key_proof is missing")
    try:
        sealed = base64.b64decode(proof_b64, validate=True)
        box = Box(PrivateKey(decode_key(server_private_b64)), PublicKey(decode_key(node_public_b64, "node_key")))
        plain = box.decrypt(sealed)
    except (binascii.Error, ValueError, nacl.exceptions.CryptoError):
        raise ProtocolError(ErrorCode.BAD_NODE_KEY_PROOF, "node_key_proof was not made with node_key") from None
    expected = _PROOF_CONTEXT + decode_key(machine_public_b64) + repr(float(ts)).encode()
    if plain != expected:
        raise ProtocolError(ErrorCode.BAD_NODE_KEY_PROOF, "node_key_proof is for another machine or time")


def frame(sealed: bytes) -> bytes:
    """One length-prefixed stream frame."""
    return _FRAME_HEADER.pack(len(sealed)) + sealed


class FrameReader:
    """Splits a byte stream into frames (sans-I/O: feed bytes, get complete frames)."""

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= 4:
            (length,) = _FRAME_HEADER.unpack_from(self._buf)
            if length > self.max_frame:
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"frame of {length} bytes exceeds {self.max_frame}")
            if len(self._buf) < 4 + length:
                break
            out.append(bytes(self._buf[4:4 + length]))
            del self._buf[:4 + length]
        return out


def random_token(nbytes: int = 32) -> bytes:
    return nacl.utils.random(nbytes)
