"""The sealed protocol primitives: channels, replay guard, node-key proofs, stream framing."""

import json

from hypothesis import given, strategies as st
import pytest

from meshnode.control.protocol import (Channel, ErrorCode, FrameReader, ProtocolError, ReplayGuard,
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
    guard.check(b"n1", 1000.0, now=1000.0)
    with pytest.raises(ProtocolError) as err:
        guard.check(b"n1", 1000.0, now=1001.0)
    assert err.value.code is ErrorCode.REPLAY
    with pytest.raises(ProtocolError):
        guard.check(b"n2", 900.0, now=1000.0)      # too old
    with pytest.raises(ProtocolError):
        guard.check(b"n3", 1100.0, now=1000.0)     # from the future
    with pytest.raises(ProtocolError) as err:
        guard.check(b"n4", "soon", now=1000.0)
    assert err.value.code is ErrorCode.BAD_REQUEST
    guard.prune(now=1000.0 + 121)
    guard.check(b"n1", 1121.0, now=1121.0)  # forgotten only once its timestamp can no longer pass


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
