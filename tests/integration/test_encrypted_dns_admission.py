"""The allow-list is checked on the bare TCP connection, before TLS: a client outside it gets no
ServerHello (not one byte) and costs no handshake; admitted clients (kdig, dnspython) are served.

On loopback: the server allows only 127.0.0.2, so a client bound to 127.0.0.1 is foreign and one
bound to 127.0.0.2 is admitted.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time

import dns.message
import dns.query
import pytest

from tests.integration.magicdns_proc import MagicDnsProcess, run_cli, start_magicdns
from tests.integration.tls_helpers import make_ca, make_leaf, write_pair
from tests.support import wait_until

NAME = "dns.test"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca("admission CA")
    cert, key = write_pair(d, make_leaf(ca, (NAME,), ("127.0.0.1",)))
    return {"ca": ca, "ca_file": ca.write(d / "ca.pem"), "cert": cert, "key": key}


def status(server: MagicDnsProcess) -> dict:
    out = run_cli("status", "--control-socket", server.control_socket, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def server(pki: dict):
    s = start_magicdns("--allow", "127.0.0.2/32", "--dot", "127.0.0.1:0", "--doh", "127.0.0.1:0",
                       "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]), probe=None)
    for item in status(s)["encrypted"]["listeners"]:
        kind, addr = item.split()
        s.extra[kind] = int(addr.rsplit(":", 1)[1])
    yield s
    s.stop()


def client_hello(alpn: str) -> bytes:
    """The first flight of a real TLS client (Python's OpenSSL), to send over a raw socket."""
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols([alpn])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=NAME)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16"  # a TLS handshake record
    return hello


def raw_reply(port: int, source: str, send: bytes, want: int = 0) -> bytes:
    """What the server sends back on a raw connection from `source` until it closes (or 5 s, or
    once `want` bytes are in)."""
    got = b""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((source, 0))
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", port))  # a reset may already be here when connect() returns
            s.sendall(send)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
                if want and len(got) >= want:
                    break
        except (ConnectionResetError, BrokenPipeError):
            pass  # a reset is the expected refusal
        except socket.timeout:
            pass  # the server is waiting for more: returned below, and the caller decides
    return got


@pytest.mark.parametrize("kind,alpn", [("dot", "dot"), ("doh", "h2")])
def test_a_foreign_client_gets_no_tls_byte_and_is_counted(server: MagicDnsProcess, kind: str, alpn: str) -> None:
    before = status(server)["queries"]["refused_clients"]
    failures_before = status(server)["encrypted"]["handshake_failures"]
    hello = client_hello(alpn)
    assert raw_reply(server.extra[kind], "127.0.0.1", hello) == b""  # no ServerHello, no alert: nothing
    # The same ClientHello from an admitted address does get a ServerHello: the test can tell.
    answer = raw_reply(server.extra[kind], "127.0.0.2", hello, want=6)
    assert answer[:1] == b"\x16" and answer[5:6] == b"\x02", answer[:16]  # handshake record, ServerHello
    after = status(server)
    assert after["queries"]["refused_clients"] == before + 1
    # The refused client cost no handshake: only the admitted one (which we dropped mid-way) counts.
    assert after["encrypted"]["handshake_failures"] <= failures_before + 1


def test_a_foreign_tls_client_fails_at_connect(server: MagicDnsProcess, pki: dict) -> None:
    ctx = ssl.create_default_context(cafile=str(pki["ca_file"]))
    with socket.socket() as raw:
        raw.bind(("127.0.0.1", 0))
        raw.settimeout(5)
        with pytest.raises((ssl.SSLError, ConnectionResetError, ssl.SSLEOFError)):
            raw.connect(("127.0.0.1", server.extra["dot"]))  # the reset may come before or during the handshake
            ctx.wrap_socket(raw, server_hostname=NAME)


@pytest.mark.parametrize("mode", ["+tls", "+https"])
def test_kdig_from_an_admitted_address_is_served_and_from_a_foreign_one_is_not(
        server: MagicDnsProcess, pki: dict, mode: str) -> None:
    port = server.extra["dot" if mode == "+tls" else "doh"]

    def kdig(source: str) -> subprocess.CompletedProcess:
        return subprocess.run(["kdig", "@127.0.0.1", "-p", str(port), "-b", source, mode, f"+tls-ca={pki['ca_file']}",
                               f"+tls-hostname={NAME}", "+time=3", "+retry=0", "my-server.tailnet", "A"],
                              capture_output=True, text=True, timeout=30)
    ok = kdig("127.0.0.2")
    assert ok.returncode == 0 and "100.64.0.2" in ok.stdout, ok.stdout + ok.stderr
    refused = kdig("127.0.0.1")
    assert refused.returncode != 0 and "100.64.0.2" not in refused.stdout


