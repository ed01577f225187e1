"""The sans-I/O WireGuard device: peers, the index table, handshakes, transport and timers.

Datagrams and inner packets go in as bytes with the current time. `receive_batch` hands back inner
packets for the TUN, `send_batch` sealed transport messages for the socket, and everything else to
send (handshake messages, cookie replies, keepalives, staged packets) is queued on `outbox` as
(bytes, endpoint). Nothing here opens a socket or reads a clock. Every bad input is dropped and
counted in `drops`; none raises.

Threading: the glue calls `send_batch`/`receive_batch` from its I/O thread(s), `tick` from a timer
thread and the configuration methods from the daemon's. The transport fast path takes no lock
(attribute reads of keypairs are atomic under the GIL and the send counter is an
itertools.count); everything that changes sessions, peers or handshakes holds `lock`. The packet
hooks (`inbound_filter`, `outbound_hook`) run on the I/O thread(s) and must neither block nor raise."""

from __future__ import annotations

import base64
import collections
import enum
import ipaddress
import logging
import os
import threading
from typing import Callable, Iterable

from cryptography.exceptions import InvalidTag

from . import messages as m
from . import noise
from .allowedips import AllowedIPs
from .cookie import CookieChecker, CookieError
from .crypto import _NONCE, ZeroSharedSecretError, dh, nonce
from .peer import Endpoint, Peer, PeerConfig, PeerStats
from .ratelimit import RateLimiter, source_key
from .replay import ReplayWindow
from .session import Keypair
from .tai64n import tai64n
from .timers import (
    HANDSHAKE_INITIATION_RATE,
    KEEPALIVE_TIMEOUT,
    MAX_TIMER_HANDSHAKES,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_BEFORE_REJECT,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
    Timer,
)

log = logging.getLogger(__name__)

DEFAULT_MTU = 1280
# Handshake messages per second above which we answer with cookies instead of doing DH.
DEFAULT_LOAD_THRESHOLD = 1000
UNDER_LOAD_AFTER = 1.0  # stay in cookie mode this long after the rate drops (wireguard-go)

# Hooks get the batch's `now` (the engine's clock, read once per batch), never a clock of their own.
PacketFilter = Callable[[bytes, bytes, float], bool]  # (inner packet, peer public key, now) -> accept?
OutboundHook = Callable[[bytes, bytes, float], None]  # (inner packet, peer public key, now): seen going out
Sealed = tuple[bytes, bytes, Endpoint]  # a transport message as (header, ciphertext, endpoint)


class Drop(enum.Enum):
    """Why a packet was dropped; `Engine.drops` counts each."""

    SHORT = "short"
    UNKNOWN_TYPE = "unknown_type"
    BAD_SIZE = "bad_size"
    MAC1 = "bad_mac1"
    UNDER_LOAD = "under_load_cookie_sent"
    RATE_LIMITED = "handshake_rate_limited"
    ZERO_DH = "zero_dh"
    HANDSHAKE_DECRYPT = "handshake_decrypt"
    UNKNOWN_PEER = "unknown_peer"
    REPLAYED_INITIATION = "replayed_initiation"
    FLOODED_INITIATION = "flooded_initiation"
    UNKNOWN_INDEX = "unknown_index"
    COOKIE_INVALID = "cookie_invalid"
    DATA_DECRYPT = "data_decrypt"
    REPLAYED_DATA = "replayed_data"
    EXPIRED_KEY = "expired_key"
    BAD_INNER_PACKET = "bad_inner_packet"
    SOURCE_NOT_ALLOWED = "source_not_allowed"
    FILTERED = "filtered"
    NO_ROUTE = "no_route"
    NO_ENDPOINT = "no_endpoint"


_WG_PREFIXES = frozenset({m.TRANSPORT_PREFIX, m.INITIATION_PREFIX, m.RESPONSE_PREFIX,
                          m.COOKIE_REPLY_PREFIX})


def short_key(public_key: bytes) -> str:
    """A peer key as logs show it (like `wg show`'s, shortened)."""
    return base64.b64encode(public_key).decode()[:10] + "…"


