"""Hostile DoT/DoH clients against `magicdns serve`: fuzzed TLS ClientHellos, broken HTTP/1.1 and
HTTP/2, random DoH bodies, and clients that never read. None may crash the resolver or hold it: after
each, a well-behaved client still gets its answer, and the process is alive."""

from __future__ import annotations

import json
import socket
import ssl
import time
from pathlib import Path

import dns.message
import dns.query
import httpx2 as httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.magicdns_proc import MagicDnsProcess, run_cli, start_magicdns
from tests.integration.test_encrypted_dns import NAME, client_context, encrypted_ports
from tests.integration.tls_helpers import make_ca, make_leaf, write_pair
from tests.support import wait_until

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("pki-abuse")
    ca = make_ca()
    cert, key = write_pair(d, make_leaf(ca, (NAME,)))
    return {"ca_file": ca.write(d / "ca.pem"), "cert": cert, "key": key}


BIG_TXT = " ".join('"' + "x" * 250 + '"' for _ in range(12))  # a ~3 KB answer fills buffers fast


@pytest.fixture(scope="module")
def server(pki: dict, tmp_path_factory: pytest.TempPathFactory):
    view = json.loads((Path(__file__).resolve().parents[2] / "conf" / "view.json").read_text())
    view["dns"]["records"].append({"name": "big.tailnet", "type": "TXT", "value": BIG_TXT, "ttl": 60})
    path = tmp_path_factory.mktemp("view") / "view.json"
    path.write_text(json.dumps(view))
    s = start_magicdns("--dot", "127.0.0.1:0", "--doh", "127.0.0.1:0", "--tls-cert", str(pki["cert"]),
                       "--tls-key", str(pki["key"]), "--tcp-idle-timeout", "1", view=str(path))
    s.extra.update(encrypted_ports(s))
    yield s
    s.stop()


def alive(server: MagicDnsProcess, pki: dict) -> None:
    assert server.proc.poll() is None, server.log()
    r = dns.query.tls(dns.message.make_query("my-server.tailnet", "A"), "127.0.0.1", port=server.extra["dot"],
                      timeout=5, ssl_context=client_context(pki), server_hostname=NAME)
    assert "100.64.0.2" in r.to_text()


def blast(port: int, data: bytes, tls: ssl.SSLContext | None = None, alpn: str | None = None) -> None:
    """Send `data` (raw, or inside TLS), then read until the server closes or 2 s pass."""
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw:
        sock: socket.socket = raw
        if tls is not None:
            sock = tls.wrap_socket(raw, server_hostname=NAME)
        try:
            sock.sendall(data)
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline and sock.recv(65536):
                pass
        except (OSError, ssl.SSLError):
            pass  # the server hung up on us: that is an acceptable answer to garbage


def client_hello() -> bytes:
    """A real TLS ClientHello (Python's OpenSSL), captured with memory BIOs."""
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["h2", "http/1.1", "dot"])
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=NAME)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


HELLO = client_hello()


@FUZZ
@given(cut=st.integers(0, len(HELLO)), flips=st.lists(st.tuples(st.integers(0, len(HELLO) - 1), st.integers(1, 255)),
                                                       max_size=8), tail=st.binary(max_size=64), kind=st.sampled_from(["dot", "doh"]))
def test_mutated_client_hellos_never_crash_the_resolver(server: MagicDnsProcess, cut: int, flips: list,
                                                        tail: bytes, kind: str) -> None:
    data = bytearray(HELLO)
    for pos, x in flips:
        data[pos] ^= x
    blast(server.extra[kind], bytes(data[:cut]) + tail)
    assert server.proc.poll() is None, server.log()


@FUZZ
@given(data=st.binary(max_size=2048), kind=st.sampled_from(["dot", "doh"]))
def test_random_bytes_instead_of_tls(server: MagicDnsProcess, data: bytes, kind: str) -> None:
    blast(server.extra[kind], data)
    assert server.proc.poll() is None, server.log()


