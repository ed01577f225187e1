"""The sealed protocol primitives: channels, replay guard, node-key proofs, stream framing."""

import json

from hypothesis import given, strategies as st
import pytest

from meshnode.control.protocol import (Channel, ErrorCode, FrameReader, ProtocolError, ReplayGuard,
                                       TokenBucket,
                                       frame, generate_private_key, node_key_proof, public_key_of,
                                       verify_node_key_proof)

SERVER = generate_private_key()
MACHINE = generate_private_key()


def test_sealed_round_trip_and_wrong_key_fails() -> None:
    node_side = Channel(MACHINE, public_key_of(SERVER))
    server_side = Channel(SERVER, public_key_of(MACHINE))
    sealed = node_side.seal({"ts": 1, "x": "y"})
    assert server_side.open(sealed)[1] == {"ts": 1, "x": "y"}
    other = Channel(SERVER, public_key_of(generate_private_key()))
    with pytest.raises(ProtocolError) as err:
        other.open(sealed)
    assert err.value.code is ErrorCode.BAD_SEAL
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(ProtocolError):
        server_side.open(tampered)


def test_sealed_non_object_is_bad_request() -> None:
    sealed = Channel(MACHINE, public_key_of(SERVER)).seal_bytes(json.dumps([1]).encode())
    with pytest.raises(ProtocolError) as err:
        Channel(SERVER, public_key_of(MACHINE)).open(sealed)
    assert err.value.code is ErrorCode.BAD_REQUEST


def test_replay_guard() -> None:
    guard = ReplayGuard(window=60)
    guard.check("k", b"n1", 1000.0, now=1000.0)
    with pytest.raises(ProtocolError) as err:
        guard.check("k", b"n1", 1000.0, now=1001.0)
    assert err.value.code is ErrorCode.REPLAY
    guard.check("other", b"n1", 1000.0, now=1001.0)  # nonces are per machine key
    with pytest.raises(ProtocolError):
        guard.check("k", b"n2", 900.0, now=1000.0)      # too old
    with pytest.raises(ProtocolError):
        guard.check("k", b"n3", 1100.0, now=1000.0)     # from the future
    for bad in ("soon", float("nan"), float("inf"), -float("inf"), True, 10 ** 400):
        with pytest.raises(ProtocolError) as err:
            guard.check("k", b"n4", bad, now=1000.0)
        assert err.value.code is ErrorCode.BAD_REQUEST, bad
    guard.check("k", b"n5", 999.0, now=1000.0)   # sent at once, arrived out of order: accepted
    with pytest.raises(ProtocolError):
        guard.check("k", b"n6", 990.0, now=1000.0)   # older than the reorder allowance below the mark


def test_replay_guard_memory_is_bounded_per_key_and_in_keys() -> None:
    """The old guard kept every nonce for 240 s and scanned them all once full: a flood made each
    check cost the whole table. Now one key keeps at most `per_key` nonces and the guard at most
    `max_keys` keys, and no accepted request is ever accepted again."""
    guard = ReplayGuard(window=120, per_key=16, max_keys=50)
    now = 10_000.0
    accepted: list[tuple[str, bytes, float]] = []
    for i in range(5_000):           # one machine key flooding, 1000 requests a second
        ts = now + i / 1000
        guard.check("flood", i.to_bytes(4, "big"), ts, now=ts)
        accepted.append(("flood", i.to_bytes(4, "big"), ts))
        assert guard.entries("flood") <= 16
    for i in range(500):             # freshly minted keys
        ts = now + 5 + i / 1000
        guard.check(f"k{i}", b"x", ts, now=ts)
        accepted.append((f"k{i}", b"x", ts))
        assert len(guard) <= 50
    for key, nonce, ts in accepted[::7]:
        with pytest.raises(ProtocolError) as err:
            guard.check(key, nonce, ts, now=now + 6)
        assert err.value.code is ErrorCode.REPLAY, key


def test_replay_guard_refuses_what_a_persisted_mark_covers() -> None:
    marks = {"k": 1000.0}
    guard = ReplayGuard(window=120, load=marks.get)
    with pytest.raises(ProtocolError):
        guard.check("k", b"captured", 1000.0, now=1010.0)   # the request a previous run accepted
    with pytest.raises(ProtocolError):
        guard.check("k", b"older", 999.5, now=1010.0)      # even within the reorder allowance
    guard.check("k", b"new", 1000.5, now=1010.0)
    guard.check("fresh", b"a", 1000.0, now=1010.0)


@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 30), st.floats(0, 20)), max_size=200),
       st.integers(1, 4), st.integers(1, 3))
def test_replay_guard_never_accepts_a_request_twice(reqs: list, per_key: int, max_keys: int) -> None:
    guard = ReplayGuard(window=1000, reorder=3.0, per_key=per_key, max_keys=max_keys)
    seen: dict[tuple[str, bytes], float] = {}
    for key, n, ts in reqs:
        nonce = n.to_bytes(2, "big")
        ts = seen.get((key, nonce), ts)   # the same sealed request always carries the same ts
        try:
            guard.check(key, nonce, ts, now=1000.0)
        except ProtocolError:
            continue
        assert (key, nonce) not in seen, "a replay was accepted"
        seen[(key, nonce)] = ts
        assert guard.entries(key) <= per_key and len(guard) <= max_keys


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=10, burst=3)
    assert [bucket.allow(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.allow(0.1) and not bucket.allow(0.1)
    assert sum(bucket.allow(100.0) for _ in range(10)) == 3


def test_node_key_proof_binds_key_machine_and_time() -> None:
    node = generate_private_key()
    m_pub = public_key_of(MACHINE)
    proof = node_key_proof(node, public_key_of(SERVER), m_pub, 5.0)
    verify_node_key_proof(proof, public_key_of(node), SERVER, m_pub, 5.0)
    with pytest.raises(ProtocolError):
        verify_node_key_proof(proof, public_key_of(generate_private_key()), SERVER, m_pub, 5.0)
    with pytest.raises(ProtocolError):
        verify_node_key_proof(proof, public_key_of(node), SERVER, public_key_of(generate_private_key()), 5.0)
    with pytest.raises(ProtocolError):
        verify_node_key_proof(proof, public_key_of(node), SERVER, m_pub, 6.0)
    with pytest.raises(ProtocolError):
        verify_node_key_proof(None, public_key_of(node), SERVER, m_pub, 5.0)


@given(st.lists(st.binary(max_size=300), max_size=8), st.lists(st.integers(1, 50), min_size=1, max_size=20))
def test_frames_survive_any_chunking(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frame(p) for p in payloads)
    reader = FrameReader()
    out, pos, i = [], 0, 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        out += reader.feed(stream[pos:pos + step])
        pos += step
        i += 1
    assert out == payloads


def test_oversized_frame_is_refused() -> None:
    with pytest.raises(ProtocolError):
        FrameReader(max_frame=10).feed(frame(b"x" * 11))
