"""Tailscale's text forms for Tailnet Lock, so users' habits and scripts carry over.

    tlpub:HEX[?VOTES]          a trusted (signing) key; `nlpub:` is accepted as Tailscale does
    nlpriv:HEX                 a node's lock private key (its state file; Ed25519 seed + public)
    disablement-secret:HEX     a disablement secret (printed once by `lock init`)
    disablement:HEX            a disablement value (the Argon2 KDF of a secret; public)
    nodekey:HEX or base64      a node key (`control nodes ls --json` shows base64)
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from .errors import DecodeError
from .key import Key, ed25519_key
from .signing import LockPrivateKey

PUB_PREFIX = "tlpub:"
PUB_PREFIX_OLD = "nlpub:"
PRIV_PREFIX = "nlpriv:"
SECRET_PREFIX = "disablement-secret:"
VALUE_PREFIX = "disablement:"


def format_public(public: bytes) -> str:
    return PUB_PREFIX + public.hex()


def parse_public(text: str) -> bytes:
    """32 raw bytes of a `tlpub:`/`nlpub:` key."""
    for prefix in (PUB_PREFIX, PUB_PREFIX_OLD):
        if text.startswith(prefix):
            try:
                raw = bytes.fromhex(text[len(prefix):])
            except ValueError:
                raise DecodeError(f"key {text!r}: not hex after {prefix}") from None
            if len(raw) != 32:
                raise DecodeError(f"key {text!r}: {len(raw)} bytes, want 32")
            return raw
    raise DecodeError(f"key {text!r}: key hex string doesn't have expected type prefix {PUB_PREFIX}")


def parse_key_arg(text: str) -> Key:
    """`tlpub:HEX[?VOTES]` as `lock init`/`lock add` take it (one vote unless told)."""
    pub, sep, votes = text.partition("?")
    n = 1
    if sep:
        try:
            n = int(votes)
        except ValueError:
            raise DecodeError(f"key {text!r}: votes {votes!r} is not a number") from None
    key = ed25519_key(parse_public(pub), n)
    key.static_validate()
    return key


def format_private(key: LockPrivateKey) -> str:
    return PRIV_PREFIX + (key.seed + key.public).hex()


def parse_private(text: str) -> LockPrivateKey:
    text = text.strip()
    if not text.startswith(PRIV_PREFIX):
        raise DecodeError(f"lock private key: expected {PRIV_PREFIX} prefix")
    try:
        raw = bytes.fromhex(text[len(PRIV_PREFIX):])
    except ValueError:
        raise DecodeError("lock private key: not hex") from None
    if len(raw) != 64:
        raise DecodeError(f"lock private key: {len(raw)} bytes, want 64")
    key = LockPrivateKey(raw[:32])
    if key.public != raw[32:]:
        raise DecodeError("lock private key: public half does not match the seed")
    return key


@dataclass(frozen=True)
class Disablement:
    is_secret: bool  # True: a secret; False: an already derived value
    raw: bytes


def format_secret(secret: bytes) -> str:
    return SECRET_PREFIX + secret.hex().upper()  # Tailscale prints %X


def parse_disablement(text: str) -> Disablement:
    for prefix, is_secret in ((SECRET_PREFIX, True), (VALUE_PREFIX, False)):
        if text.startswith(prefix):
            try:
                return Disablement(is_secret, bytes.fromhex(text[len(prefix):]))
            except ValueError:
                raise DecodeError(f"{prefix} value is not hex") from None
    raise DecodeError(f'expected value with "{VALUE_PREFIX}" or "{SECRET_PREFIX}" prefix, got {text!r}')


def parse_node_key(text: str) -> bytes:
    """A node key from `nodekey:HEX` or standard base64 (32 bytes)."""
    if text.startswith("nodekey:"):
        try:
            raw = bytes.fromhex(text[len("nodekey:"):])
        except ValueError:
            raise DecodeError(f"node key {text!r}: not hex") from None
    else:
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise DecodeError(f"node key {text!r}: neither nodekey:HEX nor base64") from None
    if len(raw) != 32:
        raise DecodeError(f"node key {text!r}: {len(raw)} bytes, want 32")
    return raw


def format_node_key(raw: bytes) -> str:
    return base64.b64encode(raw).decode()
