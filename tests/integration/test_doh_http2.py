"""DoH over HTTP/2 at the header and frame level, from a raw h2 client that sends what browsers and
libraries never would. The server's HTTP/2 is libnghttp2 (through ngh2), which checks each header
block's form itself and resets a stream that breaks RFC 9113; the server checks the few headers it
reads. These tests hold it to that: a broken header block costs its stream (a 4xx or a RST_STREAM)
and the connection goes on; many requests in one TLS record are all answered, in few records; bodies past the connection's flow-control window still arrive (the server returns the
credit); and the process survives all of it. Frame-level abuse: test_doh_http2_frames.py."""

from __future__ import annotations

import base64
import socket
import ssl
import time

import dns.message
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest

from tests.integration.magicdns_proc import MagicDnsProcess, start_magicdns
from tests.integration.test_encrypted_dns import NAME, client_context, encrypted_ports
from tests.integration.tls_helpers import make_ca, make_leaf, write_pair

Headers = list[tuple[bytes, bytes]]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("pki-h2")
    ca = make_ca()
    cert, key = write_pair(d, make_leaf(ca, (NAME,)))
    return {"ca_file": ca.write(d / "ca.pem"), "cert": cert, "key": key}


@pytest.fixture(scope="module")
def server(pki: dict):
    s = start_magicdns("--doh", "127.0.0.1:0", "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]))
    s.extra.update(encrypted_ports(s))
    yield s
    s.stop()


class RawH2:
    """An HTTP/2 client over TLS that sends header blocks exactly as given (no validation, no
    normalisation) and records each stream's status, body and the TLS records its bytes came in."""

    def __init__(self, port: int, pki: dict) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.tls = client_context(pki, ["h2"]).wrap_socket(raw, server_hostname=NAME)
        assert self.tls.selected_alpn_protocol() == "h2"
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False, validate_inbound_headers=False))
        self.h2.initiate_connection()
        self.status: dict[int, int] = {}
        self.body: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.reset: set[int] = set()
        self.closed = False
        self.records = 0  # TLS reads that carried at least one response's end

    def send(self) -> None:
        self.tls.sendall(self.h2.data_to_send())

    def request(self, headers: Headers, body: bytes | None = None, pad: int | None = None,
                more: bool = False) -> int:
        """Open a stream; `more` leaves it open after the headers (a body follows later)."""
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, headers, end_stream=body is None and not more)
        if body is not None:
            view = memoryview(body)
            while True:  # DATA frames of at most 1000 bytes, so big bodies span many frames
                chunk, view = view[:1000], view[1000:]
                self.h2.send_data(sid, bytes(chunk), end_stream=not len(view), pad_length=pad)
                if not len(view):
                    break
        return sid

    def wait(self, sids: list[int], deadline_s: float = 10) -> None:
        deadline = time.monotonic() + deadline_s
        self.tls.settimeout(0.5)
        while not all(s in self.ended or s in self.reset for s in sids) and not self.closed:
            assert time.monotonic() < deadline, f"streams not answered: {set(sids) - self.ended - self.reset}"
            try:
                data = self.tls.recv(65536)
            except (socket.timeout, ssl.SSLWantReadError):
                continue
            if not data:
                self.closed = True
                break
            ended_before = len(self.ended)
            for ev in self.h2.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    self.status[ev.stream_id] = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    self.body.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    self.ended.add(ev.stream_id)
                elif isinstance(ev, h2.events.StreamReset):
                    self.reset.add(ev.stream_id)
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    self.closed = True
            if len(self.ended) > ended_before:
                self.records += 1
            self.send()

    def close(self) -> None:
        self.tls.close()


def head(method: bytes = b"GET", path: bytes = b"/dns-query", **extra: bytes) -> Headers:
    h = [(b":method", method), (b":scheme", b"https"), (b":authority", NAME.encode()), (b":path", path)]
    return h + [(k.replace("_", "-").encode(), v) for k, v in extra.items()]


def query(name: str = "my-server.tailnet", qid: int = 1234) -> bytes:
    q = dns.message.make_query(name, "A")
    q.id = qid
    return q.to_wire()


