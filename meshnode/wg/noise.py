"""Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s exactly as WireGuard runs it (paper section 5.4,
wireguard-go noise-protocol.go). Pure functions over bytes: the caller injects ephemeral private
keys, sender indices and timestamps, so every message is reproducible in tests.

Message bodies here exclude mac1/mac2; cookie.py appends those."""

from __future__ import annotations

from dataclasses import dataclass

from . import messages as m
from .crypto import (
    DecryptError,
    aead_decrypt,
    aead_encrypt,
    blake2s_hash,
    dh,
    kdf,
    public_key,
)
from .tai64n import TIMESTAMP_LEN

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
INITIAL_CHAIN_KEY = blake2s_hash(CONSTRUCTION)
INITIAL_HASH = blake2s_hash(INITIAL_CHAIN_KEY, IDENTIFIER)
ZERO_PSK = bytes(32)


class HandshakeError(Exception):
    """A handshake message that does not decrypt or does not fit the state (drop and count)."""


@dataclass(frozen=True)
class StaticIdentity:
    """Our long-term Curve25519 key pair."""

    private: bytes
    public: bytes

    @classmethod
    def from_private(cls, private: bytes) -> StaticIdentity:
        return cls(private, public_key(private))


@dataclass(frozen=True)
class InitiatorState:
    """What the initiator keeps between sending an initiation and receiving the response."""

    chain_key: bytes
    hash: bytes
    ephemeral_private: bytes
    sender_index: int


@dataclass(frozen=True)
class ReceivedInitiation:
    """A decrypted initiation: who sent it and the state the response continues from."""

    remote_static: bytes
    remote_ephemeral: bytes
    sender_index: int
    timestamp: bytes
    chain_key: bytes
    hash: bytes


@dataclass(frozen=True)
class SessionKeys:
    """The transport keys a completed handshake yields."""

    send_key: bytes
    recv_key: bytes
    local_index: int
    remote_index: int
    is_initiator: bool


def _mix_hash(h: bytes, data: bytes) -> bytes:
    return blake2s_hash(h, data)


def create_initiation(local: StaticIdentity, remote_static: bytes, static_static: bytes,
                      ephemeral_private: bytes, sender_index: int,
                      timestamp: bytes) -> tuple[bytes, InitiatorState]:
    """Build the 116-byte initiation body (before MACs) and the initiator's state.

    `static_static` is DH(our static, their static), precomputed once per peer."""
    h = _mix_hash(INITIAL_HASH, remote_static)
    e_pub = public_key(ephemeral_private)
    (ck,) = kdf(INITIAL_CHAIN_KEY, e_pub, 1)
    h = _mix_hash(h, e_pub)
    ck, key = kdf(ck, dh(ephemeral_private, remote_static), 2)
    enc_static = aead_encrypt(key, 0, local.public, h)
    h = _mix_hash(h, enc_static)
    ck, key = kdf(ck, static_static, 2)
    enc_time = aead_encrypt(key, 0, timestamp, h)
    h = _mix_hash(h, enc_time)
    body = m.INITIATION.pack(m.MessageType.INITIATION, sender_index, e_pub, enc_static, enc_time,
                             b"", b"")[: m.INITIATION_MAC1_OFFSET]
    return body, InitiatorState(ck, h, ephemeral_private, sender_index)


def open_initiation_static(local: StaticIdentity, msg: bytes) -> tuple[bytes, bytes, bytes]:
    """First half of consuming an initiation: one DH to learn the sender's static key.

    Returns (remote static, chain key, hash). The caller looks the key up in its peers before
    spending anything more, so an unknown sender costs exactly this one DH."""
    _, _, e_pub, enc_static, _, _, _ = m.INITIATION.unpack(msg)
    h = _mix_hash(_mix_hash(INITIAL_HASH, local.public), e_pub)
    (ck,) = kdf(INITIAL_CHAIN_KEY, e_pub, 1)
    ck, key = kdf(ck, dh(local.private, e_pub), 2)
    try:
        remote_static = aead_decrypt(key, 0, enc_static, h)
    except DecryptError:
        raise HandshakeError("initiation static does not decrypt") from None
    return remote_static, ck, _mix_hash(h, enc_static)


def open_initiation_rest(msg: bytes, remote_static: bytes, chain_key: bytes, h: bytes,
                         static_static: bytes) -> ReceivedInitiation:
    """Second half: the timestamp, under the key mixed from DH(static, static)."""
    _, sender, e_pub, _, enc_time, _, _ = m.INITIATION.unpack(msg)
    ck, key = kdf(chain_key, static_static, 2)
    try:
        timestamp = aead_decrypt(key, 0, enc_time, h)
    except DecryptError:
        raise HandshakeError("initiation timestamp does not decrypt") from None
    if len(timestamp) != TIMESTAMP_LEN:
        raise HandshakeError("initiation timestamp has the wrong length")
    return ReceivedInitiation(remote_static, e_pub, sender, timestamp, ck, _mix_hash(h, enc_time))


def create_response(init: ReceivedInitiation, psk: bytes, ephemeral_private: bytes,
                    sender_index: int) -> tuple[bytes, SessionKeys]:
    """Build the 60-byte response body (before MACs) and the responder's transport keys."""
    e_pub = public_key(ephemeral_private)
    h = _mix_hash(init.hash, e_pub)
    (ck,) = kdf(init.chain_key, e_pub, 1)
    (ck,) = kdf(ck, dh(ephemeral_private, init.remote_ephemeral), 1)
    (ck,) = kdf(ck, dh(ephemeral_private, init.remote_static), 1)
    ck, tau, key = kdf(ck, psk, 3)
    h = _mix_hash(h, tau)
    empty = aead_encrypt(key, 0, b"", h)
    body = m.RESPONSE.pack(m.MessageType.RESPONSE, sender_index, init.sender_index, e_pub, empty,
                           b"", b"")[: m.RESPONSE_MAC1_OFFSET]
    recv_key, send_key = kdf(ck, b"", 2)
    return body, SessionKeys(send_key, recv_key, sender_index, init.sender_index, False)


def consume_response(state: InitiatorState, local: StaticIdentity, psk: bytes,
                     msg: bytes) -> SessionKeys:
    """Check a response against our pending initiation and derive the initiator's keys."""
    _, sender, receiver, e_pub, empty, _, _ = m.RESPONSE.unpack(msg)
    if receiver != state.sender_index:
        raise HandshakeError("response is for another initiation")
    h = _mix_hash(state.hash, e_pub)
    (ck,) = kdf(state.chain_key, e_pub, 1)
    (ck,) = kdf(ck, dh(state.ephemeral_private, e_pub), 1)
    (ck,) = kdf(ck, dh(local.private, e_pub), 1)
    ck, tau, key = kdf(ck, psk, 3)
    h = _mix_hash(h, tau)
    try:
        aead_decrypt(key, 0, empty, h)
    except DecryptError:
        raise HandshakeError("response does not decrypt") from None
    send_key, recv_key = kdf(ck, b"", 2)
    return SessionKeys(send_key, recv_key, state.sender_index, sender, True)
