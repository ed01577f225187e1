"""The node <-> control wire protocol: keys, sealed messages, replay protection, stream frames.

Sans-I/O: pure functions and one small state machine (`ReplayGuard`); time is passed in.

Security design (see the module docstring of `server.py` for the HTTP side):
- The server has a long-term Curve25519 key; its public half is served at GET /key (a node pins it
  on first use and keeps it in its state directory).
- Every node request body is `Box(machine_priv, server_pub).encrypt(json)`, with the machine public
  key in the `X-Meshnode-Machine-Key` header. Only the holder of that machine key can produce a box
  that opens under it, so the header cannot be forged: the request authenticates the machine.
- Each request carries `ts` (unix seconds). The server refuses a `ts` outside +-MAX_SKEW seconds, and
  per machine key anything at or below the newest `ts` it accepted (but for a few seconds of
  reordering, where the box nonce decides): `ReplayGuard`. The newest `ts` of each registered machine
  is persisted, so a captured request cannot be replayed, even after a server restart.
- Every answer (and every frame of the map stream) is `Box(server_priv, machine_pub)`: only that
  machine can read it, and only the server can have written it. So is every refusal of a request
  that opened (with the request's nonce in `re`): a node changes its login state only on such a
  refusal, never on a plain HTTP error that anyone on the path could send.
- Registration also proves possession of the WireGuard node key: `node_key_proof` is a box from the
  node key to the server over the machine key and timestamp, so no one can register (and so hijack
  traffic to) a node key they do not hold.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import math
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import nacl.bindings
import nacl.exceptions
import nacl.utils
from nacl.public import Box, PrivateKey, PublicKey

PROTOCOL_VERSION = 1
MACHINE_KEY_HEADER = "X-Meshnode-Machine-Key"
SEALED_HEADER = "X-Meshnode-Sealed"   # on an error answer sealed to the requesting machine
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
    RATE_LIMITED = "rate_limited"          # too many requests from unregistered machine keys
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


_NONCE = Box.NONCE_SIZE


@dataclass
class Channel:
    """One side of a sealed channel between a machine key and the server key."""

    private_b64: str
    peer_public_b64: str
    _box: Box = field(init=False, repr=False)
    _shared: bytes = field(init=False, repr=False)   # the Curve25519 shared key Box precomputed

    def __post_init__(self) -> None:
        self._box = Box(PrivateKey(decode_key(self.private_b64, "private key")),
                        PublicKey(decode_key(self.peer_public_b64, "public key")))
        self._shared = self._box.shared_key()

    def seal(self, payload: dict[str, Any]) -> bytes:
        """Encrypt and authenticate one JSON object (random 24-byte nonce prepended)."""
        return bytes(self._box.encrypt(json.dumps(payload, separators=(",", ":")).encode()))

    def seal_bytes(self, data: bytes) -> bytes:
        """`data` sealed: a random 24-byte nonce, then the box (what `Box.encrypt` gives, without its
        EncryptedMessage and the copies it makes: this runs once per stream frame on the server)."""
        nonce = nacl.utils.random(_NONCE)
        return nonce + nacl.bindings.crypto_box_easy_afternm(data, nonce, self._shared)

    def open_bytes(self, sealed: bytes) -> bytes:
        """The plaintext of a sealed message; `ProtocolError(BAD_SEAL)` if it does not open.

        Straight to libsodium with the shared key `Box` precomputed (a node opens one of these per
        map frame; `Box.decrypt` adds an encoder pass and a copy)."""
        try:
            if len(sealed) < _NONCE:
                raise ValueError("too short")
            return nacl.bindings.crypto_box_open_easy_afternm(sealed[_NONCE:], sealed[:_NONCE],
                                                             self._shared)
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            raise ProtocolError(ErrorCode.BAD_SEAL, "the message does not open under this key") from None

    def open(self, sealed: bytes) -> tuple[bytes, dict[str, Any]]:
        """(nonce, payload) of a sealed message; `ProtocolError(BAD_SEAL)` if it does not open."""
        try:
            plain = self._box.decrypt(sealed)
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            raise ProtocolError(ErrorCode.BAD_SEAL, "the body does not open under this machine key") from None
        payload = parse_json(plain, "the sealed body")
        if not isinstance(payload, dict):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "the sealed body must be a JSON object")
        return bytes(sealed[:Box.NONCE_SIZE]), payload


@dataclass(slots=True)
class _Marks:
    """One machine key's replay state: the newest timestamp accepted and the nonces just below it."""

    high: float
    base: float                     # every timestamp at or below it is refused (persisted mark, floor)
    recent: dict[bytes, float] = field(default_factory=dict)   # nonce -> ts, ts within `reorder` of high


