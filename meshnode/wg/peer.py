"""Peer configuration and status values, and the engine's mutable per-peer state."""

from __future__ import annotations

import collections
import ipaddress
from dataclasses import dataclass, field
from typing import Callable

from .cookie import CookieGenerator
from .noise import ZERO_PSK, InitiatorState
from .session import Keypair
from .timers import PeerTimers

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# As a socket gives it: (host, port) for IPv4, (host, port, flowinfo, scope_id) for IPv6.
Endpoint = tuple

STAGED_PACKETS_MAX = 128  # packets kept while a handshake is under way (wireguard-go's value)


@dataclass(frozen=True)
class PeerConfig:
    """What the configuration (wg-quick file or network map) says about one peer."""

    public_key: bytes
    preshared_key: bytes = ZERO_PSK
    endpoint: Endpoint | None = None
    allowed_ips: tuple[Network, ...] = ()
    persistent_keepalive: int = 0


@dataclass(frozen=True)
class PeerStats:
    """A snapshot of one peer for `status`: where it is, when we last shook hands, bytes moved."""

    public_key: bytes
    endpoint: Endpoint | None
    last_handshake: float | None  # Unix time
    rx_bytes: int
    tx_bytes: int
    allowed_ips: tuple[Network, ...] = field(default=())
    persistent_keepalive: int = 0
    # Data-plane liveness for the path layer, on the engine's clock (monotonic): when data last
    # went out, when anything authenticated last came in, and since when data sent has had no
    # answer at all (None: answered). WireGuard answers data within KEEPALIVE_TIMEOUT (10 s).
    last_sent: float | None = None
    last_received: float | None = None
    unanswered_since: float | None = None


class Peer:
    """Engine-internal state of a configured peer."""

    def __init__(self, config: PeerConfig, static_static: bytes | None,
                 jitter: Callable[[], float]) -> None:
        self.public_key = config.public_key
        self.preshared_key = config.preshared_key
        self.endpoint: Endpoint | None = config.endpoint
        self.allowed_ips = config.allowed_ips
        # DH(our static, their static): None when it is the zero point (peer cannot shake hands).
        self.static_static = static_static
        self.cookies = CookieGenerator(config.public_key)
        self.timers = PeerTimers(jitter, config.persistent_keepalive)
        self.current: Keypair | None = None
        self.previous: Keypair | None = None
        self.next: Keypair | None = None
        self.initiation: InitiatorState | None = None
        self.last_initiation_sent = float("-inf")
        self.last_timestamp = b""  # TAI64N of the newest initiation we accepted
        self.last_initiation_consumed = float("-inf")
        self.last_handshake: float | None = None  # Unix time
        self.staged: collections.deque[bytes] = collections.deque(maxlen=STAGED_PACKETS_MAX)
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.last_sent: float | None = None
        self.last_received: float | None = None
        self.unanswered_since: float | None = None

    def keypairs(self) -> list[Keypair]:
        return [kp for kp in (self.previous, self.current, self.next) if kp is not None]

    # Session lifecycle (wireguard-go's BeginSymmetricSession / ReceivedWithKeypair). Each returns
    # the keypairs that fell out, for the caller to forget in its index table.

    def install_initiated(self, kp: Keypair) -> list[Keypair]:
        """A response confirmed our initiation: `kp` becomes current at once."""
        if self.next is not None:
            dropped = [self.previous, self.current]
            self.previous, self.next = self.next, None
        else:
            dropped = [self.previous]
            self.previous = self.current
        self.current = kp
        return [d for d in dropped if d is not None]

    def install_responded(self, kp: Keypair) -> list[Keypair]:
        """We answered an initiation: `kp` waits in `next` until the initiator uses it."""
        dropped = [self.next, self.previous]
        self.next, self.previous = kp, None
        return [d for d in dropped if d is not None]

    def confirm_next(self, kp: Keypair) -> list[Keypair] | None:
        """Data arrived on `next`: it becomes current. None if `kp` is not (any longer) next."""
        if self.next is not kp:
            return None
        dropped = self.previous
        self.previous, self.current, self.next = self.current, kp, None
        return [dropped] if dropped is not None else []

    def stats(self) -> PeerStats:
        return PeerStats(self.public_key, self.endpoint, self.last_handshake, self.rx_bytes,
                         self.tx_bytes, self.allowed_ips, self.timers.persistent_keepalive,
                         self.last_sent, self.last_received, self.unanswered_since)
