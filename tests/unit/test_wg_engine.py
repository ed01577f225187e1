"""Two sans-I/O engines talking in memory: handshakes in both roles, transport, session rotation,
cookies under load, timers, and every kind of bad input dropped, counted and never raised."""

from __future__ import annotations

import hashlib
import ipaddress
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnode.wg import messages as m
from meshnode.wg.crypto import clamp, public_key
from meshnode.wg.engine import Drop, Engine
from meshnode.wg.peer import PeerConfig
from meshnode.wg.timers import (
    KEEPALIVE_TIMEOUT,
    REJECT_AFTER_TIME,
    REKEY_AFTER_TIME,
    REKEY_TIMEOUT,
    Timer,
)

EP_A = ("192.0.2.1", 51820)
EP_B = ("192.0.2.2", 51820)
A_IP, B_IP = "10.9.0.1", "10.9.0.2"
A_IP6, B_IP6 = "fd00::1", "fd00::2"
T0 = 1000.0


def rng(seed: bytes):
    """A deterministic byte source: ephemeral keys, indices and jitter repeat run to run."""
    counter = 0

    def take(n: int) -> bytes:
        nonlocal counter
        out = b""
        while len(out) < n:
            counter += 1
            out += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
        return out[:n]
    return take


A_PRIV = clamp(hashlib.sha256(b"a").digest())
B_PRIV = clamp(hashlib.sha256(b"b").digest())
A_PUB, B_PUB = public_key(A_PRIV), public_key(B_PRIV)


def nets(*names: str) -> tuple:
    return tuple(ipaddress.ip_network(n) for n in names)


def make_pair(psk: bytes = bytes(32), b_knows_endpoint: bool = True) -> tuple[Engine, Engine]:
    a = Engine(A_PRIV, rng=rng(b"A"), wall_offset=1.7e9)
    b = Engine(B_PRIV, rng=rng(b"B"), wall_offset=1.7e9)
    a.set_peer(PeerConfig(B_PUB, psk, EP_B, nets(f"{B_IP}/32", f"{B_IP6}/128")))
    b.set_peer(PeerConfig(A_PUB, psk, EP_A if b_knows_endpoint else None,
                          nets(f"{A_IP}/32", f"{A_IP6}/128")))
    return a, b


def ip4(src: str, dst: str, payload: bytes = b"hello") -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0,
                       ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed) + payload


def ip6(src: str, dst: str, payload: bytes = b"hello6") -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), 17, 64,
                       ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed) + payload


def deliver(src: Engine, dst: Engine, src_ep: tuple, now: float) -> list[bytes]:
    """Move everything in `src`'s outbox into `dst`; the inner packets `dst` hands to its TUN."""
    out = []
    while src.outbox:
        msg, _ = src.outbox.popleft()
        packet = dst.receive(msg, src_ep, now)
        if packet is not None:
            out.append(packet)
    return out


def handshake(a: Engine, b: Engine, now: float = T0) -> None:
    """a initiates; after this both sides hold a confirmed current session."""
    a.initiate_handshake(B_PUB, now)
    deliver(a, b, EP_A, now)   # initiation
    deliver(b, a, EP_B, now)   # response -> a sends a keepalive
    deliver(a, b, EP_A, now)   # keepalive confirms b's next keypair
    assert not a.drops and not b.drops


def send(src: Engine, dst: Engine, packet: bytes, src_ep: tuple, now: float) -> list[bytes]:
    out = src.send(packet, now)
    if out is not None:
        src.outbox.append(out)
    return deliver(src, dst, src_ep, now)


def test_handshake_and_transport_both_ways() -> None:
    a, b = make_pair()
    handshake(a, b)
    p = ip4(A_IP, B_IP, b"x" * 100)
    assert send(a, b, p, EP_A, T0) == [p]
    q = ip6(B_IP6, A_IP6, b"y" * 333)
    assert send(b, a, q, EP_B, T0) == [q]
    sa, sb = a.peers()[0], b.peers()[0]
    assert sa.last_handshake == sb.last_handshake == T0 + 1.7e9
    assert sa.tx_bytes == sb.rx_bytes and sb.tx_bytes == sa.rx_bytes
    assert sb.endpoint == EP_A


