"""The primitives of WireGuard's Noise construction: BLAKE2s hash/HMAC/KDF, keyed MACs, Curve25519 and
the two AEADs. Everything above this module speaks in these functions only."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
    crypto_scalarmult,
    crypto_scalarmult_base,
)
from nacl.exceptions import CryptoError
from nacl.exceptions import RuntimeError as NaclRuntimeError

KEY_LEN = 32
TAG_LEN = 16
MAC_LEN = 16

# The nonce of a transport or handshake AEAD: 32 zero bits then the 64-bit little-endian counter.
_NONCE = struct.Struct("<4xQ")


class WgCryptoError(Exception):
    """Base class of the crypto failures a packet can provoke (all are 'drop and count')."""


class DecryptError(WgCryptoError):
    """An AEAD tag did not verify: forged, corrupted or keyed for someone else."""


class ZeroSharedSecretError(WgCryptoError):
    """Curve25519 gave the all-zero point (a low-order public key): WireGuard rejects it."""


class KeyFormatError(ValueError):
    """A key is not 32 bytes of base64 (wg's text form)."""


def blake2s_hash(*parts: bytes) -> bytes:
    """HASH(a || b || ...): BLAKE2s-256."""
    h = hashlib.blake2s()
    for p in parts:
        h.update(p)
    return h.digest()


def hmac_blake2s(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2s-256 (RFC 2104 over BLAKE2s, block size 64), as the Noise KDF needs."""
    return hmac.new(key, data, hashlib.blake2s).digest()


def kdf(chaining_key: bytes, data: bytes, n: int) -> tuple[bytes, ...]:
    """HKDF over HMAC-BLAKE2s giving `n` (1..3) 32-byte outputs."""
    t0 = hmac_blake2s(chaining_key, data)
    out: list[bytes] = []
    prev = b""
    for i in range(1, n + 1):
        prev = hmac_blake2s(t0, prev + bytes((i,)))
        out.append(prev)
    return tuple(out)


def mac(key: bytes, data: bytes) -> bytes:
    """MAC(key, data): keyed BLAKE2s with a 16-byte digest (mac1, mac2, cookies)."""
    return hashlib.blake2s(data, digest_size=MAC_LEN, key=key).digest()


def nonce(counter: int) -> bytes:
    """The 96-bit ChaCha20-Poly1305 nonce for `counter`."""
    return _NONCE.pack(counter)


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    """ChaCha20-Poly1305 seal (handshake use: a fresh cipher object per call is fine there)."""
    return ChaCha20Poly1305(key).encrypt(_NONCE.pack(counter), plaintext, ad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, ad: bytes) -> bytes:
    """ChaCha20-Poly1305 open; raises DecryptError on a bad tag."""
    try:
        return ChaCha20Poly1305(key).decrypt(_NONCE.pack(counter), ciphertext, ad)
    except InvalidTag:
        raise DecryptError("bad AEAD tag") from None


def xaead_encrypt(key: bytes, nonce24: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """XChaCha20-Poly1305 seal (cookie replies)."""
    return crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce24, key)


def xaead_decrypt(key: bytes, nonce24: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    """XChaCha20-Poly1305 open; raises DecryptError on a bad tag."""
    try:
        return crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, ad, nonce24, key)
    except CryptoError:
        raise DecryptError("bad cookie tag") from None


def dh(private: bytes, public: bytes) -> bytes:
    """Curve25519 shared secret; raises ZeroSharedSecretError for a low-order peer key."""
    try:
        out = crypto_scalarmult(private, public)
    except NaclRuntimeError:
        # libsodium refuses an all-zero result; pynacl reports it as a generic library error.
        raise ZeroSharedSecretError("all-zero Curve25519 result") from None
    if not any(out):
        raise ZeroSharedSecretError("all-zero Curve25519 result")
    return out


def clamp(private: bytes) -> bytes:
    """Curve25519 clamping, as `wg genkey` applies (libsodium clamps internally too)."""
    b = bytearray(private)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def public_key(private: bytes) -> bytes:
    """The Curve25519 public key of `private`."""
    return crypto_scalarmult_base(clamp(private))


def decode_key(text: str) -> bytes:
    """A wg-format key (base64 of 32 bytes) as bytes; raises KeyFormatError."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyFormatError("key is not valid base64") from None
    if len(raw) != KEY_LEN:
        raise KeyFormatError(f"key decodes to {len(raw)} bytes, expected 32")
    return raw


def encode_key(raw: bytes) -> str:
    """The wg text form of a 32-byte key."""
    return base64.b64encode(raw).decode("ascii")
