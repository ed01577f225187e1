"""mac1/mac2 and cookie replies: the DoS defence in front of the handshake.

mac1 proves the sender knows our public key (checked before any DH). Under load a responder
also demands mac2, keyed by a cookie bound to the sender's address, which it hands out in an
XChaCha20-Poly1305-sealed cookie reply instead of doing the handshake."""

from __future__ import annotations

import hmac
from typing import Callable

from . import messages as m
from .crypto import DecryptError, blake2s_hash, mac, xaead_decrypt, xaead_encrypt

LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"
COOKIE_REFRESH_TIME = 120.0  # seconds a cookie (and the responder's secret) stays good

_MAC_OFFSETS = {m.INITIATION_SIZE: m.INITIATION_MAC1_OFFSET, m.RESPONSE_SIZE: m.RESPONSE_MAC1_OFFSET}


class CookieError(Exception):
    """A cookie reply that is unexpected or does not decrypt."""


def _mac1_offset(msg: bytes) -> int:
    try:
        return _MAC_OFFSETS[len(msg)]
    except KeyError:
        raise ValueError("not a handshake message") from None


class CookieChecker:
    """Responder side, for our own public key: verify mac1/mac2 and issue cookies."""

    def __init__(self, our_public: bytes, rng: Callable[[int], bytes]) -> None:
        self._mac1_key = blake2s_hash(LABEL_MAC1, our_public)
        self._cookie_key = blake2s_hash(LABEL_COOKIE, our_public)
        self._rng = rng
        self._secret = rng(32)
        self._secret_time = float("-inf")

    def check_mac1(self, msg: bytes) -> bool:
        """Does mac1 prove the sender knows our public key? (No DH spent yet.)"""
        off = _mac1_offset(msg)
        return hmac.compare_digest(mac(self._mac1_key, msg[:off]), msg[off:off + 16])

    def _cookie(self, src: bytes, now: float) -> bytes:
        if now - self._secret_time > COOKIE_REFRESH_TIME:
            self._secret = self._rng(32)
            self._secret_time = now
        return mac(self._secret, src)

    def check_mac2(self, msg: bytes, src: bytes, now: float) -> bool:
        """Does mac2 carry a cookie we issued to `src` (address bytes) recently?"""
        off = _mac1_offset(msg) + 16
        if now - self._secret_time > COOKIE_REFRESH_TIME:
            return False
        want = mac(mac(self._secret, src), msg[:off])
        return hmac.compare_digest(want, msg[off:off + 16])

    def create_reply(self, msg: bytes, receiver_index: int, src: bytes, now: float) -> bytes:
        """The type-3 message answering `msg` from `src` with a fresh cookie."""
        off = _mac1_offset(msg)
        nonce24 = self._rng(24)
        sealed = xaead_encrypt(self._cookie_key, nonce24, self._cookie(src, now), msg[off:off + 16])
        return m.COOKIE_REPLY.pack(m.MessageType.COOKIE_REPLY, receiver_index, nonce24, sealed)


class CookieGenerator:
    """Initiator side, per peer: add mac1/mac2 to our messages and accept the peer's cookies."""

    def __init__(self, peer_public: bytes) -> None:
        self._mac1_key = blake2s_hash(LABEL_MAC1, peer_public)
        self._cookie_key = blake2s_hash(LABEL_COOKIE, peer_public)
        self._last_mac1: bytes | None = None
        self._cookie: bytes | None = None
        self._cookie_time = float("-inf")

    def add_macs(self, body: bytes, now: float) -> bytes:
        """Append mac1 and mac2 (zeros unless we hold a fresh cookie) to a handshake body."""
        mac1 = mac(self._mac1_key, body)
        self._last_mac1 = mac1
        if self._cookie is not None and now - self._cookie_time < COOKIE_REFRESH_TIME:
            mac2 = mac(self._cookie, body + mac1)
        else:
            mac2 = bytes(16)
        return body + mac1 + mac2

    def consume_reply(self, msg: bytes, now: float) -> None:
        """Store the cookie of a type-3 message; raises CookieError if it is not for us."""
        if self._last_mac1 is None:
            raise CookieError("cookie reply without a message of ours to answer")
        _, _, nonce24, sealed = m.COOKIE_REPLY.unpack(msg)
        try:
            cookie = xaead_decrypt(self._cookie_key, nonce24, sealed, self._last_mac1)
        except DecryptError:
            raise CookieError("cookie reply does not decrypt") from None
        self._cookie = cookie
        self._cookie_time = now
        # One cookie per message we sent: a second reply to the same mac1 is a replay.
        self._last_mac1 = None