def test_packets_before_a_session_are_staged_then_delivered() -> None:
    a, b = make_pair()
    packets = [ip4(A_IP, B_IP, bytes([i]) * 10) for i in range(3)]
    for p in packets:
        assert a.send(p, T0) is None  # staged; one initiation queued
    assert len(a.outbox) == 1
    deliver(a, b, EP_A, T0)
    deliver(b, a, EP_B, T0)
    assert deliver(a, b, EP_A, T0) == packets  # staged packets replace the keepalive


def test_responder_can_initiate_too_and_roams() -> None:
    a, b = make_pair(b_knows_endpoint=False)
    assert b.send(ip4(B_IP, A_IP), T0) is None
    assert b.drops[Drop.NO_ENDPOINT] == 1  # nowhere to send the initiation
    b.drops.clear()
    handshake(a, b)
    roamed = ("192.0.2.99", 4000)
    p = ip4(A_IP, B_IP)
    out = a.send(p, T0)
    assert out is not None
    assert b.receive(out[0], roamed, T0) == p
    assert b.send(ip4(B_IP, A_IP), T0)[1] == roamed


def test_padding_is_trimmed_and_keepalive_is_empty() -> None:
    a, b = make_pair()
    handshake(a, b)
    p = ip4(A_IP, B_IP, b"z" * 7)
    msg, _ = a.send(p, T0)
    assert (len(msg) - 32) % 16 == 0 and len(msg) - 32 > len(p)
    assert b.receive(msg, EP_A, T0) == p


def test_replayed_and_forged_transport_dropped_and_counted() -> None:
    a, b = make_pair()
    handshake(a, b)
    msg, _ = a.send(ip4(A_IP, B_IP), T0)
    assert b.receive(msg, EP_A, T0) is not None
    assert b.receive(msg, EP_A, T0) is None
    assert b.drops[Drop.REPLAYED_DATA] == 1
    forged = bytearray(a.send(ip4(A_IP, B_IP), T0)[0])
    forged[-1] ^= 1
    assert b.receive(bytes(forged), EP_A, T0) is None
    assert b.drops[Drop.DATA_DECRYPT] == 1
    unknown = bytearray(msg)
    unknown[4:8] = b"\xde\xad\xbe\xef"
    assert b.receive(bytes(unknown), EP_A, T0) is None
    assert b.drops[Drop.UNKNOWN_INDEX] == 1
    # A forged packet must not move the peer's endpoint.
    assert b.peers()[0].endpoint == EP_A


def test_source_outside_allowed_ips_and_filter() -> None:
    a, b = make_pair()
    handshake(a, b)
    assert send(a, b, ip4("10.9.0.77", B_IP), EP_A, T0) == []
    assert b.drops[Drop.SOURCE_NOT_ALLOWED] == 1
    seen = []

    def only_udp_to_port_53(packet: bytes, peer: bytes, now: float) -> bool:
        assert now == T0  # the batch's clock reading, not one of the hook's own
        seen.append(peer)
        return packet.endswith(b"dns")

    b.inbound_filter = only_udp_to_port_53
    assert send(a, b, ip4(A_IP, B_IP, b"web"), EP_A, T0) == []
    assert len(send(a, b, ip4(A_IP, B_IP, b"dns"), EP_A, T0)) == 1
    assert b.drops[Drop.FILTERED] == 1 and seen == [A_PUB, A_PUB]


def test_no_route_and_bad_inner_packets() -> None:
    a, b = make_pair()
    handshake(a, b)
    assert a.send(ip4(A_IP, "10.99.0.1"), T0) is None
    assert a.drops[Drop.NO_ROUTE] == 1
    assert a.send(b"\x45abc", T0) is None and a.send(b"", T0) is None
    assert a.drops[Drop.BAD_INNER_PACKET] == 2
    # An inner packet claiming more bytes than it carries is refused after decryption.
    lying = bytearray(ip4(A_IP, B_IP, b"q" * 40))
    lying[2:4] = (500).to_bytes(2, "big")
    assert send(a, b, bytes(lying), EP_A, T0) == []
    assert b.drops[Drop.BAD_INNER_PACKET] == 1