def test_dnspython_dot_from_an_admitted_address(server: MagicDnsProcess, pki: dict) -> None:
    ctx = ssl.create_default_context(cafile=str(pki["ca_file"]))
    r = dns.query.tls(dns.message.make_query("my-server.tailnet", "A"), "127.0.0.1", port=server.extra["dot"],
                      timeout=5, ssl_context=ctx, server_hostname=NAME, source="127.0.0.2")
    assert "100.64.0.2" in r.to_text()


def test_many_foreign_connections_leave_no_state_and_the_server_serves(server: MagicDnsProcess, pki: dict) -> None:
    before = status(server)
    hello = client_hello("dot")
    for _ in range(50):
        assert raw_reply(server.extra["dot"], "127.0.0.1", hello) == b""
    after = status(server)
    assert after["queries"]["refused_clients"] == before["queries"]["refused_clients"] + 50
    assert after["encrypted"]["connections"] == 0 and after["encrypted"]["handshaking"] == 0
    test_dnspython_dot_from_an_admitted_address(server, pki)


def test_handshakes_in_flight_are_bounded_by_the_connection_slots(pki: dict) -> None:
    """Admitted clients that open connections and never finish the handshake hold at most
    --max-tcp-connections handshakes; the next is reset without a byte, and once they go the
    listener serves again."""
    s = start_magicdns("--allow", "127.0.0.2/32", "--dot", "127.0.0.1:0", "--max-tcp-connections", "3",
                       "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]), probe=None)
    stalled: list[socket.socket] = []
    try:
        port = int(status(s)["encrypted"]["listeners"][0].rsplit(":", 1)[1])
        for _ in range(3):
            c = socket.socket()
            c.bind(("127.0.0.2", 0))
            c.connect(("127.0.0.1", port))
            stalled.append(c)
        wait = time.monotonic() + 10
        while status(s)["encrypted"]["handshaking"] < 3 and time.monotonic() < wait:
            time.sleep(0.05)  # polling a condition with a deadline
        assert status(s)["encrypted"]["handshaking"] == 3
        rejected = status(s)["tcp"]["rejected"]
        assert raw_reply(port, "127.0.0.2", client_hello("dot")) == b""
        assert status(s)["tcp"]["rejected"] == rejected + 1
        for c in stalled:
            c.close()
        stalled.clear()
        wait_until(lambda: not status(s)["encrypted"]["handshaking"], timeout=10, interval=0.05,
                   what="the stalled handshakes to be released")
        ctx = ssl.create_default_context(cafile=str(pki["ca_file"]))
        r = dns.query.tls(dns.message.make_query("my-server.tailnet", "A"), "127.0.0.1", port=port,
                          timeout=5, ssl_context=ctx, server_hostname=NAME, source="127.0.0.2")
        assert "100.64.0.2" in r.to_text()
    finally:
        for c in stalled:
            c.close()
        s.stop()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_in_process_on_both_event_loops(pki: dict, loop_kind: str) -> None:
    """The gate accepts by hand (add_reader + connect_accepted_socket): the same behaviour on the
    stock loop and on uvloop (the CLI's and the node's loop)."""
    import asyncio
    import ipaddress

    from magicdns.encrypted import EncryptedConfig
    from magicdns.server import DnsServer, ServerConfig
    from magicdns.view import view_from_json

    async def main() -> None:
        cfg = ServerConfig(listen=(("127.0.0.1", 0),), allow=(ipaddress.ip_network("127.0.0.2/32"),),
                           encrypted=EncryptedConfig(dot=(("127.0.0.1", 0),), doh=(("127.0.0.1", 0),),
                                                     cert_file=str(pki["cert"]), key_file=str(pki["key"])))
        server = DnsServer(cfg)
        await server.start(view_from_json({"domain": "tailnet", "self": {"name": "a", "addresses": ["100.64.0.1"]}}))
        ports = {kind: port for kind, _h, port in server.encrypted.bound}
        ctx = ssl.create_default_context(cafile=str(pki["ca_file"]))
        loop = asyncio.get_running_loop()
        try:
            def admitted() -> dns.message.Message:
                return dns.query.tls(dns.message.make_query("a.tailnet", "A"), "127.0.0.1", port=ports["dot"],
                                     timeout=5, ssl_context=ctx, server_hostname=NAME, source="127.0.0.2")
            assert "100.64.0.1" in (await loop.run_in_executor(None, admitted)).to_text()
            for kind in ("dot", "doh"):
                got = await loop.run_in_executor(None, raw_reply, ports[kind], "127.0.0.1", client_hello("dot"))
                assert got == b""
            assert server.counters.refused_clients == 2
        finally:
            await server.stop()

    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        uvloop.run(main())
    else:
        asyncio.run(main())
