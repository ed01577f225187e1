"""The DoH listener's HTTP/2 at the frame level (libnghttp2 through ngh2), from a client that writes
frames by hand: garbage after the preface, a header block HPACK cannot decode, a header list past the
advertised limit, a CONTINUATION flood, a stream reset in the middle of its request, far more streams
than SETTINGS_MAX_CONCURRENT_STREAMS, and a rapid-reset flood (CVE-2023-44487). Each must end in a
GOAWAY, a RST_STREAM or a plain close, never a traceback in the resolver; where only one stream was
at fault the connection goes on; and a new connection is answered afterwards."""

from __future__ import annotations

import base64
import socket
import ssl
import struct
import time

import dns.message
import hpack

from tests.integration.magicdns_proc import MagicDnsProcess
from tests.integration.test_doh_http2 import pki, server  # noqa: F401  (the same listener fixtures)
from tests.integration.test_encrypted_dns import NAME, client_context

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
PROTOCOL_ERROR, CANCEL, COMPRESSION_ERROR, REFUSED_STREAM, ENHANCE_YOUR_CALM = 0x1, 0x8, 0x9, 0x7, 0xB




def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", sid) + payload


def rst(sid: int, code: int = CANCEL) -> bytes:
    return frame(RST_STREAM, 0, sid, struct.pack(">I", code))


def query(qid: int = 1234) -> bytes:
    q = dns.message.make_query("my-server.tailnet", "A")
    q.id = qid
    return q.to_wire()


def get_head(qid: int = 1234) -> list[tuple[bytes, bytes]]:
    path = b"/dns-query?dns=" + base64.urlsafe_b64encode(query(qid)).rstrip(b"=")
    return [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", NAME.encode()), (b":path", path)]


POST_HEAD = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", NAME.encode()),
             (b":path", b"/dns-query"), (b"content-type", b"application/dns-message")]


class Frames:
    """A TLS connection that speaks HTTP/2 by hand and records every frame the server sends."""

    def __init__(self, port: int, pki: dict) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.tls = client_context(pki, ["h2"]).wrap_socket(raw, server_hostname=NAME)
        assert self.tls.selected_alpn_protocol() == "h2"
        self.enc = hpack.Encoder()
        self.dec = hpack.Decoder()
        self.buf = b""
        self.closed = False
        self.status: dict[int, int] = {}
        self.body: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}
        self.goaway: int | None = None  # its error code
        self.tls.sendall(PREFACE + frame(SETTINGS, 0, 0))

    def headers(self, sid: int, headers: list[tuple[bytes, bytes]], end_stream: bool = True) -> bytes:
        return frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), sid, self.enc.encode(headers))

    def send(self, data: bytes) -> None:
        try:
            self.tls.sendall(data)
        except (OSError, ssl.SSLError):
            self.closed = True

    def read(self, done, deadline_s: float = 10) -> None:
        """Read frames until `done()` holds or the server closes; fail past the deadline."""
        deadline = time.monotonic() + deadline_s
        self.tls.settimeout(0.5)
        while not done() and not self.closed:
            assert time.monotonic() < deadline, "the server neither answered nor closed"
            try:
                data = self.tls.recv(65536)
            except (socket.timeout, ssl.SSLWantReadError):
                continue
            except (OSError, ssl.SSLError):
                data = b""
            if not data:
                self.closed = True
                break
            self.buf += data
            self._parse()

    def _parse(self) -> None:
        while len(self.buf) >= 9:
            length = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + length:
                return
            kind, flags, sid = self.buf[3], self.buf[4], int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
            payload, self.buf = self.buf[9:9 + length], self.buf[9 + length:]
            if kind == HEADERS:
                self.status[sid] = int(dict(self.dec.decode(payload, raw=True))[b":status"])
            elif kind == DATA:
                self.body.setdefault(sid, bytearray()).extend(payload)
                if payload:  # hand the credit back, as any client does
                    inc = struct.pack(">I", len(payload))
                    self.send(frame(WINDOW_UPDATE, 0, 0, inc) + frame(WINDOW_UPDATE, 0, sid, inc))
            elif kind == RST_STREAM:
                self.resets[sid] = int.from_bytes(payload, "big")
            elif kind == GOAWAY:
                self.goaway = int.from_bytes(payload[4:8], "big")
            elif kind == SETTINGS and not flags & ACK:
                self.send(frame(SETTINGS, ACK, 0))
            if kind in (HEADERS, DATA) and flags & END_STREAM:
                self.ended.add(sid)

    def answered(self, sid: int, qid: int) -> bool:
        return (sid in self.ended and self.status.get(sid) == 200
                and dns.message.from_wire(bytes(self.body[sid])).id == qid)

    def close(self) -> None:
        self.tls.close()


def healthy(server: MagicDnsProcess, pki: dict) -> None:
    """The process lives, logged no traceback, and a new connection gets its answer."""
    c = Frames(server.extra["doh"], pki)
    try:
        c.send(c.headers(1, get_head(99)))
        c.read(lambda: 1 in c.ended)
        assert c.answered(1, 99)
    finally:
        c.close()
    assert server.proc.poll() is None, server.log()
    log = server.log()
    assert "Traceback" not in log and "Fatal error" not in log, log[-3000:]


def test_garbage_after_the_preface_gets_a_goaway(server: MagicDnsProcess, pki: dict) -> None:
    c = Frames(server.extra["doh"], pki)
    try:
        # A DATA frame on stream 0 is a connection error (RFC 9113 section 6.1), then plain junk.
        c.send(frame(DATA, 0, 0, b"x" * 10) + b"\xff" * 64)
        c.read(lambda: False)
        assert c.closed and c.goaway == PROTOCOL_ERROR, (c.closed, c.goaway)
    finally:
        c.close()
    healthy(server, pki)