def test_unknown_peer_costs_no_response() -> None:
    a, b = make_pair()
    stranger = Engine(clamp(b"s" * 32), rng=rng(b"S"))
    stranger.set_peer(PeerConfig(B_PUB, endpoint=EP_B, allowed_ips=nets("10.9.0.2/32")))
    stranger.initiate_handshake(B_PUB, T0)
    deliver(stranger, b, ("192.0.2.66", 1), T0)
    assert b.drops[Drop.UNKNOWN_PEER] == 1 and not b.outbox


def test_bad_mac1_is_refused_before_any_dh() -> None:
    a, b = make_pair()
    a.initiate_handshake(B_PUB, T0)
    msg, _ = a.outbox.popleft()
    bad = bytearray(msg)
    bad[m.INITIATION_MAC1_OFFSET] ^= 1
    b.receive(bytes(bad), EP_A, T0)
    assert b.drops == {Drop.MAC1: 1} and not b.outbox


def test_replayed_and_flooded_initiations() -> None:
    a, b = make_pair()
    a.initiate_handshake(B_PUB, T0)
    msg, _ = a.outbox.popleft()
    b.receive(msg, EP_A, T0)
    b.outbox.clear()
    b.receive(msg, EP_A, T0 + 1)
    assert b.drops[Drop.REPLAYED_INITIATION] == 1 and not b.outbox
    # A newer initiation 5 ms later is a flood; after 20 ms it is fine.
    a2 = Engine(A_PRIV, rng=rng(b"A2"), wall_offset=1.7e9 + 10)
    a2.set_peer(PeerConfig(B_PUB, endpoint=EP_B, allowed_ips=nets(f"{B_IP}/32")))
    a2.initiate_handshake(B_PUB, T0 + 0.005)
    b.receive(a2.outbox.popleft()[0], EP_A, T0 + 0.005)
    assert b.drops[Drop.FLOODED_INITIATION] == 1


def test_cookie_reply_under_load_then_mac2_admits() -> None:
    a, b = make_pair()
    b.load_threshold = 0  # every handshake message counts as load
    a.initiate_handshake(B_PUB, T0)
    deliver(a, b, EP_A, T0)
    assert b.drops[Drop.UNDER_LOAD] == 1
    reply, to = b.outbox[0]
    assert reply[:4] == m.COOKIE_REPLY_PREFIX and len(reply) == m.COOKIE_REPLY_SIZE and to == EP_A
    deliver(b, a, EP_B, T0)
    assert not a.drops
    # The retransmission (REKEY_TIMEOUT + jitter later) carries mac2 and gets through.
    a.tick(T0 + REKEY_TIMEOUT + 0.34)
    msg, _ = a.outbox[0]
    assert msg[-16:] != bytes(16)
    deliver(a, b, EP_A, T0 + 5.5)
    assert b.drops[Drop.UNDER_LOAD] == 1
    deliver(b, a, EP_B, T0 + 5.5)
    assert a.peers()[0].last_handshake is not None


def test_forged_or_replayed_cookie_reply_is_refused() -> None:
    a, b = make_pair()
    b.load_threshold = 0
    a.initiate_handshake(B_PUB, T0)
    deliver(a, b, EP_A, T0)
    reply, _ = b.outbox.popleft()
    bad = bytearray(reply)
    bad[-1] ^= 1
    a.receive(bytes(bad), EP_B, T0)
    assert a.drops[Drop.COOKIE_INVALID] == 1
    a.receive(reply, EP_B, T0)
    assert a.drops[Drop.COOKIE_INVALID] == 1  # the genuine one is taken
    a.receive(reply, EP_B, T0)
    assert a.drops[Drop.COOKIE_INVALID] == 2  # but only once


