"""DERP frames and login machines against byte layouts assembled by hand from Tailscale's derp/derp.go
(type constants, field orders) and its derp_test.go vectors; plus property tests of the parsers."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st
from nacl.public import Box, PrivateKey, PublicKey

from meshnode.derp.frames import (MAGIC, MAX_PACKET_SIZE, ClosePeer, ForwardPacket, FrameError, FrameReader,
                                  FrameTooLarge, FrameType, Health, KeepAlive, NotePreferred, PeerGone,
                                  PeerGoneReason, PeerPresent, Ping, Pong, RecvPacket, Restarting, SendPacket,
                                  ServerKey, Unknown, WatchConns, encode_frame, looks_like_disco, parse_frame)
from meshnode.derp.session import (ClientHello, ClientInfo, ClientSession, LoggedIn, LoginError,
                                   PermissionDenied, ServerSession, State, public_key)

K1 = bytes(range(32))
K2 = bytes(range(32, 64))
MESH_HEX = "6d529e9d4ef632d22d4a4214cb49da8f1ba1b72697061fb24e312984c35ec8d8"


def test_magic_is_tailscales_eight_bytes() -> None:
    assert MAGIC == bytes.fromhex("44455250f09f9491")


def test_frame_header_vectors_from_derp_test_go() -> None:
    # derp_test.go TestReadFrameHeader / TestWriteFrameHeader
    assert encode_frame(FrameType.SEND_PACKET, b"\0" * 1024)[:5] == bytes([0x04, 0x00, 0x00, 0x04, 0x00])
    assert KeepAlive().encode() == bytes([0x06, 0, 0, 0, 0])


@pytest.mark.parametrize("frame, wire", [
    (ServerKey(K1), "01 00000028 44455250f09f9491" + K1.hex()),
    (SendPacket(K2, b"hi"), "04 00000022" + K2.hex() + "6869"),
    (RecvPacket(K1, b"x"), "05 00000021" + K1.hex() + "78"),
    (ForwardPacket(K1, K2, b"p"), "0a 00000041" + K1.hex() + K2.hex() + "70"),
    (KeepAlive(), "06 00000000"),
    (NotePreferred(True), "07 00000001 01"),
    (NotePreferred(False), "07 00000001 00"),
    (PeerGone(K1, PeerGoneReason.NOT_HERE), "08 00000021" + K1.hex() + "01"),
    (PeerGone(K1, PeerGoneReason.DISCONNECTED), "08 00000021" + K1.hex() + "00"),
    # 32B key + 16B IP (IPv4-mapped, Go's As16) + 2B BE port + 1B flags = 51 (0x33)
    (PeerPresent(K1, "192.0.2.1", 41641, 1), "09 00000033" + K1.hex() + "00000000000000000000ffffc0000201" + "a2a9" + "01"),
    (PeerPresent(K2, "2001:db8::1", 443, 3), "09 00000033" + K2.hex() + "20010db8000000000000000000000001" + "01bb" + "03"),
    (WatchConns(), "10 00000000"),
    (ClosePeer(K2), "11 00000020" + K2.hex()),
    (Ping(b"12345678"), "12 00000008 3132333435363738"),
    (Pong(b"12345678"), "13 00000008 3132333435363738"),
    (Health("dup client"), "14 0000000a" + b"dup client".hex()),
    (Restarting(1500, 30000), "15 00000008 000005dc 00007530"),
])
def test_golden_frames(frame: object, wire: str) -> None:
    raw = bytes.fromhex(wire.replace(" ", ""))
    assert frame.encode() == raw  # type: ignore[attr-defined]
    (ftype, payload), = FrameReader().feed(raw)
    assert parse_frame(ftype, payload) == frame


def test_old_peer_gone_and_short_peer_present_are_accepted() -> None:
    assert parse_frame(0x08, K1) == PeerGone(K1, PeerGoneReason.DISCONNECTED)
    assert parse_frame(0x09, K1) == PeerPresent(K1)
    # Newer servers may send more; the extra bytes are ignored.
    assert parse_frame(0x12, b"abcdefgh" + b"future") == Ping(b"abcdefgh")
    assert parse_frame(0x01, MAGIC + K1 + b"more") == ServerKey(K1)


@pytest.mark.parametrize("ftype, payload, why", [
    (0x01, b"DERPnope" + K1, "greeting"),
    (0x04, b"short", "short"),
    (0x04, K1 + b"\0" * (MAX_PACKET_SIZE + 1), "exceeds"),
    (0x0a, K1 + b"x", "short"),
    (0x07, b"", "wrong size"),
    (0x10, b"x", "wrong size"),
    (0x11, K1[:31], "wrong size"),
    (0x12, b"1234567", "short"),
    (0x12, b"\0" * 1001, "too large"),
    (0x14, b"\xff\xfe", "health"),
    (0x15, b"\0\0\0", "short"),
])
def test_malformed_frames_raise_frame_error(ftype: int, payload: bytes, why: str) -> None:
    with pytest.raises(FrameError, match=why):
        parse_frame(ftype, payload)


def test_unknown_frame_types_are_kept_not_refused() -> None:
    assert parse_frame(0x7f, b"abc") == Unknown(0x7f, b"abc")


def test_reader_splits_stream_at_any_boundary_and_refuses_oversize_header() -> None:
    stream = SendPacket(K1, b"a" * 100).encode() + KeepAlive().encode() + Ping(b"8bytes!!").encode()
    for cut in range(len(stream) + 1):
        r = FrameReader()
        frames = r.feed(stream[:cut]) + r.feed(stream[cut:])
        assert [t for t, _ in frames] == [0x04, 0x06, 0x12]
    r = FrameReader(max_frame=1000)
    with pytest.raises(FrameTooLarge):
        r.feed(bytes([0x05, 0xff, 0xff, 0xff, 0xff]))  # derp_test.go's 0xffffffff length


def test_disco_detection_matches_tailscale() -> None:
    disco = "TS💬".encode() + b"\1" * 32 + b"\2" * 24
    assert looks_like_disco(disco)
    assert not looks_like_disco(disco[:-1])        # shorter than magic + key + nonce
    assert not looks_like_disco(b"\x04" + disco[1:])


# --- ClientInfo JSON (derp_test.go TestClientInfoUnmarshal) -------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("{}", ClientInfo(version=0, can_ack_pings=False)),
    ('{"Version":5,"MeshKey":"%s"}' % MESH_HEX, ClientInfo(version=5, mesh_key=bytes.fromhex(MESH_HEX),
                                                           can_ack_pings=False)),
    ('{"version":5,"meshKey":"%s"}' % MESH_HEX, ClientInfo(version=5, mesh_key=bytes.fromhex(MESH_HEX),
                                                           can_ack_pings=False)),
])
def test_client_info_unmarshal(text: str, want: ClientInfo) -> None:
    assert ClientInfo.from_json(text.encode()) == want


@pytest.mark.parametrize("text", ['{"version":5,"meshKey":"abcdefg"}', '{"version":5,"meshKey":"%s"}' % ("ff" * 34),
                                  "[]", "{", '{"version":"2"}'])
def test_client_info_bad(text: str) -> None:
    with pytest.raises(LoginError):
        ClientInfo.from_json(text.encode())


def test_client_info_json_is_what_go_marshals() -> None:
    # Field order of derp.ClientInfo: meshKey (omitzero), version (omitempty), CanAckPings, IsProber, AppName
    assert ClientInfo().to_json() == b'{"version":2,"CanAckPings":true}'
    assert ClientInfo(mesh_key=bytes.fromhex(MESH_HEX), can_ack_pings=False, is_prober=True,
                      app_name="meshnode").to_json() == (
        b'{"meshKey":"%s","version":2,"CanAckPings":false,"IsProber":true,"AppName":"meshnode"}' % MESH_HEX.encode())


# --- login ---------------------------------------------------------------------------------------------

SERVER_PRIV = bytes([7]) * 32
CLIENT_PRIV = bytes([9]) * 32
NONCE = bytes(range(24))


def _login(client_info: ClientInfo = ClientInfo(), mesh_key: bytes | None = None
           ) -> tuple[ClientSession, ServerSession, list]:
    server = ServerSession(SERVER_PRIV, mesh_key=mesh_key, nonce=NONCE)
    client = ClientSession(CLIENT_PRIV, client_info, nonce=NONCE)
    assert client.receive(server.greeting()) == []
    hello = server.receive(client.take_output())
    return client, server, hello


def test_login_layouts_and_boxes() -> None:
    server = ServerSession(SERVER_PRIV, nonce=NONCE)
    client = ClientSession(CLIENT_PRIV, nonce=NONCE)
    spub, cpub = public_key(SERVER_PRIV), public_key(CLIENT_PRIV)
    assert server.greeting() == bytes.fromhex("0100000028") + MAGIC + spub
    client.receive(server.greeting())
    wire = client.take_output()
    msg = b'{"version":2,"CanAckPings":true}'
    # 02, len = 32 key + 24 nonce + JSON + 16 Poly1305 tag, the client key, the nonce, the box.
    assert wire[:5] == bytes([0x02]) + (32 + 24 + len(msg) + 16).to_bytes(4, "big")
    assert wire[5:37] == cpub and wire[37:61] == NONCE
    opened = Box(PrivateKey(SERVER_PRIV), PublicKey(cpub)).decrypt(wire[61:], NONCE)
    assert opened == msg
    [hello] = server.receive(wire)
    assert hello == ClientHello(cpub, ClientInfo())
    info_frame, held = server.accept()
    assert info_frame[0] == 0x03 and info_frame[5:29] == NONCE and held == []
    assert Box(PrivateKey(CLIENT_PRIV), PublicKey(spub)).decrypt(info_frame[29:], NONCE) == b'{"version":2}'
    assert client.receive(info_frame) == [LoggedIn(spub, {"version": 2})]
    assert client.state is State.READY and server.state is State.READY


def test_frames_sent_before_admission_are_held_until_accept() -> None:
    client, server, _ = _login()
    assert server.receive(SendPacket(K1, b"early").encode()) == []
    _, held = server.accept()
    assert held == [SendPacket(K1, b"early")]


def test_pings_are_answered_by_both_sessions() -> None:
    client, server, _ = _login()
    info, _ = server.accept()
    client.receive(info)
    assert server.receive(Ping(b"abcdefgh").encode()) == [Ping(b"abcdefgh")]
    assert server.take_output() == Pong(b"abcdefgh").encode()
    assert client.receive(Ping(b"12345678").encode()) == [Ping(b"12345678")]
    assert client.take_output() == Pong(b"12345678").encode()


def test_box_sealed_to_another_key_is_refused() -> None:
    server = ServerSession(SERVER_PRIV)
    imposter_view = ServerSession(bytes([8]) * 32)      # the client sealed to this server's key
    client = ClientSession(CLIENT_PRIV)
    client.receive(imposter_view.greeting())
    with pytest.raises(LoginError, match="cannot open"):
        server.receive(client.take_output())


def test_first_frame_must_be_client_info_and_server_key() -> None:
    with pytest.raises(LoginError):
        ServerSession(SERVER_PRIV).receive(SendPacket(K1, b"x").encode())
    with pytest.raises(LoginError):
        ClientSession(CLIENT_PRIV).receive(KeepAlive().encode())


def test_mesh_frames_need_the_mesh_key() -> None:
    mesh = bytes.fromhex(MESH_HEX)
    _, server, _ = _login(mesh_key=mesh)
    server.accept()
    assert not server.can_mesh
    with pytest.raises(PermissionDenied):
        server.receive(WatchConns().encode())
    _, server, _ = _login(ClientInfo(mesh_key=bytes(32)), mesh_key=mesh)
    assert not server.can_mesh                           # wrong key
    _, server, _ = _login(ClientInfo(mesh_key=mesh), mesh_key=mesh)
    server.accept()
    assert server.can_mesh
    assert server.receive(ForwardPacket(K1, K2, b"p").encode()) == [ForwardPacket(K1, K2, b"p")]


def test_client_info_before_login_is_bounded() -> None:
    with pytest.raises(FrameTooLarge):
        ServerSession(SERVER_PRIV).receive(bytes([0x02]) + (300 << 10).to_bytes(4, "big"))


# --- properties -----------------------------------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(st.integers(0, 255), st.binary(max_size=300))
def test_parse_frame_raises_only_frame_error(ftype: int, payload: bytes) -> None:
    try:
        frame = parse_frame(ftype, payload)
    except FrameError:
        return
    assert frame is not None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=8))
def test_sessions_raise_only_frame_error_on_any_stream(chunks: list[bytes]) -> None:
    server = ServerSession(SERVER_PRIV)
    client = ClientSession(CLIENT_PRIV)
    for session in (server, client):
        try:
            for chunk in chunks:
                session.receive(chunk)
        except FrameError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=60), max_size=6))
def test_logged_in_server_raises_only_frame_error(chunks: list[bytes]) -> None:
    _, server, _ = _login()
    server.accept()
    try:
        for chunk in chunks:
            server.receive(bytes([0x04]) + len(chunk).to_bytes(4, "big") + chunk)
            server.receive(chunk)
    except FrameError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary(max_size=2000))
def test_send_packet_round_trip(dst: bytes, packet: bytes) -> None:
    (t, p), = FrameReader().feed(SendPacket(dst, packet).encode())
    assert parse_frame(t, p) == SendPacket(dst, packet)
    assert json.loads(ClientInfo(app_name="x").to_json())["AppName"] == "x"
