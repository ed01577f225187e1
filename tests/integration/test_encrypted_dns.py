"""DoT and DoH from `magicdns serve --dot/--doh` on loopback, with a test CA made here.

Clients: kdig (+tls, +https, +https-get; GnuTLS and nghttp2), dnspython's DoT and DoH clients, and
httpx over HTTP/1.1 and HTTP/2 for the HTTP-level checks (Cache-Control, statuses). Local names come
from the resolver's zone, forwarded names from a second `magicdns serve` used as its upstream.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import subprocess
import time
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import httpx2 as httpx
import pytest

from tests.integration.magicdns_proc import MagicDnsProcess, run_cli, start_magicdns
from tests.integration.tls_helpers import CaForTests, make_ca, make_leaf, write_pair
from tests.support import free_port, wait_until

NAME = "dns.test"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("pki")
    ca, other = make_ca("test CA"), make_ca("someone else's CA")
    cert, key = write_pair(d, make_leaf(ca, (NAME,), ("127.0.0.1",)))
    return {"dir": d, "ca": ca, "ca_file": ca.write(d / "ca.pem"), "other_file": other.write(d / "other.pem"),
            "cert": cert, "key": key}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("upstream")
    view = d / "view.json"
    view.write_text(json.dumps({"domain": "upstream.test", "self": {"name": "ns", "addresses": ["100.64.9.1"]},
                                "peers": [], "version": 1, "dns": {"records": [
                                    {"name": "www.upstream.test", "type": "A", "value": "192.0.2.10", "ttl": 120}]}}))
    up = start_magicdns(view=str(view), db=False, probe="www.upstream.test")
    yield up
    up.stop()


def encrypted_ports(server: MagicDnsProcess) -> dict[str, int]:
    out = run_cli("status", "--control-socket", server.control_socket, "--json")
    assert out.returncode == 0, out.stderr
    ports = {}
    for item in json.loads(out.stdout)["encrypted"]["listeners"]:
        kind, addr = item.split()
        ports[kind] = int(addr.rsplit(":", 1)[1])
    return ports


def start_tls_server(pki: dict, upstream: MagicDnsProcess, *extra: str) -> MagicDnsProcess:
    server = start_magicdns("--upstream", f"127.0.0.1:{upstream.port}", "--dot", "127.0.0.1:0",
                            "--doh", "127.0.0.1:0", "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]),
                            *extra)
    server.extra.update(encrypted_ports(server))
    return server


@pytest.fixture(scope="module")
def server(pki: dict, upstream: MagicDnsProcess):
    s = start_tls_server(pki, upstream)
    yield s
    s.stop()


def kdig(port: int, qname: str, *opts: str, ca: Path, hostname: str = NAME) -> subprocess.CompletedProcess:
    return subprocess.run(["kdig", "@127.0.0.1", "-p", str(port), *opts, f"+tls-ca={ca}",
                           f"+tls-hostname={hostname}", "+time=3", "+retry=0", qname, "A"],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("mode", ["+tls", "+https", "+https-get"])
@pytest.mark.parametrize("qname,address", [("my-server.tailnet", "100.64.0.2"), ("www.upstream.test", "192.0.2.10")])
def test_kdig_resolves_local_and_forwarded_names_verifying_the_certificate(
        server: MagicDnsProcess, pki: dict, mode: str, qname: str, address: str) -> None:
    port = server.extra["dot" if mode == "+tls" else "doh"]
    out = kdig(port, qname, mode, ca=pki["ca_file"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "NOERROR" in out.stdout and address in out.stdout, out.stdout
    if mode != "+tls":
        assert "HTTP/2" in out.stdout  # kdig speaks h2 only: ALPN picked it


@pytest.mark.parametrize("mode", ["+tls", "+https"])
def test_a_client_trusting_another_ca_or_name_fails(server: MagicDnsProcess, pki: dict, mode: str) -> None:
    port = server.extra["dot" if mode == "+tls" else "doh"]
    wrong_ca = kdig(port, "my-server.tailnet", mode, ca=pki["other_file"])
    assert wrong_ca.returncode != 0 and "100.64.0.2" not in wrong_ca.stdout
    wrong_name = kdig(port, "my-server.tailnet", mode, ca=pki["ca_file"], hostname="other.test")
    assert wrong_name.returncode != 0 and "100.64.0.2" not in wrong_name.stdout


def client_context(pki: dict, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca_file"]))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def test_dnspython_dot_pipelines_on_one_connection(server: MagicDnsProcess, pki: dict) -> None:
    port = server.extra["dot"]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with client_context(pki, ["dot"]).wrap_socket(raw, server_hostname=NAME) as tls:
            assert tls.selected_alpn_protocol() == "dot"
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            for qname, addr in (("my-server.tailnet", "100.64.0.2"), ("www.upstream.test", "192.0.2.10"),
                                ("db.tailnet", "100.64.0.3")):
                q = dns.message.make_query(qname, "A")
                dns.query.send_tcp(tls, q)
                r, _ = dns.query.receive_tcp(tls, expiration=time.time() + 5)
                assert r.id == q.id and addr in r.to_text()
    r = dns.query.tls(dns.message.make_query("grafana.tailnet", "A"), "127.0.0.1", port=port, timeout=5,
                      ssl_context=client_context(pki), server_hostname=NAME)
    assert "100.64.0.2" in r.to_text()


@pytest.mark.parametrize("version", ["H1", "H2"])
@pytest.mark.parametrize("post", [True, False])
def test_dnspython_doh_over_http1_and_http2(server: MagicDnsProcess, pki: dict, version: str, post: bool) -> None:
    port = server.extra["doh"]
    for qname, addr in (("my-server.tailnet", "100.64.0.2"), ("www.upstream.test", "192.0.2.10")):
        q = dns.message.make_query(qname, "A")
        r = dns.query.https(q, f"https://{NAME}:{port}/dns-query", bootstrap_address="127.0.0.1", timeout=5,
                            post=post, verify=client_context(pki),
                            http_version=getattr(dns.query.HTTPVersion, version))
        assert r.rcode() == dns.rcode.NOERROR and addr in r.to_text()


def _get(client: httpx.Client, port: int, wire: bytes, path: str = "/dns-query") -> httpx.Response:
    b64 = base64.urlsafe_b64encode(wire).decode().rstrip("=")
    return client.get(f"https://127.0.0.1:{port}{path}?dns={b64}", headers={"host": NAME},
                      extensions={"sni_hostname": NAME})


@pytest.mark.parametrize("http2", [False, True])
def test_doh_http_semantics(server: MagicDnsProcess, pki: dict, http2: bool) -> None:
    """Cache-Control is the smallest TTL; bad requests get 4xx and the connection keeps serving."""
    port = server.extra["doh"]
    with httpx.Client(verify=client_context(pki), http2=http2, http1=not http2, timeout=5) as c:
        q = dns.message.make_query("grafana.tailnet", "A")  # CNAME ttl 60 -> A ttl 300
        q.id = 0
        r = _get(c, port, q.to_wire())
        assert r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        assert r.status_code == 200 and r.headers["content-type"] == "application/dns-message"
        msg = dns.message.from_wire(r.content)
        ttls = [rr.ttl for rr in msg.answer]
        assert ttls and r.headers["cache-control"] == f"max-age={min(ttls)}" == "max-age=60"
        nx = dns.message.make_query("nope.tailnet", "A")
        r = _get(c, port, nx.to_wire())
        assert r.status_code == 200 and dns.message.from_wire(r.content).rcode() == dns.rcode.NXDOMAIN
        assert r.headers["cache-control"].startswith("max-age=")
        assert _get(c, port, q.to_wire(), "/other").status_code == 404
        assert c.get(f"https://127.0.0.1:{port}/dns-query?dns=!!!", headers={"host": NAME},
                     extensions={"sni_hostname": NAME}).status_code == 400
        assert _get(c, port, b"\x00" * 5).status_code == 400
        hdr = {"host": NAME, "content-type": "text/plain"}
        url = f"https://127.0.0.1:{port}/dns-query"
        assert c.post(url, content=q.to_wire(), headers=hdr, extensions={"sni_hostname": NAME}).status_code == 415
        assert c.put(url, content=q.to_wire(), headers=hdr, extensions={"sni_hostname": NAME}).status_code == 405
        big = c.post(url, content=b"\x00" * 70000, headers={"host": NAME, "content-type": "application/dns-message"},
                     extensions={"sni_hostname": NAME})
        assert big.status_code == 413
        garbage = c.post(url, content=os.urandom(40), headers={"host": NAME, "content-type": "application/dns-message"},
                         extensions={"sni_hostname": NAME})
        assert garbage.status_code in (200, 400)  # FORMERR, or 400 when not even a header reads
        ok = _get(c, port, q.to_wire())
        assert ok.status_code == 200 and "100.64.0.2" in dns.message.from_wire(ok.content).to_text()


def test_tls_below_1_2_is_refused(server: MagicDnsProcess, pki: dict) -> None:
    ctx = client_context(pki)
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    except ssl.SSLError:
        pass
    with socket.create_connection(("127.0.0.1", server.extra["dot"]), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, OSError)):
            ctx.wrap_socket(raw, server_hostname=NAME)


def test_certificate_files_are_reloaded_when_they_change(pki: dict, upstream: MagicDnsProcess,
                                                         tmp_path: Path) -> None:
    first_ca = make_ca("first")
    cert, key = write_pair(tmp_path, make_leaf(first_ca, (NAME,)))
    server = start_magicdns("--upstream", f"127.0.0.1:{upstream.port}", "--dot", "127.0.0.1:0",
                            "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        port = encrypted_ports(server)["dot"]
        assert kdig(port, "my-server.tailnet", "+tls", ca=first_ca.write(tmp_path / "first.pem")).returncode == 0
        second = make_ca("second")
        second_file = second.write(tmp_path / "second.pem")
        assert kdig(port, "my-server.tailnet", "+tls", ca=second_file).returncode != 0
        # Replace both files the way certbot and our node do (write new, rename over).
        new_cert, new_key = write_pair(tmp_path, make_leaf(second, (NAME,)), stem="next")
        os.replace(new_key, key)
        os.replace(new_cert, cert)
        wait_until(lambda: kdig(port, "my-server.tailnet", "+tls", ca=second_file).returncode == 0,
                   timeout=10, interval=0.2, what="the new certificate to be served")
        # A broken replacement is refused with a log line; the working pair stays in use.
        cert.write_text("not a certificate")
        wait_until(lambda: "keeping the previous certificate" in server.log(), timeout=10, what="the reload error")
        assert kdig(port, "my-server.tailnet", "+tls", ca=second_file).returncode == 0
    finally:
        server.stop()


def test_an_expired_certificate_is_never_served(pki: dict, upstream: MagicDnsProcess, tmp_path: Path) -> None:
    now = time.time()
    cert, key = write_pair(tmp_path, make_leaf(pki["ca"], (NAME,), not_before=now - 7200, not_after=now - 60))
    server = start_magicdns("--dot", "127.0.0.1:0", "--doh", "127.0.0.1:0",
                            "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        ports = encrypted_ports(server)
        for mode, kind in (("+tls", "dot"), ("+https", "doh")):
            out = kdig(ports[kind], "my-server.tailnet", mode, ca=pki["ca_file"])
            assert out.returncode != 0 and "100.64.0.2" not in out.stdout
        status = run_cli("status", "--control-socket", server.control_socket)
        assert "expired: not serving" in status.stdout, status.stdout
    finally:
        server.stop()


def test_bad_usage_and_bad_certificates_are_clear_errors(pki: dict, tmp_path: Path) -> None:
    no_cert = run_cli("serve", "--listen", "127.0.0.1:5", "--dot", "127.0.0.1:0")
    assert no_cert.returncode == 2 and "--tls-cert" in no_cert.stderr
    (tmp_path / "bad.crt").write_text("nope")
    bad = run_cli("serve", "--listen", f"127.0.0.1:{free_port()}", "--dot", "127.0.0.1:0", "--tls-cert", str(tmp_path / "bad.crt"),
                  "--tls-key", str(pki["key"]), "--control-socket", str(tmp_path / "s.sock"),
                  "--resolv-conf", str(tmp_path / "none"))
    assert bad.returncode != 0 and "certificate" in bad.stderr.lower(), bad.stderr
    other_key = make_leaf(make_ca(), (NAME,))[1]
    (tmp_path / "other.key").write_text(other_key)
    mismatch = run_cli("serve", "--listen", f"127.0.0.1:{free_port()}", "--dot", "127.0.0.1:0", "--tls-cert", str(pki["cert"]),
                       "--tls-key", str(tmp_path / "other.key"), "--control-socket", str(tmp_path / "s2.sock"),
                       "--resolv-conf", str(tmp_path / "none"))
    assert mismatch.returncode != 0 and "do not load together" in mismatch.stderr, mismatch.stderr