def test_responder_rotates_next_to_current_and_keeps_previous() -> None:
    a, b = make_pair()
    handshake(a, b)
    first = b._peers[A_PUB].current
    b.initiate_handshake(A_PUB, T0 + 60)  # now b initiates, a responds
    deliver(b, a, EP_B, T0 + 60)
    deliver(a, b, EP_A, T0 + 60)
    pb = b._peers[A_PUB]
    assert pb.previous is first and pb.current is not first
    # a still has its old session current until b's keepalive lands on `next`.
    pa = a._peers[B_PUB]
    assert pa.next is not None
    deliver(b, a, EP_B, T0 + 60)
    assert pa.next is None and pa.current.local_index != first.remote_index
    # A packet still in flight on the old session is accepted (previous keypair).
    assert send(a, b, ip4(A_IP, B_IP), EP_A, T0 + 61)


def test_initiator_rekeys_after_rekey_after_time() -> None:
    a, b = make_pair()
    handshake(a, b)
    out = a.send(ip4(A_IP, B_IP), T0 + REKEY_AFTER_TIME + 1)
    assert out is not None  # the old session still carries this packet
    kinds = [msg[:4] for msg, _ in a.outbox]
    assert m.INITIATION_PREFIX in kinds


def test_sessions_expire_after_reject_after_time() -> None:
    a, b = make_pair()
    handshake(a, b)
    msg, _ = a.send(ip4(A_IP, B_IP), T0 + 1)
    assert b.receive(msg, EP_A, T0 + REJECT_AFTER_TIME + 1) is None
    assert b.drops[Drop.EXPIRED_KEY] == 1
    a.outbox.clear()
    assert a.send(ip4(A_IP, B_IP), T0 + REJECT_AFTER_TIME + 1) is None  # staged, re-handshake
    assert a.outbox[0][0][:4] == m.INITIATION_PREFIX


def test_keepalive_after_receiving_data_only() -> None:
    a, b = make_pair()
    handshake(a, b)
    send(a, b, ip4(A_IP, B_IP), EP_A, T0 + 1)
    assert b._peers[A_PUB].timers.pending(Timer.SEND_KEEPALIVE)
    b.tick(T0 + 1 + KEEPALIVE_TIMEOUT)
    (msg, _), = b.outbox
    assert len(msg) == m.TRANSPORT_MIN_SIZE
    assert deliver(b, a, EP_B, T0 + 12) == []  # a keepalive yields no inner packet
    assert not a.drops


def test_no_answer_triggers_a_new_handshake() -> None:
    a, b = make_pair()
    handshake(a, b)
    a.send(ip4(A_IP, B_IP), T0 + 1)
    a.outbox.clear()
    a.tick(T0 + 1 + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + 0.34)
    assert a.outbox[0][0][:4] == m.INITIATION_PREFIX


def test_retransmits_then_gives_up_and_zeroes_keys() -> None:
    a, _ = make_pair()
    a.send(ip4(A_IP, B_IP), T0)
    now, sent = T0, 0
    for _ in range(40):
        now += REKEY_TIMEOUT + 0.34
        a.tick(now)
        sent += len(a.outbox)
        a.outbox.clear()
    # The first initiation and MAX_TIMER_HANDSHAKES + 1 retries (wireguard-go's `>` test), then
    # silence: 90 s of trying, as REKEY_ATTEMPT_TIME says.
    assert sent == 20
    peer = a._peers[B_PUB]
    assert not peer.staged and peer.timers.pending(Timer.ZERO_KEY_MATERIAL)


def test_persistent_keepalive_starts_a_handshake_and_repeats() -> None:
    a, b = make_pair()
    a.set_peer(PeerConfig(B_PUB, bytes(32), EP_B, nets(f"{B_IP}/32"), persistent_keepalive=25))
    a.tick(T0)
    assert a.outbox[0][0][:4] == m.INITIATION_PREFIX
    deliver(a, b, EP_A, T0)
    deliver(b, a, EP_B, T0)
    deliver(a, b, EP_A, T0)
    a.tick(T0 + 25)
    (msg, _), = a.outbox
    assert len(msg) == m.TRANSPORT_MIN_SIZE


