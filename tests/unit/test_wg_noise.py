"""The Noise IKpsk2 handshake as pure functions: fixed vectors, both roles, tampering."""

from __future__ import annotations

import pytest

from meshnode.wg import noise
from meshnode.wg.cookie import CookieChecker, CookieGenerator
from meshnode.wg.crypto import (
    KeyFormatError,
    ZeroSharedSecretError,
    clamp,
    decode_key,
    dh,
    encode_key,
    kdf,
    public_key,
)
from meshnode.wg.messages import padded_length
from meshnode.wg.tai64n import tai64n, tai64n_to_unix

I_PRIV = clamp(bytes(range(32)))
R_PRIV = clamp(bytes(range(32, 64)))
I_EPH = clamp(bytes([7]) * 32)
R_EPH = clamp(bytes([9]) * 32)
I = noise.StaticIdentity.from_private(I_PRIV)
R = noise.StaticIdentity.from_private(R_PRIV)
STAMP = tai64n(1700000000.5)

# Recorded from this implementation after it interoperated with wireguard-go (tests/e2e); they pin
# the exact bytes so a refactor cannot drift from the wire format unnoticed.
INITIATION_HEX = (
    "010000004433221113be4feaeaf204c7fd3358fc9c00721881d174278128227ec674f37f7fe97b6dc200c12a047f07"
    "00576531fb4756f1dd5908a83a52b3c3c278449ce5c20fe5b0e93aa698979c3031ba264dc4394a7f7bf8a8f58a0307"
    "afd81d495649eb393b51d49c76044535ee4264a93add0d54b65bb5607b2dfaaf9b77c6cc7ba30000000000000000000"
    "0000000000000")
RESPONSE_HEX = (
    "02000000887766554433221157db4b359f23ae5e146e4e2512056704722506348c150c14753d0c933d04d421c96ad4"
    "4f9e3589f03e14cf0e005783c50585e617f00d5062d26f885868b0737200000000000000000000000000000000")
SEND_KEY_HEX = "92c8d11063a0eb96b6fa2360c442674249ea421e6ea9474fa658b4c4db259744"
RECV_KEY_HEX = "d84bbc97ab662cf90288ef2d317967ff54edea295bd956ad1e665cd2f9931ea1"


def initiation(psk: bytes = noise.ZERO_PSK) -> tuple[bytes, noise.InitiatorState]:
    body, state = noise.create_initiation(I, R.public, dh(I_PRIV, R.public), I_EPH, 0x11223344,
                                          STAMP)
    return CookieGenerator(R.public).add_macs(body, 0.0), state


def respond(msg: bytes, psk: bytes = noise.ZERO_PSK) -> tuple[bytes, noise.SessionKeys]:
    remote, ck, h = noise.open_initiation_static(R, msg)
    init = noise.open_initiation_rest(msg, remote, ck, h, dh(R_PRIV, remote))
    body, keys = noise.create_response(init, psk, R_EPH, 0x55667788)
    return CookieGenerator(I.public).add_macs(body, 0.0), keys


def test_protocol_constants_match_wireguard() -> None:
    # The well-known initial chaining key and hash of every WireGuard implementation.
    assert noise.INITIAL_CHAIN_KEY.hex() == \
        "60e26daef327efc02ec335e2a025d2d016eb4206f87277f52d38d1988b78cd36"
    assert noise.INITIAL_HASH.hex() == \
        "2211b361081ac566691243db458ad5322d9c6c662293e8b70ee19c65ba079ef3"


def test_fixed_keys_give_fixed_messages_and_keys() -> None:
    msg, state = initiation()
    assert msg.hex() == INITIATION_HEX
    resp, r_keys = respond(msg)
    assert resp.hex() == RESPONSE_HEX
    i_keys = noise.consume_response(state, I, noise.ZERO_PSK, resp)
    assert (i_keys.send_key.hex(), i_keys.recv_key.hex()) == (SEND_KEY_HEX, RECV_KEY_HEX)
    assert (r_keys.send_key, r_keys.recv_key) == (i_keys.recv_key, i_keys.send_key)
    assert (i_keys.local_index, i_keys.remote_index) == (0x11223344, 0x55667788)
    assert (r_keys.local_index, r_keys.remote_index) == (0x55667788, 0x11223344)
    assert i_keys.is_initiator and not r_keys.is_initiator


