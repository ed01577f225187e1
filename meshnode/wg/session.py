"""A transport session (keypair): the two ChaCha20-Poly1305 keys a handshake yields, the send
counter and the receive replay window. A peer holds up to three: previous, current and next."""

from __future__ import annotations

import itertools
import struct
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .messages import MessageType
from .noise import SessionKeys
from .replay import ReplayWindow


class Keypair:
    """One direction-pair of transport keys, identified on the wire by `local_index`."""

    __slots__ = ("send", "recv", "local_index", "remote_index", "is_initiator", "created",
                 "send_counter", "replay", "peer", "header_prefix")

    def __init__(self, keys: SessionKeys, peer: Any, now: float) -> None:
        self.send = ChaCha20Poly1305(keys.send_key)
        self.recv = ChaCha20Poly1305(keys.recv_key)
        self.local_index = keys.local_index
        self.remote_index = keys.remote_index
        self.is_initiator = keys.is_initiator
        self.created = now
        # next() on itertools.count is atomic under the GIL: the TUN thread and the timer thread
        # (keepalives) may both send without a lock and never reuse a nonce.
        self.send_counter = itertools.count()
        self.replay = ReplayWindow()
        self.peer = peer
        # type and receiver index never change for this keypair: precomputed header bytes.
        self.header_prefix = struct.pack("<II", MessageType.TRANSPORT, keys.remote_index)
