"""Ed25519 for the authority (pynacl): a tailnet-lock private key signs AUMs and node keys.

Private keys are kept as 32-byte seeds. Verification goes through libsodium, which is stricter than
the ZIP-215 rules Go's ed25519consensus applies (it refuses small-order points and non-canonical
encodings): a signature honest Go or Python code produces verifies on both.
"""

from __future__ import annotations

from dataclasses import dataclass

import nacl.exceptions
import nacl.signing

from .aum import AUM, Signature
from .errors import DecodeError
from .limits import ED25519_PUBLIC_SIZE, ED25519_SIGNATURE_SIZE


@dataclass(frozen=True)
class LockPrivateKey:
    """A node's tailnet-lock signing key (Tailscale's NLPrivate)."""

    seed: bytes

    def __post_init__(self) -> None:
        if len(self.seed) != 32:
            raise DecodeError(f"a tailnet-lock private key is 32 bytes, got {len(self.seed)}")

    @classmethod
    def generate(cls) -> "LockPrivateKey":
        return cls(bytes(nacl.signing.SigningKey.generate()))

    @property
    def public(self) -> bytes:
        return bytes(nacl.signing.SigningKey(self.seed).verify_key)

    def sign(self, message: bytes) -> bytes:
        return nacl.signing.SigningKey(self.seed).sign(message).signature

    def sign_aum(self, aum: AUM) -> AUM:
        """`aum` with this key's signature appended (SignAUM)."""
        sig = Signature(key_id=self.public, signature=self.sign(aum.sig_hash))
        return aum.with_signatures(aum.signatures + (sig,))


def verify(public: bytes, message: bytes, signature: bytes | None) -> bool:
    """True if `signature` is a valid Ed25519 signature of `message` by `public`."""
    if len(public) != ED25519_PUBLIC_SIZE or signature is None or len(signature) != ED25519_SIGNATURE_SIZE:
        return False
    try:
        nacl.signing.VerifyKey(public).verify(message, signature)
        return True
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, nacl.exceptions.TypeError):
        return False


def key_proof_message(node_key: bytes) -> bytes:
    """What a node signs with its lock key when it reports that key to the control server
    (`/machine/tka/key`), to show it holds it: otherwise a node could claim a trusted node's lock
    key and be signed by a `lock init` that trusts that key. meshnode's own, not Tailscale's."""
    return b"meshnode-tka-lock-key-proof\x00" + node_key