def test_responder_learns_identity_and_timestamp() -> None:
    msg, _ = initiation()
    remote, ck, h = noise.open_initiation_static(R, msg)
    assert remote == I.public
    init = noise.open_initiation_rest(msg, remote, ck, h, dh(R_PRIV, remote))
    assert init.timestamp == STAMP and init.sender_index == 0x11223344
    assert init.remote_ephemeral == public_key(I_EPH)


def test_mac1_binds_the_responder_key() -> None:
    msg, _ = initiation()
    assert CookieChecker(R.public, lambda n: bytes(n)).check_mac1(msg)
    assert not CookieChecker(I.public, lambda n: bytes(n)).check_mac1(msg)


def test_preshared_key_mismatch_fails_response() -> None:
    msg, state = initiation()
    resp, _ = respond(msg, psk=bytes([1]) * 32)
    with pytest.raises(noise.HandshakeError):
        noise.consume_response(state, I, noise.ZERO_PSK, resp)


def test_matching_preshared_key_changes_the_keys() -> None:
    psk = bytes([5]) * 32
    msg, state = initiation()
    resp, r_keys = respond(msg, psk)
    i_keys = noise.consume_response(state, I, psk, resp)
    assert i_keys.send_key == r_keys.recv_key
    assert i_keys.send_key.hex() != SEND_KEY_HEX


@pytest.mark.parametrize("offset", [8, 40, 90, 110])
def test_tampered_initiation_does_not_open(offset: int) -> None:
    msg, _ = initiation()
    bad = bytearray(msg)
    bad[offset] ^= 1
    with pytest.raises(noise.HandshakeError):
        remote, ck, h = noise.open_initiation_static(R, bytes(bad))
        noise.open_initiation_rest(bytes(bad), remote, ck, h, dh(R_PRIV, remote))


def test_response_to_another_initiation_is_refused() -> None:
    msg, state = initiation()
    resp, _ = respond(msg)
    bad = bytearray(resp)
    bad[8] ^= 1  # receiver index
    with pytest.raises(noise.HandshakeError):
        noise.consume_response(state, I, noise.ZERO_PSK, bytes(bad))


def test_low_order_point_is_refused() -> None:
    with pytest.raises(ZeroSharedSecretError):
        dh(I_PRIV, bytes(32))


def test_kdf_outputs_chain() -> None:
    a, b, c = kdf(b"k" * 32, b"input", 3)
    assert kdf(b"k" * 32, b"input", 2) == (a, b)
    assert len({a, b, c}) == 3


def test_key_text_form() -> None:
    assert decode_key(encode_key(I.public)) == I.public
    with pytest.raises(KeyFormatError):
        decode_key("not base64!")
    with pytest.raises(KeyFormatError):
        decode_key(encode_key(b"short"))


def test_tai64n_orders_and_round_trips() -> None:
    assert tai64n(1700000000.5) < tai64n(1700000001.0) < tai64n(1800000000.0)
    assert abs(tai64n_to_unix(tai64n(1700000000.5)) - 1700000000.5) < 0.02
    assert tai64n(0)[:8].hex() == "400000000000000a"


@pytest.mark.parametrize("length,mtu,expected", [
    (0, 1280, 0), (1, 1280, 16), (16, 1280, 16), (17, 1280, 32), (1279, 1280, 1280),
    (1280, 1280, 1280), (1275, 1276, 1276), (100, 0, 112)])
def test_padding_like_wireguard_go(length: int, mtu: int, expected: int) -> None:
    assert padded_length(length, mtu) == expected