def test_the_timer_thread_is_told_when_a_timer_is_due_at_once() -> None:
    """The glue's timer thread sleeps until `next_deadline()`; the only timer a configuration
    change makes due at once (a newly kept-alive peer) calls `timers_changed`, so it is not left
    waiting for the next wake-up. Ordinary updates never call it."""
    a, _ = make_pair()
    calls: list[int] = []
    a.timers_changed = lambda: calls.append(1)
    assert a.next_deadline() is None  # nothing pending: the timer thread may sleep its longest
    a.set_peer(PeerConfig(B_PUB, bytes(32), EP_B, nets(f"{B_IP}/32")))
    assert calls == []
    a.set_peer(PeerConfig(B_PUB, bytes(32), EP_B, nets(f"{B_IP}/32"), persistent_keepalive=25))
    assert calls == [1] and a.next_deadline() == float("-inf")
    a.tick(T0)
    assert a.outbox and a.next_deadline() is not None and a.next_deadline() >= T0 + 1


def test_live_changes_remove_peer_and_rekey() -> None:
    a, b = make_pair()
    handshake(a, b)
    b.remove_peer(A_PUB)
    msg, _ = a.send(ip4(A_IP, B_IP), T0)
    assert b.receive(msg, EP_A, T0) is None and b.drops[Drop.UNKNOWN_INDEX] == 1
    assert b.peers() == []
    # Back with a new key for b: a learns it live and the tunnel works again.
    new_b = clamp(b"n" * 32)
    b.set_private_key(new_b)
    b.set_peers([PeerConfig(A_PUB, bytes(32), EP_A, nets(f"{A_IP}/32"))])
    a.set_peers([PeerConfig(public_key(new_b), bytes(32), EP_B, nets(f"{B_IP}/32"))])
    assert [p.public_key for p in a.peers()] == [public_key(new_b)]
    a.initiate_handshake(public_key(new_b), T0 + 1)
    deliver(a, b, EP_A, T0 + 1)
    deliver(b, a, EP_B, T0 + 1)
    deliver(a, b, EP_A, T0 + 1)
    p = ip4(A_IP, B_IP)
    assert send(a, b, p, EP_A, T0 + 2) == [p]


def test_allowed_ips_follow_set_peer() -> None:
    a, b = make_pair()
    handshake(a, b)
    a.set_peer(PeerConfig(B_PUB, bytes(32), None, nets("10.50.0.0/16")))
    assert a.send(ip4(A_IP, B_IP), T0) is None and a.drops[Drop.NO_ROUTE] == 1
    assert a.send(ip4(A_IP, "10.50.1.1"), T0) is not None  # endpoint kept, session kept


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=200),
    st.builds(lambda t, rest: bytes([t, 0, 0, 0]) + rest, st.integers(1, 4), st.binary(max_size=160)),
    st.builds(lambda t, n: bytes([t, 0, 0, 0]) + bytes(n), st.integers(1, 4),
              st.sampled_from([144, 88, 60, 12, 28]))))
def test_random_datagrams_never_raise(data: bytes) -> None:
    a, b = make_pair()
    assert b.receive(data, EP_A, T0) is None
    assert sum(b.drops.values()) >= 1 or data[:4] == m.COOKIE_REPLY_PREFIX


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=100))
def test_random_inner_packets_never_raise(data: bytes) -> None:
    a, _ = make_pair()
    a.send(data, T0)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 147), st.integers(1, 255))
def test_any_bit_flip_in_an_initiation_is_dropped(pos: int, flip: int) -> None:
    a, b = make_pair()
    a.initiate_handshake(B_PUB, T0)
    msg = bytearray(a.outbox.popleft()[0])
    msg[pos] ^= flip
    b.receive(bytes(msg), EP_A, T0)
    if pos >= m.INITIATION_MAC1_OFFSET + 16 or 4 <= pos < 8:
        # mac2 is ignored when not under load; the sender index is only covered by mac1.
        assert b.outbox or sum(b.drops.values()) == 1
    else:
        assert not b.outbox and sum(b.drops.values()) == 1