def endpoint_bytes(ep: Endpoint) -> bytes:
    """An endpoint as address bytes + port, the input of a cookie."""
    return ipaddress.ip_address(ep[0].split("%")[0]).packed + int(ep[1]).to_bytes(2, "big")


class Engine:
    """A WireGuard interface without I/O."""

    def __init__(self, private_key: bytes, *, mtu: int = DEFAULT_MTU,
                 rng: Callable[[int], bytes] = os.urandom, wall_offset: float = 0.0,
                 load_threshold: int = DEFAULT_LOAD_THRESHOLD) -> None:
        self.lock = threading.RLock()
        self.mtu = mtu
        self._rng = rng
        # Unix time = now + wall_offset: timers run on the caller's monotonic clock, TAI64N
        # timestamps and `last_handshake` need wall time.
        self.wall_offset = wall_offset
        self.load_threshold = load_threshold
        self.outbox: collections.deque[tuple[bytes, Endpoint]] = collections.deque()
        self.drops: collections.Counter[Drop] = collections.Counter()
        # Each read once per batch, so replacing one is a single atomic attribute write.
        self.inbound_filter: PacketFilter | None = None
        # Datagrams that are not WireGuard messages go here (run on the receive thread; must
        # neither block nor raise), else they are dropped as UNKNOWN_TYPE.
        self.other_datagram: Callable[[bytes, Endpoint], None] | None = None
        self.others = 0
        self.outbound_hook: OutboundHook | None = None
        # Called when a configuration change made a timer due at once (the glue's timer thread
        # otherwise sleeps until `next_deadline()`).
        self.timers_changed: Callable[[], None] | None = None
        self._peers: dict[bytes, Peer] = {}
        self._allowed: AllowedIPs[Peer] = AllowedIPs()
        self._keypairs: dict[int, Keypair] = {}
        self._handshakes: dict[int, Peer] = {}
        self._hs_window = float("-inf")
        self._hs_count = 0
        self._under_load_until = float("-inf")
        self._ratelimit = RateLimiter()
        self._zero_pad = bytes(m.PADDING_MULTIPLE)
        self._set_identity(private_key)

    # ---------------------------------------------------------------- configuration

    def _set_identity(self, private_key: bytes) -> None:
        self.identity = noise.StaticIdentity.from_private(private_key)
        self._cookie_checker = CookieChecker(self.identity.public, self._rng)

    def _static_static(self, public: bytes) -> bytes | None:
        try:
            return dh(self.identity.private, public)
        except ZeroSharedSecretError:
            return None

    def set_private_key(self, private_key: bytes) -> None:
        """Change our static key live: sessions and handshakes made under the old key end.
        Setting the key we already have changes nothing (a daemon may repeat it every map)."""
        with self.lock:
            if private_key == self.identity.private:
                return
            self._set_identity(private_key)
            for pub in [p for p in self._peers if p == self.identity.public]:
                self.remove_peer(pub)  # wg drops a peer whose key is now our own
            for peer in self._peers.values():
                peer.static_static = self._static_static(peer.public_key)
                self._clear_sessions(peer)

    def set_peer(self, config: PeerConfig) -> None:
        """Add a peer or update one in place (sessions survive an endpoint/IP/PSK change)."""
        with self.lock:
            peer = self._peers.get(config.public_key)
            if peer is None:
                if config.public_key == self.identity.public:
                    return
                peer = Peer(config, self._static_static(config.public_key), self._jitter)
                self._peers[config.public_key] = peer
                log.info("peer %s added", short_key(config.public_key))
            else:
                peer.preshared_key = config.preshared_key
                if config.endpoint is not None:
                    peer.endpoint = config.endpoint
                # Only what goes away is removed: prefixes that stay never route nowhere, even
                # for the instant of the update.
                for net in set(peer.allowed_ips) - set(config.allowed_ips):
                    if self._allowed.owner(net) is peer:
                        self._allowed.remove(net)
            if config.persistent_keepalive > 0 and (peer.timers.persistent_keepalive == 0
                                                    or peer.current is None):
                # Newly kept alive: send one at the next tick, which also starts a handshake.
                peer.timers.persistent_keepalive_at = float("-inf")
                if self.timers_changed is not None:
                    self.timers_changed()
            peer.timers.persistent_keepalive = config.persistent_keepalive
            peer.allowed_ips = config.allowed_ips
            for net in config.allowed_ips:
                self._allowed.insert(net, peer)

    def set_peers(self, configs: Iterable[PeerConfig]) -> None:
        """Make the peer set exactly `configs`: add, update and remove as needed."""
        with self.lock:
            configs = list(configs)
            wanted = {c.public_key for c in configs}
            for pub in [p for p in self._peers if p not in wanted]:
                self.remove_peer(pub)
            for c in configs:
                self.set_peer(c)

    def set_endpoint(self, public_key: bytes, endpoint: Endpoint | None) -> bool:
        """Send to `endpoint` from now on (the path layer's choice); sessions are kept. An
        authenticated packet from elsewhere still moves it (roaming). False: no such peer."""
        with self.lock:
            peer = self._peers.get(public_key)
            if peer is None:
                return False
            peer.endpoint = endpoint
            return True

    def remove_peer(self, public_key: bytes) -> None:
        """Forget a peer: its routes, sessions and pending handshake go at once."""
        with self.lock:
            peer = self._peers.pop(public_key, None)
            if peer is None:
                return
            log.info("peer %s removed", short_key(public_key))
            self._allowed.remove_value(peer)
            self._clear_sessions(peer)
            peer.timers.stop_all()

    def peers(self) -> list[PeerStats]:
        """A status snapshot of every peer."""
        with self.lock:
            return [p.stats() for p in self._peers.values()]

    def peer_stats(self, public_key: bytes) -> PeerStats | None:
        peer = self._peers.get(public_key)
        return peer.stats() if peer is not None else None

    # ---------------------------------------------------------------- helpers

    def _jitter(self) -> float:
        return int.from_bytes(self._rng(4), "little") / 2**32 * REKEY_TIMEOUT_JITTER_MAX

    def _new_index(self) -> int:
        while True:
            idx = int.from_bytes(self._rng(4), "little")
            if idx not in self._keypairs and idx not in self._handshakes:
                return idx

    def _drop_keypair(self, kp: Keypair | None) -> None:
        if kp is not None:
            self._keypairs.pop(kp.local_index, None)

    def _drop_initiation(self, peer: Peer) -> None:
        if peer.initiation is not None:
            self._handshakes.pop(peer.initiation.sender_index, None)
            peer.initiation = None

    def _clear_sessions(self, peer: Peer) -> None:
        for kp in peer.keypairs():
            self._drop_keypair(kp)
        peer.previous = peer.current = peer.next = None
        self._drop_initiation(peer)
        peer.staged.clear()

    def _under_load(self, now: float) -> bool:
        if now - self._hs_window >= 1.0:
            self._hs_window = now
            self._hs_count = 0
        self._hs_count += 1
        if self._hs_count > self.load_threshold:
            self._under_load_until = now + UNDER_LOAD_AFTER
        return now < self._under_load_until

    def _seal(self, kp: Keypair, counter: int, packet: bytes) -> bytes:
        length = len(packet)
        padded = m.padded_length(length, self.mtu)
        if padded != length:
            packet = packet + self._zero_pad[: padded - length]
        out = bytearray(padded + 32)
        out[0:8] = kp.header_prefix
        out[8:16] = counter.to_bytes(8, "little")
        kp.send.encrypt_into(nonce(counter), packet, None, memoryview(out)[16:])
        return bytes(out)

    def _send_keepalive(self, peer: Peer, now: float) -> None:
        """Send staged packets, or an empty transport message if there are none."""
        if peer.staged:
            self._flush_staged(peer, now)
            return
        kp = peer.current
        if kp is None or now - kp.created >= REJECT_AFTER_TIME:
            # No session to carry it: a keepalive asks for a handshake (as wireguard-go's does).
            self._send_initiation(peer, now, is_retry=False)
            return
        counter = next(kp.send_counter)
        if counter >= REJECT_AFTER_MESSAGES or peer.endpoint is None:
            self._send_initiation(peer, now, is_retry=False)
            return
        msg = self._seal(kp, counter, b"")
        peer.tx_bytes += len(msg)
        peer.timers.any_authenticated_packet_traversal(now)
        peer.timers.any_authenticated_packet_sent(now)
        self.outbox.append((msg, peer.endpoint))

    def _flush_staged(self, peer: Peer, now: float) -> None:
        staged = list(peer.staged)
        peer.staged.clear()
        for packet in staged:
            out = self._encrypt_for(peer, packet, now)
            if out is not None:
                self.outbox.append(out)

    # ---------------------------------------------------------------- handshake

    def initiate_handshake(self, peer_key: bytes, now: float) -> None:
        """Start a handshake with a peer now (the CLI's first contact, tests)."""
        with self.lock:
            peer = self._peers.get(peer_key)
            if peer is not None:
                self._send_initiation(peer, now, is_retry=False)

    def _send_initiation(self, peer: Peer, now: float, is_retry: bool) -> None:
        if not is_retry:
            peer.timers.handshake_attempts = 0
        if now - peer.last_initiation_sent < REKEY_TIMEOUT:
            return  # one initiation per REKEY_TIMEOUT, however many packets ask
        if peer.endpoint is None or peer.static_static is None:
            self.drops[Drop.NO_ENDPOINT] += 1
            return
        peer.last_initiation_sent = now
        self._drop_initiation(peer)
        index = self._new_index()
        body, state = noise.create_initiation(
            self.identity, peer.public_key, peer.static_static, self._rng(32), index,
            tai64n(now + self.wall_offset))
        peer.initiation = state
        self._handshakes[index] = peer
        msg = peer.cookies.add_macs(body, now)
        peer.tx_bytes += len(msg)
        peer.timers.any_authenticated_packet_traversal(now)
        peer.timers.any_authenticated_packet_sent(now)
        peer.timers.handshake_initiated(now)
        self.outbox.append((msg, peer.endpoint))

    def _check_macs(self, msg: bytes, src: Endpoint, sender_index: int, now: float) -> bool:
        """mac1 always; under load, mac2 too, answering a missing one with a cookie."""
        if not self._cookie_checker.check_mac1(msg):
            self.drops[Drop.MAC1] += 1
            return False
        if self._under_load(now):
            src_b = endpoint_bytes(src)
            if not self._cookie_checker.check_mac2(msg, src_b, now):
                reply = self._cookie_checker.create_reply(msg, sender_index, src_b, now)
                self.outbox.append((reply, src))
                self.drops[Drop.UNDER_LOAD] += 1
                return False
            if not self._ratelimit.allow(source_key(src[0]), now):
                self.drops[Drop.RATE_LIMITED] += 1
                return False
        return True

    def _receive_initiation(self, msg: bytes, src: Endpoint, now: float) -> None:
        if len(msg) != m.INITIATION_SIZE:
            self.drops[Drop.BAD_SIZE] += 1
            return
        if not self._check_macs(msg, src, int.from_bytes(msg[4:8], "little"), now):
            return
        try:
            remote, ck, h = noise.open_initiation_static(self.identity, msg)
        except ZeroSharedSecretError:
            self.drops[Drop.ZERO_DH] += 1
            return
        except noise.HandshakeError:
            self.drops[Drop.HANDSHAKE_DECRYPT] += 1
            return
        peer = self._peers.get(remote)
        if peer is None or peer.static_static is None:
            self.drops[Drop.UNKNOWN_PEER] += 1
            return
        try:
            init = noise.open_initiation_rest(msg, remote, ck, h, peer.static_static)
        except noise.HandshakeError:
            self.drops[Drop.HANDSHAKE_DECRYPT] += 1
            return
        if init.timestamp <= peer.last_timestamp:
            self.drops[Drop.REPLAYED_INITIATION] += 1
            return
        if now - peer.last_initiation_consumed < HANDSHAKE_INITIATION_RATE:
            self.drops[Drop.FLOODED_INITIATION] += 1
            return
        peer.last_timestamp = init.timestamp
        peer.last_initiation_consumed = now
        peer.endpoint = src
        peer.rx_bytes += len(msg)
        peer.timers.any_authenticated_packet_traversal(now)
        peer.timers.any_authenticated_packet_received(now)
        self._send_response(peer, init, src, now)

    def _send_response(self, peer: Peer, init: noise.ReceivedInitiation, src: Endpoint,
                       now: float) -> None:
        # A simultaneous initiation of ours is abandoned: the peer's wins, ours would be dropped.
        self._drop_initiation(peer)
        try:
            body, keys = noise.create_response(init, peer.preshared_key, self._rng(32),
                                               self._new_index())
        except ZeroSharedSecretError:
            self.drops[Drop.ZERO_DH] += 1
            return
        msg = peer.cookies.add_macs(body, now)
        kp = Keypair(keys, peer, now)
        for old in peer.install_responded(kp):
            self._drop_keypair(old)
        self._keypairs[kp.local_index] = kp
        peer.timers.session_derived(now)
        peer.timers.any_authenticated_packet_traversal(now)
        peer.timers.any_authenticated_packet_sent(now)
        peer.tx_bytes += len(msg)
        self.outbox.append((msg, src))

    def _receive_response(self, msg: bytes, src: Endpoint, now: float) -> None:
        if len(msg) != m.RESPONSE_SIZE:
            self.drops[Drop.BAD_SIZE] += 1
            return
        if not self._check_macs(msg, src, int.from_bytes(msg[4:8], "little"), now):
            return
        peer = self._handshakes.get(int.from_bytes(msg[8:12], "little"))
        if peer is None or peer.initiation is None:
            self.drops[Drop.UNKNOWN_INDEX] += 1
            return
        try:
            keys = noise.consume_response(peer.initiation, self.identity, peer.preshared_key, msg)
        except ZeroSharedSecretError:
            self.drops[Drop.ZERO_DH] += 1
            return
        except noise.HandshakeError:
            self.drops[Drop.HANDSHAKE_DECRYPT] += 1
            return
        self._drop_initiation(peer)
        kp = Keypair(keys, peer, now)
        for old in peer.install_initiated(kp):
            self._drop_keypair(old)
        self._keypairs[kp.local_index] = kp
        peer.endpoint = src
        peer.rx_bytes += len(msg)
        peer.last_handshake = now + self.wall_offset
        log.debug("handshake with %s complete (we initiated)", short_key(peer.public_key))
        t = peer.timers
        t.any_authenticated_packet_traversal(now)
        t.any_authenticated_packet_received(now)
        t.session_derived(now)
        t.handshake_complete(now)
        self._send_keepalive(peer, now)

    def _receive_cookie_reply(self, msg: bytes, now: float) -> None:
        if len(msg) != m.COOKIE_REPLY_SIZE:
            self.drops[Drop.BAD_SIZE] += 1
            return
        index = int.from_bytes(msg[4:8], "little")
        peer = self._handshakes.get(index)
        if peer is None:
            kp = self._keypairs.get(index)
            peer = kp.peer if kp is not None else None
        if peer is None:
            self.drops[Drop.UNKNOWN_INDEX] += 1
            return
        try:
            peer.cookies.consume_reply(msg, now)
        except CookieError:
            self.drops[Drop.COOKIE_INVALID] += 1

    def _confirm_next(self, peer: Peer, kp: Keypair, now: float) -> None:
        """The initiator used our `next` keypair: it becomes current (responder side)."""
        with self.lock:
            dropped = peer.confirm_next(kp)
            if dropped is None:
                return
            for old in dropped:
                self._drop_keypair(old)
            peer.last_handshake = now + self.wall_offset
            log.debug("handshake with %s complete (they initiated)", short_key(peer.public_key))
            peer.timers.handshake_complete(now)
            if peer.staged:
                self._flush_staged(peer, now)

    # ---------------------------------------------------------------- datagrams in

    def receive(self, data: bytes, src: Endpoint, now: float) -> bytes | None:
        """Handle one UDP datagram; returns the inner packet to write to the TUN, if any."""
        out: list[bytes] = []
        self.receive_batch((data,), src, now, out)
        return out[0] if out else None

    def _receive_handshake(self, data: bytes, src: Endpoint, now: float) -> None:
        if len(data) < 4:
            self.drops[Drop.SHORT] += 1
            return
        prefix = data[:4]
        with self.lock:
            if prefix == m.TRANSPORT_PREFIX:
                self.drops[Drop.SHORT] += 1
            elif prefix == m.INITIATION_PREFIX:
                self._receive_initiation(data, src, now)
            elif prefix == m.RESPONSE_PREFIX:
                self._receive_response(data, src, now)
            elif prefix == m.COOKIE_REPLY_PREFIX:
                self._receive_cookie_reply(data, now)
            elif self.other_datagram is None:
                self.drops[Drop.UNKNOWN_TYPE] += 1
            else:
                self.others += 1
        if self.other_datagram is not None and prefix not in _WG_PREFIXES:
            # Not WireGuard (disco, STUN): the socket is shared, as Tailscale's is. Transport
            # packets never get here, so this costs the data path nothing.
            self.other_datagram(data, src)

    def receive_batch(self, datagrams: Iterable[bytes | memoryview], src: Endpoint, now: float,
                      out: list[bytes]) -> None:
        """Handle datagrams that all came from `src`, appending inner packets for the TUN to `out`.

        The hot loop: per packet only parse, replay check, decrypt, source check. Timers, stats
        and session rotation are applied once per run of packets on the same keypair."""
        keypairs = self._keypairs
        drops = self.drops
        unpack, pack_nonce = m.TRANSPORT_HEADER.unpack_from, _NONCE.pack
        allowed = self._allowed
        lookup = allowed.lookup
        accept = self.inbound_filter
        run_kp: Keypair | None = None
        run_bytes = 0
        run_data = False
        # The keypair whose expiry was last checked, with its parts in locals: a batch is
        # nearly always one keypair, and `now` does not change within it.
        checked: Keypair | None = None
        replay = ReplayWindow()  # placeholders until the first keypair is checked
        decrypt: Callable[..., bytes] = bytes
        for data in datagrams:
            size = len(data)
            if size < m.TRANSPORT_MIN_SIZE:
                self._receive_handshake(bytes(data), src, now)
                continue
            kind, index, counter = unpack(data)
            if kind != m.MessageType.TRANSPORT:
                self._receive_handshake(bytes(data), src, now)
                continue
            kp = keypairs.get(index)
            if kp is None:
                drops[Drop.UNKNOWN_INDEX] += 1
                continue
            if kp is not checked:
                if now - kp.created >= REJECT_AFTER_TIME:
                    drops[Drop.EXPIRED_KEY] += 1
                    continue
                checked, replay, decrypt = kp, kp.replay, kp.recv.decrypt
            if counter <= replay.last and not replay.might_accept(counter):
                drops[Drop.REPLAYED_DATA] += 1
                continue
            try:
                packet = decrypt(pack_nonce(counter), data[16:], None)
            except InvalidTag:
                drops[Drop.DATA_DECRYPT] += 1
                continue
            if not replay.accept(counter):
                drops[Drop.REPLAYED_DATA] += 1
                continue
            if kp is not run_kp:
                if run_kp is not None:
                    self._received(run_kp, run_bytes, run_data, src, now)
                run_kp, run_bytes, run_data = kp, 0, False
            run_bytes += size
            if not packet:
                continue  # keepalive
            run_data = True
            # Trim the padding, and accept only sources this peer may use (cryptokey routing).
            version = packet[0] >> 4
            if version == 4 and len(packet) >= 20:
                length = (packet[2] << 8) | packet[3]
                source = packet[12:16]
                minimum = 20
            elif version == 6 and len(packet) >= 40:
                length = 40 + ((packet[4] << 8) | packet[5])
                source = packet[8:24]
                minimum = 40
            else:
                drops[Drop.BAD_INNER_PACKET] += 1
                continue
            if length > len(packet) or length < minimum:
                drops[Drop.BAD_INNER_PACKET] += 1
                continue
            owner = allowed._cache.get(source, allowed)  # the table itself marks a miss
            if owner is allowed:
                owner = lookup(source)
            if owner is not kp.peer:
                drops[Drop.SOURCE_NOT_ALLOWED] += 1
                continue
            if length != len(packet):
                packet = packet[:length]
            if accept is not None and not accept(packet, kp.peer.public_key, now):
                drops[Drop.FILTERED] += 1
                continue
            out.append(packet)
        if run_kp is not None:
            self._received(run_kp, run_bytes, run_data, src, now)

    def _received(self, kp: Keypair, nbytes: int, had_data: bool, src: Endpoint,
                  now: float) -> None:
        """Bookkeeping after authenticated transport packets: rotation, roaming, stats, timers."""
        peer = kp.peer
        if kp is not peer.current and kp is peer.next:
            self._confirm_next(peer, kp, now)
        peer.endpoint = src
        peer.rx_bytes += nbytes
        peer.last_received = now
        peer.unanswered_since = None
        t = peer.timers
        t.any_authenticated_packet_traversal(now)
        t.any_authenticated_packet_received(now)
        if had_data:
            t.data_received(now)
        if (kp.is_initiator and not t.sent_last_minute_handshake and kp is peer.current
                and now - kp.created >= REKEY_BEFORE_REJECT):
            t.sent_last_minute_handshake = True
            with self.lock:
                self._send_initiation(peer, now, is_retry=False)

    # ---------------------------------------------------------------- packets out

    def send(self, packet: bytes, now: float) -> tuple[bytes, Endpoint] | None:
        """Encrypt one inner packet from the TUN; returns (datagram, endpoint) to send, or None
        when the packet was dropped or staged behind a handshake (then see `outbox`)."""
        out: list[Sealed] = []
        self.send_batch((packet,), now, out)
        return (out[0][0] + out[0][1], out[0][2]) if out else None

    def send_batch(self, packets: Iterable[bytes], now: float, out: list[Sealed]) -> None:
        """Encrypt inner packets from the TUN, appending (header, ciphertext, endpoint) to `out`
        (the datagram is header + ciphertext: kept apart so that no copy joins them before
        sendmsg gathers them); packets without a usable session are staged and start a
        handshake (see `outbox`). `outbound_hook`, if set, sees every routed packet (sent or
        staged) before it is sealed.

        The hot loop: route, count, seal. Stats, timers and the rekey check run once per run of
        packets to the same peer."""
        allowed = self._allowed
        lookup = allowed.lookup
        drops = self.drops
        mtu = self.mtu
        zero_pad = self._zero_pad
        pack_header, pack_nonce = m.TRANSPORT_HEADER.pack, _NONCE.pack
        transport = m.MessageType.TRANSPORT
        note = self.outbound_hook
        peer: Peer | None = None
        kp: Keypair | None = None
        endpoint: Endpoint | None = None
        encrypt: Callable[..., bytes] = bytes
        counter = remote = 0
        run_bytes = 0
        for packet in packets:
            size = len(packet)
            version = packet[0] >> 4 if size else 0
            if version == 4 and size >= 20:
                dst = packet[16:20]
            elif version == 6 and size >= 40:
                dst = packet[24:40]
            else:
                drops[Drop.BAD_INNER_PACKET] += 1
                continue
            p = allowed._cache.get(dst, allowed)  # the table itself marks a cache miss
            if p is allowed:
                p = lookup(dst)
            if p is None:
                drops[Drop.NO_ROUTE] += 1
                continue
            if p is not peer:
                if run_bytes:
                    self._sent(peer, kp, counter, run_bytes, now)  # type: ignore[arg-type]
                    run_bytes = 0
                peer, kp, endpoint = p, p.current, p.endpoint
                if kp is not None and (endpoint is None or now - kp.created >= REJECT_AFTER_TIME):
                    kp = None
                if kp is not None:
                    encrypt, remote = kp.send.encrypt, kp.remote_index
            if note is not None:
                note(packet, p.public_key, now)
            if kp is None:
                self._stage(p, packet, now)
                continue
            counter = next(kp.send_counter)
            if counter >= REJECT_AFTER_MESSAGES:
                self._stage(p, packet, now)
                continue
            if size & 15:
                padded = m.padded_length(size, mtu)
                packet = packet + zero_pad[: padded - size]
                size = padded
            out.append((pack_header(transport, remote, counter),
                        encrypt(pack_nonce(counter), packet, None), endpoint))
            run_bytes += size + 32
        if run_bytes:
            self._sent(peer, kp, counter, run_bytes, now)  # type: ignore[arg-type]

    def _sent(self, peer: Peer, kp: Keypair, counter: int, nbytes: int, now: float) -> None:
        peer.tx_bytes += nbytes
        peer.last_sent = now
        if peer.unanswered_since is None:
            peer.unanswered_since = now
        t = peer.timers
        t.any_authenticated_packet_traversal(now)
        t.any_authenticated_packet_sent(now)
        t.data_sent(now)
        if counter >= REKEY_AFTER_MESSAGES or (kp.is_initiator
                                               and now - kp.created >= REKEY_AFTER_TIME):
            with self.lock:
                self._send_initiation(peer, now, is_retry=False)

    def _encrypt_for(self, peer: Peer, packet: bytes, now: float) -> tuple[bytes, Endpoint] | None:
        """Encrypt one staged packet for `peer` (routing already done)."""
        kp = peer.current
        endpoint = peer.endpoint
        if kp is None or now - kp.created >= REJECT_AFTER_TIME or endpoint is None:
            return self._stage(peer, packet, now)
        counter = next(kp.send_counter)
        if counter >= REJECT_AFTER_MESSAGES:
            return self._stage(peer, packet, now)
        msg = self._seal(kp, counter, packet)
        self._sent(peer, kp, counter, len(msg), now)
        return msg, endpoint

    def _stage(self, peer: Peer, packet: bytes, now: float) -> None:
        peer.staged.append(packet)
        with self.lock:
            self._send_initiation(peer, now, is_retry=False)
        return None

    # ---------------------------------------------------------------- timers

    def tick(self, now: float) -> None:
        """Run every expired timer; call again at `next_deadline()`, or at once after `timers_changed`."""
        with self.lock:
            for peer in list(self._peers.values()):
                for timer in peer.timers.expired(now):
                    self._on_timer(peer, timer, now)
            if self._ratelimit:
                self._ratelimit.collect(now)

    def next_deadline(self) -> float | None:
        """When `tick` next has work, or None."""
        with self.lock:
            deadlines = [d for p in self._peers.values()
                         if (d := p.timers.next_deadline()) is not None]
            return min(deadlines) if deadlines else None

    def _on_timer(self, peer: Peer, timer: Timer, now: float) -> None:
        t = peer.timers
        if timer is Timer.RETRANSMIT_HANDSHAKE:
            if t.handshake_attempts > MAX_TIMER_HANDSHAKES:
                # Gave up for REKEY_ATTEMPT_TIME: forget queued packets, wipe keys later.
                log.info("no handshake with %s after %d attempts; giving up until new traffic",
                         short_key(peer.public_key), t.handshake_attempts + 1)
                peer.staged.clear()
                self._drop_initiation(peer)
                if not t.pending(Timer.ZERO_KEY_MATERIAL):
                    t.zero_key_material = now + REJECT_AFTER_TIME * 3
            else:
                t.handshake_attempts += 1
                self._send_initiation(peer, now, is_retry=True)
        elif timer is Timer.SEND_KEEPALIVE:
            self._send_keepalive(peer, now)
            if t.need_another_keepalive:
                t.need_another_keepalive = False
                t.send_keepalive = now + KEEPALIVE_TIMEOUT
        elif timer is Timer.NEW_HANDSHAKE:
            # We sent data and heard nothing back for KEEPALIVE+REKEY_TIMEOUT: new handshake.
            self._send_initiation(peer, now, is_retry=False)
        elif timer is Timer.ZERO_KEY_MATERIAL:
            self._clear_sessions(peer)
        elif timer is Timer.PERSISTENT_KEEPALIVE:
            if t.persistent_keepalive > 0:
                self._send_keepalive(peer, now)