HTTP_PIECES = st.sampled_from([b"GET ", b"POST ", b"PUT ", b"/dns-query", b"?dns=", b"AAABAAABAAAAAAAA", b" HTTP/1.1",
                               b" HTTP/1.0", b" HTTP/2", b"\r\n", b"\n", b"Host: x\r\n", b"Content-Length: 5\r\n",
                               b"Content-Length: -1\r\n", b"Content-Length: 99999999\r\n",
                               b"Transfer-Encoding: chunked\r\n", b"Content-Type: application/dns-message\r\n",
                               b"0\r\n\r\n", b"ffffffff\r\n", b"\x00", b"\xff" * 20, b":", b" " * 10])


@FUZZ
@given(parts=st.lists(HTTP_PIECES, max_size=25), junk=st.binary(max_size=64))
def test_broken_http11_requests_get_an_error_or_a_close(server: MagicDnsProcess, pki: dict, parts: list,
                                                        junk: bytes) -> None:
    blast(server.extra["doh"], b"".join(parts) + junk, client_context(pki, ["http/1.1"]))
    assert server.proc.poll() is None, server.log()


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@FUZZ
@given(frames=st.binary(max_size=1024), with_preface=st.booleans())
def test_broken_http2_streams_get_goaway_or_a_close(server: MagicDnsProcess, pki: dict, frames: bytes,
                                                   with_preface: bool) -> None:
    blast(server.extra["doh"], (PREFACE if with_preface else b"") + frames, client_context(pki, ["h2"]))
    assert server.proc.poll() is None, server.log()


def test_after_the_fuzzing_the_resolver_still_answers(server: MagicDnsProcess, pki: dict) -> None:
    alive(server, pki)
    assert "Traceback" not in server.log(), server.log()[-3000:]


@pytest.mark.parametrize("http2", [False, True])
def test_random_doh_bodies_get_dns_errors_or_400(server: MagicDnsProcess, pki: dict, http2: bool) -> None:
    @FUZZ
    @given(body=st.binary(max_size=600))
    def post(body: bytes) -> None:
        r = c.post(f"https://127.0.0.1:{server.extra['doh']}/dns-query", content=body,
                   headers={"host": NAME, "content-type": "application/dns-message"}, extensions={"sni_hostname": NAME})
        assert r.status_code in (200, 400), r.status_code
        if r.status_code == 200:
            dns.message.from_wire(r.content, ignore_trailing=True, question_only=True)

    with httpx.Client(verify=client_context(pki), http2=http2, http1=not http2, timeout=5) as c:
        post()
    alive(server, pki)


def test_a_dot_client_that_never_reads_is_cut_off(server: MagicDnsProcess, pki: dict) -> None:
    """Queries are pipelined without reading a single reply: the server stops reading once its buffer
    for us is full and aborts the connection within about one idle timeout."""
    q = dns.message.make_query("big.tailnet", "TXT").to_wire()
    frame = len(q).to_bytes(2, "big") + q
    raw = socket.create_connection(("127.0.0.1", server.extra["dot"]), timeout=5)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    tls = client_context(pki, ["dot"]).wrap_socket(raw, server_hostname=NAME)
    tls.settimeout(0.5)
    # Kernel socket buffers alone (tcp_rmem + tcp_wmem autotuning) absorb several MB of queries
    # before the server's pause shows at our end, so the budget is far above that: the loop ends
    # at the cut or the deadline. send() (not sendall) keeps the framing intact on a timeout.
    chunk = memoryview(frame * 50)
    sent, off, cut = 0, 0, False
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline and sent < 5_000_000:
            try:
                off += tls.send(chunk[off:])
            except (socket.timeout, ssl.SSLWantWriteError):
                continue  # the server stopped reading: keep pushing until it gives up on us
            except (ConnectionError, ssl.SSLError, OSError):
                cut = True
                break
            if off == len(chunk):
                off, sent = 0, sent + 50
    finally:
        tls.close()
    assert cut, f"still connected after {sent} unread queries"
    out = json.loads(run_cli("status", "--control-socket", server.control_socket, "--json").stdout)
    assert out["tcp"]["stalled_closed"] >= 1
    alive(server, pki)