def test_gro_style_batch_of_memoryviews() -> None:
    a, b = make_pair()
    handshake(a, b)
    packets = [ip4(A_IP, B_IP, bytes([i]) * 1200) for i in range(5)]
    out: list = []
    a.send_batch(packets, T0, out)
    assert len(out) == 5 and {ep for _, _, ep in out} == {EP_B}
    size = len(out[0][0]) + len(out[0][1])
    buf = memoryview(b"".join(header + body for header, body, _ in out))
    got: list[bytes] = []
    b.receive_batch([buf[i:i + size] for i in range(0, len(buf), size)], EP_A, T0, got)
    assert got == packets and not b.drops
    assert b.peers()[0].rx_bytes > 5 * 1200


def test_short_transport_is_counted_short() -> None:
    _, b = make_pair()
    b.receive(m.TRANSPORT_PREFIX + bytes(20), EP_A, T0)
    assert b.drops == {Drop.SHORT: 1}


def test_updating_a_peer_keeps_its_remaining_prefixes_routed() -> None:
    a, b = make_pair()
    handshake(a, b)
    a.set_peer(PeerConfig(B_PUB, bytes(32), None, nets(f"{B_IP}/32", "10.60.0.0/16")))
    assert a._allowed.lookup_ip(B_IP) is a._peers[B_PUB]
    assert a.send(ip4(A_IP, "10.60.3.4"), T0) is not None
    a.set_peer(PeerConfig(B_PUB, bytes(32), None, nets("10.60.0.0/16")))
    assert a._allowed.lookup_ip(B_IP) is None


def test_under_load_a_source_with_a_cookie_is_still_rate_limited() -> None:
    a, b = make_pair()
    b.load_threshold = 0
    a.initiate_handshake(B_PUB, T0)
    deliver(a, b, EP_A, T0)
    deliver(b, a, EP_B, T0)  # a now holds a cookie
    accepted = 0
    for i in range(10):  # retransmissions, each a fresh initiation with mac2
        now = T0 + 0.001 * i
        a._peers[B_PUB].last_initiation_sent = float("-inf")
        a.initiate_handshake(B_PUB, now)
        b.receive(a.outbox.popleft()[0], EP_A, now)
        accepted += len(b.outbox)
        b.outbox.clear()
    assert b.drops[Drop.RATE_LIMITED] >= 5 and accepted >= 1


def test_repeating_the_same_configuration_keeps_sessions() -> None:
    a, b = make_pair()
    handshake(a, b)
    session = b._peers[A_PUB].current
    b.set_private_key(B_PRIV)
    b.set_peers([PeerConfig(A_PUB, bytes(32), EP_A, nets(f"{A_IP}/32", f"{A_IP6}/128"))])
    assert b._peers[A_PUB].current is session
    p = ip4(A_IP, B_IP)
    assert send(a, b, p, EP_A, T0 + 1) == [p]


def test_initiator_rehandshakes_before_its_receive_key_expires() -> None:
    from meshnode.wg.timers import REKEY_BEFORE_REJECT
    a, b = make_pair()
    handshake(a, b)
    later = T0 + REKEY_BEFORE_REJECT + 1
    p = ip4(B_IP, A_IP)
    msg, _ = b.send(p, later)  # the responder never rekeys by time on send...
    assert not [x for x in b.outbox if x[0][:4] == m.INITIATION_PREFIX]
    assert a.receive(msg, EP_B, later) == p  # ...the initiator does, on receive, once
    assert [x[0][:4] for x in a.outbox] == [m.INITIATION_PREFIX]
    a.outbox.clear()
    a.receive(b.send(p, later + 1)[0], EP_B, later + 1)
    assert not a.outbox
