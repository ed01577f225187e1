"""The granian DoH spike (magicdns/doh_granian.py, issue 12), in process on the resolver's own loop:
real clients (dnspython over HTTP/1.1 and HTTP/2, kdig +https, httpx) against a granian listener
answering through a real DnsServer's Dispatch.

What it proves: the same answers and HTTP semantics as the h2 listener; the allow-list, which granian
cannot check before the TLS handshake, refuses per request with 403; a client that goes away
mid-request costs nothing; the listener stops cleanly (its port is free again) on both event loops.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import httpx
import pytest

pytest.importorskip("granian")

from magicdns.doh_granian import DohApp, GranianDoh, listen_socket  # noqa: E402
from magicdns.server import DnsServer, ServerConfig  # noqa: E402
from magicdns.view import view_from_json  # noqa: E402
from tests.integration.tls_helpers import make_ca, make_leaf, write_pair  # noqa: E402

NAME = "dns.test"
VIEW = {"domain": "tailnet", "self": {"name": "a", "addresses": ["100.64.0.1"]},
        "peers": [{"name": "b", "addresses": ["100.64.0.2"]}]}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca("granian CA")
    cert, key = write_pair(d, make_leaf(ca, (NAME,), ("127.0.0.1",)))
    return {"ca_file": ca.write(d / "ca.pem"), "cert": cert, "key": key}


def _ctx(pki: dict) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki["ca_file"]))


def _run(pki: dict, check, loop_kind: str = "uvloop", allow: str = "127.0.0.0/8") -> None:  # type: ignore[no-untyped-def]
    """Start a DnsServer and a granian DoH listener on its Dispatch, run the blocking `check(port,
    app)` in a thread, stop; then the port must be free again (nothing left listening)."""
    async def main() -> None:
        server = DnsServer(ServerConfig(listen=(("127.0.0.1", 0),), allow=(ipaddress.ip_network(allow),)))
        await server.start(view_from_json(VIEW))
        sock = listen_socket("127.0.0.1", 0)
        port = sock.getsockname()[1]
        app = DohApp(server.dispatch)
        g = GranianDoh(app, sock, str(pki["cert"]), str(pki["key"]), idle_timeout=5)
        g.start()
        try:
            await asyncio.get_running_loop().run_in_executor(None, check, port, app)
        finally:
            await asyncio.wait_for(g.stop(), 10)
            await server.stop()
        with socket.socket() as probe:  # nothing accepts on the port any more
            assert probe.connect_ex(("127.0.0.1", port)) != 0

    if loop_kind == "uvloop":
        pytest.importorskip("uvloop").run(main())
    else:
        asyncio.run(main())


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_dnspython_over_http1_and_http2_get_and_post(pki: dict, loop_kind: str) -> None:
    def check(port: int, app: DohApp) -> None:
        for version in ("H1", "H2"):
            for post in (True, False):
                q = dns.message.make_query("b.tailnet", "A")
                r = dns.query.https(q, f"https://{NAME}:{port}/dns-query", bootstrap_address="127.0.0.1",
                                    timeout=5, post=post, verify=_ctx(pki),
                                    http_version=getattr(dns.query.HTTPVersion, version))
                assert r.id == q.id and r.rcode() == dns.rcode.NOERROR and "100.64.0.2" in r.to_text()
        # A name outside the tailnet takes the forwarding path (no upstream here): still one reply.
        r = dns.query.https(dns.message.make_query("example.org", "A"), f"https://{NAME}:{port}/dns-query",
                            bootstrap_address="127.0.0.1", timeout=5, verify=_ctx(pki))
        assert r.rcode() in (dns.rcode.SERVFAIL, dns.rcode.REFUSED)
        assert app.queries == 5 and app.errors == 0

    _run(pki, check, loop_kind)


def test_http_semantics_and_bad_requests(pki: dict) -> None:
    def check(port: int, app: DohApp) -> None:
        for http2 in (False, True):
            with httpx.Client(verify=_ctx(pki), http2=http2, http1=not http2, timeout=5) as c:
                def get(wire: bytes, path: str = "/dns-query") -> httpx.Response:
                    b64 = base64.urlsafe_b64encode(wire).decode().rstrip("=")
                    return c.get(f"https://127.0.0.1:{port}{path}?dns={b64}", headers={"host": NAME},
                                 extensions={"sni_hostname": NAME})
                q = dns.message.make_query("b.tailnet", "A")
                q.id = 0
                r = get(q.to_wire())
                assert r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
                assert r.status_code == 200 and r.headers["content-type"] == "application/dns-message"
                ttl = min(rr.ttl for rr in dns.message.from_wire(r.content).answer)
                assert r.headers["cache-control"] == f"max-age={ttl}"
                assert get(q.to_wire(), "/other").status_code == 404
                assert get(b"\x00" * 5).status_code == 400
                url = f"https://127.0.0.1:{port}/dns-query"
                ext = {"sni_hostname": NAME}
                assert c.post(url, content=q.to_wire(), headers={"host": NAME, "content-type": "text/plain"},
                              extensions=ext).status_code == 415
                assert c.put(url, content=q.to_wire(), headers={"host": NAME, "content-type": "text/plain"},
                             extensions=ext).status_code == 405
                for _ in range(10):  # HTTP/1.1: the 413 must not be lost to a reset over the unread body
                    big = c.post(url, content=b"\x00" * 70000,
                                 headers={"host": NAME, "content-type": "application/dns-message"}, extensions=ext)
                    assert big.status_code == 413
                assert get(q.to_wire()).status_code == 200  # the connection still serves

    _run(pki, check)


def test_a_client_outside_the_allow_list_gets_403_per_request(pki: dict) -> None:
    """granian accepts and handshakes every client itself, so the allow-list (checked before TLS by
    the h2 listener) can only refuse each request: 403, and no DNS answer."""
    def check(port: int, app: DohApp) -> None:
        q = dns.message.make_query("b.tailnet", "A")
        with httpx.Client(verify=_ctx(pki), http2=True, timeout=5) as c:
            b64 = base64.urlsafe_b64encode(q.to_wire()).decode().rstrip("=")
            r = c.get(f"https://127.0.0.1:{port}/dns-query?dns={b64}", headers={"host": NAME},
                      extensions={"sni_hostname": NAME})
            assert r.status_code == 403 and b"100.64.0.2" not in r.content
        assert app.queries == 0 and app.errors == 1

    _run(pki, check, allow="127.0.0.2/32")


@pytest.mark.skipif(shutil.which("kdig") is None, reason="kdig (knot-dnsutils) is not installed")
def test_kdig_https_verifies_the_certificate(pki: dict, tmp_path: Path) -> None:
    other = make_ca("another CA").write(tmp_path / "other.pem")

    def check(port: int, app: DohApp) -> None:
        ok = subprocess.run(["kdig", "@127.0.0.1", "-p", str(port), "+https", f"+tls-ca={pki['ca_file']}",
                             f"+tls-hostname={NAME}", "+timeout=5", "+retry=0", "b.tailnet", "A"],
                            capture_output=True, text=True, timeout=20)
        assert "100.64.0.2" in ok.stdout, ok.stdout + ok.stderr
        bad = subprocess.run(["kdig", "@127.0.0.1", "-p", str(port), "+https", f"+tls-ca={other}",
                              f"+tls-hostname={NAME}", "+timeout=5", "+retry=0", "b.tailnet", "A"],
                             capture_output=True, text=True, timeout=20)
        assert "100.64.0.2" not in bad.stdout

    _run(pki, check)


def test_a_client_that_leaves_mid_body_and_tls_below_1_2_cost_nothing(pki: dict) -> None:
    def check(port: int, app: DohApp) -> None:
        def client(highest: ssl.TLSVersion) -> ssl.SSLContext:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # else OpenSSL refuses TLS 1.1 on our side, not theirs
            ctx.minimum_version, ctx.maximum_version = ssl.TLSVersion.TLSv1, highest
            return ctx
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with client(ssl.TLSVersion.TLSv1_2).wrap_socket(raw, server_hostname=NAME) as tls:
                assert tls.version() == "TLSv1.2"  # the same client, allowed 1.2, is served
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with pytest.raises((ssl.SSLError, ConnectionResetError)):  # the server's alert, not our refusal
                client(ssl.TLSVersion.TLSv1_1).wrap_socket(raw, server_hostname=NAME)
        for _ in range(20):  # POSTs announcing 40 bytes, sending 10, then gone
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                ctx = _ctx(pki)
                ctx.set_alpn_protocols(["http/1.1"])
                with ctx.wrap_socket(raw, server_hostname=NAME) as tls:
                    tls.sendall(b"POST /dns-query HTTP/1.1\r\nhost: dns.test\r\n"
                                b"content-type: application/dns-message\r\ncontent-length: 40\r\n\r\n" + b"\x00" * 10)
        r = dns.query.https(dns.message.make_query("b.tailnet", "A"), f"https://{NAME}:{port}/dns-query",
                            bootstrap_address="127.0.0.1", timeout=5, verify=_ctx(pki))
        assert "100.64.0.2" in r.to_text()

    _run(pki, check)