def test_a_doh_client_that_never_reads_is_cut_off(server: MagicDnsProcess, pki: dict) -> None:
    import h2.connection
    import h2.config
    q = dns.message.make_query("big.tailnet", "TXT").to_wire()
    raw = socket.create_connection(("127.0.0.1", server.extra["doh"]), timeout=5)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    tls = client_context(pki, ["h2"]).wrap_socket(raw, server_hostname=NAME)
    assert tls.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    tls.sendall(conn.data_to_send())
    tls.settimeout(0.5)
    cut = False
    deadline = time.monotonic() + 20
    headers = [(":method", "POST"), (":path", "/dns-query"), (":scheme", "https"), (":authority", NAME),
               ("content-type", "application/dns-message")]
    try:
        while time.monotonic() < deadline:
            # Never read: open streams until the server's stream limit or buffers stop us.
            try:
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, headers)
                conn.send_data(sid, q, end_stream=True)
            except Exception:
                pass  # h2's own limits on our side; keep writing what is queued
            try:
                tls.sendall(conn.data_to_send() or b"\x00\x00\x00\x08\x00\x00\x00\x00\x00" + b"\x00" * 0)
            except (socket.timeout, ssl.SSLWantWriteError):
                continue
            except (ConnectionError, ssl.SSLError, OSError):
                cut = True
                break
    finally:
        tls.close()
    assert cut, "a never-reading HTTP/2 client is still connected"
    alive(server, pki)


def test_one_client_cannot_take_every_encrypted_slot(pki: dict) -> None:
    """The TCP listener's slot rules hold for DoT and DoH: with 8 slots one address holds at most 4
    (max(4, 8/8)); the 5th connection is dropped once its handshake is done, and answers go on."""
    s = start_magicdns("--dot", "127.0.0.1:0", "--doh", "127.0.0.1:0", "--tls-cert", str(pki["cert"]),
                       "--tls-key", str(pki["key"]), "--max-tcp-connections", "8")
    held: list[ssl.SSLSocket] = []
    try:
        s.extra.update(encrypted_ports(s))
        ctx = client_context(pki, ["dot"])
        for _ in range(4):
            held.append(ctx.wrap_socket(socket.create_connection(("127.0.0.1", s.extra["dot"]), timeout=5),
                                        server_hostname=NAME))
        extra = ctx.wrap_socket(socket.create_connection(("127.0.0.1", s.extra["doh"]), timeout=5),
                                server_hostname=NAME)
        extra.settimeout(5)
        try:
            assert extra.recv(1) == b""  # closed by the server, not served
        except (ConnectionError, ssl.SSLError):
            pass
        extra.close()
        out = json.loads(run_cli("status", "--control-socket", s.control_socket, "--json").stdout)
        assert out["tcp"]["per_client_rejected"] >= 1 and out["encrypted"]["connections"] == 4
        q = dns.message.make_query("my-server.tailnet", "A")
        dns.query.send_tcp(held[0], q)
        r, _ = dns.query.receive_tcp(held[0], expiration=time.time() + 5)
        assert "100.64.0.2" in r.to_text()
    finally:
        for h in held:
            h.close()
        s.stop()


@pytest.mark.parametrize("kind", ["dot", "doh"])
def test_a_client_that_never_finishes_its_handshake_is_closed(server: MagicDnsProcess, kind: str) -> None:
    """Half a ClientHello, then silence: the 5 s handshake deadline closes the connection."""
    with socket.create_connection(("127.0.0.1", server.extra[kind]), timeout=12) as raw:
        raw.sendall(HELLO[:20])
        start = time.monotonic()
        try:
            while raw.recv(4096):
                pass
        except ConnectionError:
            pass
        assert time.monotonic() - start < 10