def test_a_header_block_hpack_cannot_decode_ends_the_connection(server: MagicDnsProcess, pki: dict) -> None:
    """HPACK state is shared by the whole connection, so an undecodable block is a connection error
    (COMPRESSION_ERROR, RFC 9113 section 4.3); index 0 and an index past both tables are invalid."""
    c = Frames(server.extra["doh"], pki)
    try:
        c.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\x82\x87\xff\xff\xff\xff\x0f\x80"))
        c.read(lambda: False)
        assert c.closed and c.goaway == COMPRESSION_ERROR, (c.closed, c.goaway)
        assert 1 not in c.status
    finally:
        c.close()
    healthy(server, pki)


def test_a_header_list_past_the_limit_ends_the_connection_with_a_reason(server: MagicDnsProcess,
                                                                        pki: dict) -> None:
    """~40 KB of headers (the server advertises 16 KB in SETTINGS_MAX_HEADER_LIST_SIZE), split over
    HEADERS and CONTINUATION frames: nghttp2 stops decoding at the limit instead of buffering on, and
    the connection ends with GOAWAY ENHANCE_YOUR_CALM; the request before it was answered."""
    c = Frames(server.extra["doh"], pki)
    try:
        c.send(c.headers(1, get_head(7)))
        c.read(lambda: 1 in c.ended)
        big = POST_HEAD + [(b"x-pad-%d" % i, b"v" * 1000) for i in range(40)]
        block = hpack.Encoder().encode(big)  # its own encoder: the connection's table stays as it was
        parts = [block[i:i + 8000] for i in range(0, len(block), 8000)]
        data = frame(HEADERS, END_STREAM, 3, parts[0])
        for i, part in enumerate(parts[1:], 1):
            data += frame(CONTINUATION, END_HEADERS if i == len(parts) - 1 else 0, 3, part)
        c.send(data)
        c.read(lambda: False)
        assert c.closed and c.goaway == ENHANCE_YOUR_CALM, (c.closed, c.goaway)
        assert c.answered(1, 7) and 3 not in c.status
    finally:
        c.close()
    healthy(server, pki)


def test_a_continuation_flood_is_cut_off(server: MagicDnsProcess, pki: dict) -> None:
    """A header block that never ends (HEADERS without END_HEADERS, then CONTINUATION after
    CONTINUATION): the server stops it at a bound instead of buffering on."""
    c = Frames(server.extra["doh"], pki)
    try:
        data = frame(HEADERS, 0, 1, hpack.Encoder().encode(POST_HEAD))
        data += b"".join(frame(CONTINUATION, 0, 1, hpack.Encoder().encode([(b"x-a", b"b" * 100)]))
                         for _ in range(200))
        c.send(data)
        c.read(lambda: False)
        assert c.closed and c.goaway == ENHANCE_YOUR_CALM, (c.closed, c.goaway)
    finally:
        c.close()
    healthy(server, pki)


def test_a_stream_reset_mid_request_is_forgotten_and_the_connection_goes_on(server: MagicDnsProcess,
                                                                           pki: dict) -> None:
    c = Frames(server.extra["doh"], pki)
    try:
        q = query(55)
        c.send(c.headers(1, POST_HEAD, end_stream=False) + frame(DATA, 0, 1, q[:5]))
        c.send(rst(1) + frame(DATA, END_STREAM, 1, q[5:]))  # the rest arrives after the reset
        c.send(c.headers(3, POST_HEAD, end_stream=False) + frame(DATA, END_STREAM, 3, query(56)))
        c.read(lambda: 3 in c.ended)
        assert not c.closed
        assert 1 not in c.status, "the reset request was answered"
        assert c.answered(3, 56)
    finally:
        c.close()
    healthy(server, pki)


def test_many_more_streams_than_allowed_are_answered_or_refused(server: MagicDnsProcess, pki: dict) -> None:
    """300 requests in one write to a server that allows 100 concurrent streams: every stream is
    answered with its own ID or refused (RST_STREAM, REFUSED_STREAM or PROTOCOL_ERROR), nothing is
    lost silently, and the connection (or at worst a new one) goes on."""
    c = Frames(server.extra["doh"], pki)
    try:
        sids = list(range(1, 600, 2))
        c.send(b"".join(c.headers(sid, get_head(sid)) for sid in sids))
        c.read(lambda: all(s in c.ended or s in c.resets for s in sids))
        answered = [s for s in sids if s in c.ended]
        assert all(c.answered(s, s) for s in answered)
        if not c.closed:
            assert all(c.resets[s] in (REFUSED_STREAM, PROTOCOL_ERROR) for s in sids if s not in c.ended)
        assert len(answered) >= 100, f"only {len(answered)} of 300 answered"
    finally:
        c.close()
    healthy(server, pki)


def test_a_rapid_reset_flood_is_cut_off(server: MagicDnsProcess, pki: dict) -> None:
    """CVE-2023-44487: open a stream and reset it at once, thousands of times. nghttp2's reset rate
    limit ends the connection with a GOAWAY instead of doing the work for each."""
    c = Frames(server.extra["doh"], pki)
    try:
        for batch in range(10):
            first = 1 + batch * 1000 * 2
            c.send(b"".join(c.headers(sid, POST_HEAD, end_stream=False) + rst(sid)
                            for sid in range(first, first + 2000, 2)))
            if c.closed:
                break
        c.read(lambda: False, deadline_s=15)
        assert c.closed and c.goaway is not None, (c.closed, c.goaway)
    finally:
        c.close()
    healthy(server, pki)
