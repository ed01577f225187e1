"""The sealed disco datagram: MAGIC, the sender's 32-byte disco public key, a 24-byte nonce and a
NaCl box (Curve25519, XSalsa20-Poly1305) of the plaintext message, as tailscale sends it
(magicsock sendDiscoMessage, key.DiscoShared.Seal). A disco key lives for one run of the node."""

from __future__ import annotations

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from .messages import KEY_LEN, MAGIC, NONCE_LEN, DiscoError, Message, decode, encode

HEADER_LEN = len(MAGIC) + KEY_LEN
MIN_LEN = HEADER_LEN + NONCE_LEN


def looks_like_disco(data: bytes | memoryview) -> bool:
    """True if `data` has the disco magic and room for a key and a nonce (cheap, no crypto)."""
    return len(data) >= MIN_LEN and data[:len(MAGIC)] == MAGIC


def sender_key(data: bytes | memoryview) -> bytes:
    """The disco public key of the datagram's sender (unauthenticated until opened)."""
    if not looks_like_disco(data):
        raise DiscoError("not a disco datagram")
    return bytes(data[len(MAGIC):HEADER_LEN])


class DiscoKey:
    """This node's disco key pair (a fresh one each start, as tailscaled does)."""

    def __init__(self, private: bytes | None = None) -> None:
        self._private = PrivateKey(private) if private is not None else PrivateKey.generate()
        self.public = bytes(self._private.public_key)

    def box_with(self, peer_public: bytes) -> "PeerBox":
        """The precomputed shared box between us and the holder of `peer_public`."""
        return PeerBox(self, peer_public)


class PeerBox:
    """Seals datagrams for one peer's disco key and opens theirs (one DH, done once)."""

    def __init__(self, ours: DiscoKey, peer_public: bytes) -> None:
        if len(peer_public) != KEY_LEN:
            raise DiscoError("a disco key is 32 bytes")
        self.peer_public = bytes(peer_public)
        self._header = MAGIC + ours.public
        self._box = Box(ours._private, PublicKey(self.peer_public))

    def seal(self, msg: Message, nonce: bytes | None = None) -> bytes:
        """The datagram carrying `msg` to the peer (a random nonce unless one is given)."""
        sealed = self._box.encrypt(encode(msg), nonce)  # nonce || box, as Go's Seal returns
        return self._header + bytes(sealed)

    def open(self, data: bytes | memoryview) -> Message:
        """The message in a datagram from the peer; raises DiscoError if it is not theirs, was
        tampered with, or does not parse."""
        if not looks_like_disco(data):
            raise DiscoError("not a disco datagram")
        if bytes(data[len(MAGIC):HEADER_LEN]) != self.peer_public:
            raise DiscoError("sealed by another disco key")
        try:
            plain = self._box.decrypt(bytes(data[HEADER_LEN:]))
        except CryptoError:
            raise DiscoError("box does not open") from None
        return decode(plain)
