"""Pre-auth keys (sans-I/O): the key text, its hash, and the rules that accept or refuse it.

A key reads `mskey-<id>-<secret>`: `id` (12 hex digits) is the lookup key, `secret` (32 random bytes,
hex) is stored only as its SHA-256. The secret is high-entropy, so a plain hash is enough (no
password stretching needed), and comparing hashes in constant time leaks nothing.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

PREFIX = "mskey"
_KEY = re.compile(r"^mskey-([0-9a-f]{12})-([0-9a-f]{64})$")
_DURATION = re.compile(r"^(\d+)([smhdw]?)$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class RefusalReason(enum.Enum):
    """Why a pre-auth key was refused; the values are the protocol's error codes."""

    UNKNOWN = "authkey_unknown"
    EXPIRED = "authkey_expired"
    USED = "authkey_used"
    REVOKED = "authkey_revoked"


class AuthKeyRefused(Exception):
    """A key that may not register a node; `reason` says which rule and `str()` says it in words."""

    def __init__(self, reason: RefusalReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class AuthKey:
    """A stored pre-auth key (never the secret itself)."""

    id: str
    user: str
    reusable: bool
    ephemeral: bool
    tags: tuple[str, ...]
    created: float
    expires: float | None
    used_count: int
    revoked: bool
    secret_hash: str

    def state(self, now: float) -> str:
        """'valid', 'used', 'expired' or 'revoked', for listings."""
        if self.revoked:
            return "revoked"
        if self.expires is not None and now >= self.expires:
            return "expired"
        if not self.reusable and self.used_count > 0:
            return "used"
        return "valid"


@dataclass(frozen=True, slots=True)
class NewKey:
    """A freshly generated key: `text` is shown once to the admin, the rest is stored."""

    id: str
    text: str
    secret_hash: str


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def generate() -> NewKey:
    key_id = secrets.token_hex(6)
    secret = secrets.token_hex(32)
    return NewKey(key_id, f"{PREFIX}-{key_id}-{secret}", hash_secret(secret))


def split(text: str) -> tuple[str, str]:
    """(id, secret) of a key as typed; `AuthKeyRefused(UNKNOWN)` if it is not shaped like one."""
    m = _KEY.match(text.strip())
    if not m:
        raise AuthKeyRefused(RefusalReason.UNKNOWN, "not a valid auth key (expected mskey-<id>-<secret>)")
    return m.group(1), m.group(2)


def check(stored: AuthKey | None, secret: str, now: float) -> None:
    """Accept the key or raise `AuthKeyRefused` with the precise reason.

    A wrong secret for an existing id reads the same as an unknown id, so the answer does not help
    anyone probe for ids.
    """
    if stored is None or not hmac.compare_digest(stored.secret_hash, hash_secret(secret)):
        raise AuthKeyRefused(RefusalReason.UNKNOWN, "auth key not recognised (unknown key or wrong secret)")
    if stored.revoked:
        raise AuthKeyRefused(RefusalReason.REVOKED, f"auth key {stored.id} was revoked")
    if stored.expires is not None and now >= stored.expires:
        raise AuthKeyRefused(RefusalReason.EXPIRED, f"auth key {stored.id} expired")
    if not stored.reusable and stored.used_count > 0:
        raise AuthKeyRefused(RefusalReason.USED, f"auth key {stored.id} is single-use and was already used")


def parse_duration(text: str) -> float:
    """'90d', '12h', '30m', '45s', '2w' or plain seconds -> seconds; ValueError otherwise."""
    m = _DURATION.match(text.strip().lower())
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"duration {text!r}: expected a positive number with s, m, h, d or w (e.g. 90d)")
    return float(int(m.group(1)) * _UNIT[m.group(2)])