class ReplayGuard:
    """Refuses replayed and stale requests in O(1) time and bounded memory per machine key.

    Sans-I/O; time is passed in. Per machine key it keeps a timestamp high-water mark and the nonces
    of the few requests accepted within `reorder` seconds below it (requests sent at once may arrive
    out of order). A request is accepted when its timestamp is within `window` of `now` and either
    above the mark, or within `reorder` below it with a nonce not seen. Everything older is refused:
    a captured request can never be accepted twice, whatever the number of keys or requests.

    `load(machine_key)` gives a mark persisted by an earlier run (see `ControlStore.replay_mark`), so
    a request captured before a restart is refused after it. When more than `max_keys` keys are
    tracked, the least recently used is forgotten; if its mark could still matter, a global floor
    rises to it, so forgetting never lets a replay through (it can only refuse a lagging clock).
    """

    def __init__(self, window: float = MAX_SKEW, *, reorder: float = 5.0, per_key: int = 64,
                 max_keys: int = 100_000, load: Callable[[str], float | None] | None = None) -> None:
        self.window = window
        self.reorder = reorder
        self.per_key = per_key
        self.max_keys = max_keys
        self._load = load
        self._keys: OrderedDict[str, _Marks] = OrderedDict()
        self._floor = -math.inf

    def __len__(self) -> int:
        return len(self._keys)

    def entries(self, machine_key: str) -> int:
        """How many nonces are remembered for one key (at most `per_key`)."""
        marks = self._keys.get(machine_key)
        return len(marks.recent) if marks else 0

    def check(self, machine_key: str, nonce: bytes, ts: Any, now: float) -> float:
        """Accept (and remember) one request or raise `ProtocolError(REPLAY)`; returns its timestamp."""
        ts = check_timestamp(ts)
        if abs(now - ts) > self.window:
            raise ProtocolError(ErrorCode.REPLAY, f"timestamp is {now - ts:.0f}s off the server clock"
                                f" (allowed {self.window:.0f}s); check the node's clock")
        marks = self._keys.get(machine_key)
        if marks is None:
            loaded = self._load(machine_key) if self._load is not None else None
            # Nothing at or below a persisted mark was seen by this run: all of it counts as replayed.
            base = max(loaded if loaded is not None else -math.inf, self._floor)
            marks = _Marks(base, base)
        if ts > marks.high:
            if ts - marks.high > self.reorder:
                marks.recent.clear()
            elif len(marks.recent) >= self.per_key:
                # Full: forget the nonce remembered longest (dicts keep insertion order, so this is
                # O(1)) and refuse everything at or below its timestamp from now on: bounded memory
                # never opens a replay, it can only refuse a request reordered behind 64 newer ones.
                oldest = next(iter(marks.recent))
                marks.base = max(marks.base, marks.recent.pop(oldest))
            marks.high = ts
        elif ts <= marks.base or ts < marks.high - self.reorder:
            raise ProtocolError(ErrorCode.REPLAY, "this request is older than one already received (replay)")
        elif nonce in marks.recent:
            raise ProtocolError(ErrorCode.REPLAY, "this request was already received (replay)")
        elif len(marks.recent) >= self.per_key:
            raise ProtocolError(ErrorCode.REPLAY, "too many requests at once from this machine; retry")
        marks.recent[nonce] = ts
        self._keys[machine_key] = marks
        self._keys.move_to_end(machine_key)
        while len(self._keys) > self.max_keys:
            _, old = self._keys.popitem(last=False)
            if old.high >= now - self.window:
                self._floor = max(self._floor, old.high)
        return ts


class TokenBucket:
    """`rate` events a second with bursts up to `burst` (sans-I/O; time passed in)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._tokens, self._at = burst, -math.inf

    def allow(self, now: float) -> bool:
        if self._at > -math.inf:
            self._tokens = min(self.burst, self._tokens + max(0.0, now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


MAX_JSON_DEPTH = 32
_MAX_INT_DIGITS = 32


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise _BadNumber(f"a number of {len(text)} digits")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or len(text) > 64:
        raise _BadNumber(f"the number {text[:20]}{'...' if len(text) > 20 else ''} is out of range")
    return value


def _parse_constant(name: str) -> float:
    raise _BadNumber(f"{name} is not a number JSON allows")


class _BadNumber(ValueError):
    pass


def json_depth_ok(obj: Any, limit: int) -> bool:
    """True when parsed JSON nests no deeper than `limit` (checked without recursion)."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = list(value.values())
        elif not isinstance(value, list):
            continue
        if depth > limit:
            return False
        stack.extend((v, depth + 1) for v in value if isinstance(v, (dict, list)))
    return True


def parse_json(data: bytes | str, what: str = "the body") -> Any:
    """Strict JSON from the network: no NaN/Infinity, no huge numbers, at most MAX_JSON_DEPTH deep.

    Anything else is `ProtocolError(BAD_REQUEST)` with a one-line reason: Python's own parser would
    accept NaN, raise ValueError past 4300 digits and RecursionError on deep nesting (a 500).
    """
    try:
        obj = json.loads(data, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except _BadNumber as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{what}: {exc}") from None
    except RecursionError:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{what} is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else "invalid"
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{what} is not JSON ({reason})") from None
    if not json_depth_ok(obj, MAX_JSON_DEPTH):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")
    return obj


def check_timestamp(ts: Any) -> float:
    """A request timestamp as a finite float; `ProtocolError(BAD_REQUEST)` for anything else
    (NaN compares false with everything, so it would slip past every window check)."""
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "ts must be a number (unix seconds)")
    try:
        value = float(ts)
    except OverflowError:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "ts is out of range") from None
    if not math.isfinite(value):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "ts must be a finite number (unix seconds)")
    return value


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