def get_path(q: bytes) -> bytes:
    return b"/dns-query?dns=" + base64.urlsafe_b64encode(q).rstrip(b"=")


def post(q: bytes) -> Headers:
    return head(b"POST", content_type=b"application/dns-message", content_length=str(len(q)).encode())


def alive(server: MagicDnsProcess, pki: dict) -> None:
    c = RawH2(server.extra["doh"], pki)
    try:
        sid = c.request(head(path=get_path(query())))
        c.send()
        c.wait([sid])
        assert c.status[sid] == 200
        assert "100.64.0.2" in dns.message.from_wire(bytes(c.body[sid])).to_text()
    finally:
        c.close()
    assert server.proc.poll() is None, server.log()
    assert "Traceback" not in server.log(), server.log()[-3000:]


GOAWAY = -1
MALFORMED: dict[str, tuple[Headers, bytes | None, set[int]]] = {
    "no :path": ([(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"x")], None, {404}),
    "no :method": ([(b":scheme", b"https"), (b":path", get_path(query()))], None, {405}),
    "no pseudo-headers at all": ([(b"accept", b"*/*")], None, {404}),
    "lowercase method": (head(b"get", get_path(query())), None, {405}),
    "uppercase content-type name": (head(b"POST") + [(b"Content-Type", b"application/dns-message")],
                                    query(), {415}),
    "CRLF and NUL in the path": (head(path=b"/dns-query?dns=\r\nX-Injected: 1\x00"), None, {400}),
    "not UTF-8 in the path": (head(path=b"/dns-\xff\xfequery"), None, {404}),
    "path is only the query": (head(path=b"?dns=" + get_path(query())[15:]), None, {404}),
    "absolute-form path": (head(path=b"https://dns.test" + get_path(query())), None, {200}),
    # A content-length that cannot be read or that the body contradicts: nghttp2 resets the stream
    # (PROTOCOL_ERROR); h2, the previous library, ended the whole connection. Either is allowed.
    "bad content-length": (head(b"POST", content_type=b"application/dns-message", content_length=b"-5"),
                           query(), {GOAWAY}),
    "content-length contradicting the body": (head(b"POST", content_type=b"application/dns-message",
                                                   content_length=b"3"), query(), {GOAWAY}),
    "huge content-length": (head(b"POST", content_type=b"application/dns-message", content_length=b"99999999"),
                            query(), {413, GOAWAY}),  # 413 at once, or a reset as the body contradicts it
    "content-length of a non-ASCII digit": (head(b"POST", content_type=b"application/dns-message",
                                                content_length=b"\xb2"), query(), {GOAWAY, 200}),
    "empty dns= value": (head(path=b"/dns-query?dns="), None, {400}),
    "two dns= values": (head(path=get_path(query()) + b"&dns=AAAA"), None, {400}),
    "percent-escaped base64": (head(path=get_path(query()).replace(b"A", b"%41", 3)), None, {200}),
    "repeated :path, last one counts": (head(path=b"/nothing") + [(b":path", get_path(query()))], None, {200}),
    "header names with spaces and colons": (head(path=get_path(query())) + [(b"x y:z", b"\x7f\x00")], None, {200}),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_header_block_gets_a_4xx_and_the_connection_goes_on(server: MagicDnsProcess, pki: dict,
                                                                      case: str) -> None:
    headers, body, want = MALFORMED[case]
    c = RawH2(server.extra["doh"], pki)
    try:
        bad = c.request(headers, body)
        good = c.request(head(path=get_path(query(qid=77))))  # on the same connection, after it
        c.send()
        c.wait([bad, good])
        if bad in c.status:
            assert c.status[bad] in want, (case, c.status[bad])
        if c.closed:
            assert GOAWAY in want, f"the server closed the connection over one bad stream ({case})"
        else:
            assert bad in c.reset or c.status.get(bad) in want, (case, c.status.get(bad))
            assert c.status[good] == 200 and dns.message.from_wire(bytes(c.body[good])).id == 77
    finally:
        c.close()
    alive(server, pki)


def test_many_requests_in_one_record_are_all_answered_in_few_records(server: MagicDnsProcess, pki: dict) -> None:
    """80 GETs and POSTs written at once (one TLS write): every one is answered with its own ID, and
    the answers are batched (one write per read of the server, not one TLS record per answer, which
    cost more CPU than the HTTP/2 layer itself)."""
    c = RawH2(server.extra["doh"], pki)
    try:
        sids = {}
        for i in range(80):
            q = query("db.tailnet" if i % 2 else "my-server.tailnet", qid=1000 + i)
            sids[c.request(head(path=get_path(q)) if i % 3 else post(q), q if not i % 3 else None)] = 1000 + i
        c.send()
        c.wait(list(sids))
        assert not c.closed and not c.reset, (c.closed, sorted(c.reset), server.log()[-3000:])
        for sid, qid in sids.items():
            assert c.status[sid] == 200
            assert dns.message.from_wire(bytes(c.body[sid])).id == qid
        assert c.records <= 20, f"80 answers came in {c.records} reads: not batched"
    finally:
        c.close()


def test_bodies_past_the_connection_window_keep_flowing(server: MagicDnsProcess, pki: dict) -> None:
    """320 padded POSTs of ~620 flow-controlled bytes each put ~200 KB of DATA on one connection, three
    times its initial window of 65,535: without the server handing the credit back (WINDOW_UPDATE)
    the client would stall after about 105 requests. Batches of 40 (~25 KB) stay under what the
    server may hold back (nghttp2 returns credit once half the window is used)."""
    c = RawH2(server.extra["doh"], pki)
    try:
        q = dns.message.make_query("my-server.tailnet", "A", use_edns=0, pad=468)
        q.id = 4242
        wire = q.to_wire()
        assert len(wire) >= 468
        sids: list[int] = []
        for _ in range(8):
            batch = []
            for _ in range(40):
                try:
                    batch.append(c.request(post(wire), wire, pad=150))
                except h2.exceptions.FlowControlError:
                    break
            c.send()
            c.wait(batch)
            sids += batch
        assert len(sids) == 320, f"the client ran out of window after {len(sids)} requests"
        assert all(c.status[s] == 200 and dns.message.from_wire(bytes(c.body[s])).id == 4242 for s in sids)
    finally:
        c.close()


def test_a_body_over_65535_bytes_is_refused_and_the_connection_goes_on(server: MagicDnsProcess, pki: dict) -> None:
    """A POST without Content-Length whose body grows past the largest DNS message: the server answers
    413 once it has seen too much rather than buffering on (sending it needs the window the server
    hands back as it reads)."""
    c = RawH2(server.extra["doh"], pki)
    try:
        sid = c.request(head(b"POST", content_type=b"application/dns-message"), more=True)
        sent = 0
        deadline = time.monotonic() + 10
        while sid not in c.ended and sid not in c.reset and sent < 80000:
            assert time.monotonic() < deadline and not c.closed
            room = min(c.h2.local_flow_control_window(sid), 1000)
            if room > 0:
                c.h2.send_data(sid, b"\x00" * room)
                sent += room
                c.send()
            else:
                _pump(c)
        c.wait([sid])
        assert sid in c.reset or c.status[sid] == 413, c.status.get(sid)
        assert sent > 65535
    finally:
        c.close()
    alive(server, pki)


def _pump(c: RawH2) -> None:
    """Read what the server sent (window updates) for up to 0.3 s."""
    c.tls.settimeout(0.3)
    try:
        data = c.tls.recv(65536)
    except (socket.timeout, ssl.SSLWantReadError):
        return
    if not data:
        c.closed = True
        return
    for ev in c.h2.receive_data(data):
        if isinstance(ev, h2.events.ResponseReceived):
            c.status[ev.stream_id] = int(dict(ev.headers)[b":status"])
        elif isinstance(ev, h2.events.StreamEnded):
            c.ended.add(ev.stream_id)
        elif isinstance(ev, h2.events.StreamReset):
            c.reset.add(ev.stream_id)
    c.send()
