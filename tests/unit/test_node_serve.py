"""serve.py's pure parts: targets, the stored config, and the identity headers of the HTTP proxy;
and a real ServeRunner on loopback (TCP and HTTP) with the identity looked up per source address."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from multidict import CIMultiDict

from meshnode.control import ca
from meshnode.node.cert import NodeCertificates

from meshnode.node.serve import (Caller, Kind, NoCertificate, PortInUse, ServeConfig, ServeEntry, ServeError, ServeRunner,
                                 load_config, parse_config, parse_target, proxied_headers, save_config)


@pytest.mark.parametrize("kind,text,want", [
    (Kind.TCP, "tcp://127.0.0.1:22", "127.0.0.1:22"),
    (Kind.TCP, "127.0.0.1:22", "127.0.0.1:22"),
    (Kind.TCP, "22", "127.0.0.1:22"),
    (Kind.TCP, "tcp://[::1]:22", "[::1]:22"),
    (Kind.HTTP, "http://127.0.0.1:8080", "http://127.0.0.1:8080"),
    (Kind.HTTP, "http://localhost:8080/app/", "http://localhost:8080/app"),
    (Kind.HTTP, "3000", "http://127.0.0.1:3000"),
])
def test_targets_are_normalised(kind: Kind, text: str, want: str) -> None:
    assert parse_target(kind, text) == want


@pytest.mark.parametrize("kind,text,why", [
    (Kind.TCP, "tcp://10.0.0.5:22", "this machine only"),
    (Kind.HTTP, "http://example.com:80", "this machine only"),
    (Kind.HTTP, "https://127.0.0.1:8443", "not supported"),
    (Kind.TCP, "http://127.0.0.1:80", "tcp://"),
    (Kind.HTTP, "http://127.0.0.1", "host and a port"),
    (Kind.TCP, "tcp://127.0.0.1:99999", "127.0.0.1:99999"),
])
def test_bad_targets_are_refused_with_the_reason(kind: Kind, text: str, why: str) -> None:
    with pytest.raises(ServeError, match=why):
        parse_target(kind, text)


def test_config_round_trip_and_a_damaged_file(tmp_path: Path) -> None:
    cfg = ServeConfig().with_entry(ServeEntry(80, Kind.HTTP, "http://127.0.0.1:8080"))
    cfg = cfg.with_entry(ServeEntry(22, Kind.TCP, "127.0.0.1:22"))
    assert [e.port for e in cfg.entries] == [22, 80]
    path = tmp_path / "serve.json"
    save_config(path, cfg)
    assert load_config(path) == cfg
    assert cfg.without(22).entries == (ServeEntry(80, Kind.HTTP, "http://127.0.0.1:8080"),)
    with pytest.raises(ServeError, match="not served"):
        cfg.without(23)
    path.write_text('{"entries": [{"port": 0, "kind": "tcp", "target": "x"}]}')
    assert load_config(path) == ServeConfig()  # set aside, the daemon keeps running
    path.write_text("{torn")
    assert load_config(path) == ServeConfig()
    with pytest.raises(ServeError):
        parse_config({"entries": [{"port": 80, "kind": "udp", "target": "1"}]})


def test_identity_headers_replace_whatever_the_caller_sent() -> None:
    incoming = CIMultiDict([("Tailscale-User-Login", "forged@evil"), ("tailscale-user-name", "forged"),
                            ("TAILSCALE-HEADERS-INFO", "x"), ("X-Forwarded-For", "1.2.3.4"), ("Accept", "*/*"),
                            ("Connection", "keep-alive"), ("Host", "srv.tailnet")])
    out = proxied_headers(incoming, Caller("100.64.0.2", "bob.tailnet", "bob@example.com"), "srv.tailnet")
    assert out["Tailscale-User-Login"] == "bob@example.com" and out["Tailscale-User-Name"] == "bob"
    assert out["X-Forwarded-For"] == "100.64.0.2" and out["Accept"] == "*/*"
    low = {k.lower(): v for k, v in out.items()}
    assert "tailscale-headers-info" not in low and "connection" not in low
    assert sum(k.lower() == "tailscale-user-login" for k in out) == 1
    # A tagged node speaks for no user; an unknown source gets no identity at all.
    tagged = proxied_headers(incoming, Caller("100.64.0.3", "ci.tailnet", "bob@example.com", ("tag:ci",)), "h")
    assert not any(k.lower().startswith("tailscale-") for k in tagged)
    assert not any(k.lower().startswith("tailscale-") for k in proxied_headers(incoming, None, "h"))


def _free_tcp_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_runner_on_loopback_proxies_with_identity_pipes_tcp_and_refuses_a_used_port() -> None:
    async def main() -> None:
        async def echo_headers(request: web.Request) -> web.Response:
            return web.json_response({"headers": dict(request.headers), "path": request.path_qs,
                                      "body": (await request.read()).decode()})
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", echo_headers)
        backend = web.AppRunner(app)
        await backend.setup()
        site = web.TCPSite(backend, "127.0.0.1", 0)
        await site.start()
        backend_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        async def upper(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write((await r.read()).upper())
            await w.drain()
            w.close()
        tcp_backend = await asyncio.start_server(upper, "127.0.0.1", 0)
        tcp_port = tcp_backend.sockets[0].getsockname()[1]

        callers = {"127.0.0.1": Caller("127.0.0.1", "bob.tailnet", "bob@example.com")}
        runner = ServeRunner(callers.get)
        http_port, pipe_port = _free_tcp_port(), _free_tcp_port()
        cfg = ServeConfig().with_entry(ServeEntry(http_port, Kind.HTTP, f"http://127.0.0.1:{backend_port}"))
        cfg = cfg.with_entry(ServeEntry(pipe_port, Kind.TCP, f"127.0.0.1:{tcp_port}"))
        await runner.apply(cfg, ("127.0.0.1",))
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(f"http://127.0.0.1:{http_port}/a/b?c=1", data=b"hello",
                                     headers={"Tailscale-User-Login": "forged"}) as resp:
                    got = await resp.json()
            assert got["path"] == "/a/b?c=1" and got["body"] == "hello"
            assert got["headers"]["Tailscale-User-Login"] == "bob@example.com"
            r, w = await asyncio.open_connection("127.0.0.1", pipe_port)
            w.write(b"stream")
            w.write_eof()
            assert await asyncio.wait_for(r.read(), 5) == b"STREAM"
            w.close()
            # A port someone else holds: refused for the entry being added, the others keep serving.
            squatter = socket.create_server(("127.0.0.1", 0))
            taken = squatter.getsockname()[1]
            try:
                with pytest.raises(PortInUse, match="already in use"):
                    await runner.apply(cfg.with_entry(ServeEntry(taken, Kind.TCP, "127.0.0.1:1")), ("127.0.0.1",),
                                       strict_port=taken)
            finally:
                squatter.close()
            assert [e["error"] for e in runner.status(cfg)] == [None, None]
            # The local service down: a 502 in words, not a hang.
            await backend.cleanup()
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{http_port}/") as resp:
                    assert resp.status == 502 and "does not answer" in await resp.text()
        finally:
            await runner.close()
            tcp_backend.close()
    asyncio.run(main())


def test_websocket_through_the_proxy_carries_messages_and_identity() -> None:
    async def main() -> None:
        seen: dict[str, str] = {}

        async def ws_echo(request: web.Request) -> web.WebSocketResponse:
            seen.update(request.headers)
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await ws.send_str(msg.data.upper())
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await ws.send_bytes(msg.data[::-1])
            return ws
        app = web.Application()
        app.router.add_get("/ws", ws_echo)
        backend = web.AppRunner(app)
        await backend.setup()
        site = web.TCPSite(backend, "127.0.0.1", 0)
        await site.start()
        backend_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        runner = ServeRunner(lambda ip: Caller(ip, "bob.tailnet", "bob@example.com"))
        port = _free_tcp_port()
        cfg = ServeConfig().with_entry(ServeEntry(port, Kind.HTTP, f"http://127.0.0.1:{backend_port}"))
        await runner.apply(cfg, ("127.0.0.1",))
        try:
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(f"http://127.0.0.1:{port}/ws",
                                           headers={"Tailscale-User-Login": "forged"}) as ws:
                    await ws.send_str("hello")
                    assert (await asyncio.wait_for(ws.receive(), 5)).data == "HELLO"
                    await ws.send_bytes(b"abc")
                    assert (await asyncio.wait_for(ws.receive(), 5)).data == b"cba"
            assert seen["Tailscale-User-Login"] == "bob@example.com"
        finally:
            await runner.close()
            await backend.cleanup()
    asyncio.run(main())


# -- HTTPS with the node's certificate from the tailnet CA -------------------------------------------

def _node_cert(certs: NodeCertificates, tailnet_ca: ca.TailnetCa, now: float, lifetime: float = ca.LEAF_LIFETIME) -> None:
    """What the daemon's certificate loop does: the node's own key, a CSR, the CA's leaf, saved."""
    key = certs.key_pem()
    names = ca.node_names("web", "tailnet", ("100.64.0.7",))
    leaf = ca.issue(tailnet_ca, ca.public_key_from_csr(ca.make_csr(key, names.dns_names[0])), names, now, lifetime)
    certs.save(leaf, tailnet_ca.cert_pem)


def test_https_proxy_verifies_against_the_tailnet_ca_follows_renewal_and_refuses_without_a_cert(tmp_path: Path) -> None:
    async def main() -> None:
        async def echo_headers(request: web.Request) -> web.Response:
            return web.json_response({"headers": dict(request.headers)})
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", echo_headers)
        backend = web.AppRunner(app)
        await backend.setup()
        site = web.TCPSite(backend, "127.0.0.1", 0)
        await site.start()
        backend_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        tailnet_ca = ca.create_ca("tailnet", time.time())
        certs = NodeCertificates(tmp_path / "tls")
        why: list[str] = ["the node's certificate from the tailnet CA has not been issued yet"]

        def tls_files() -> tuple[str, str]:
            if why:
                raise NoCertificate(why[0])
            return str(certs.cert_path), str(certs.key_path)

        callers = {"127.0.0.1": Caller("127.0.0.1", "bob.tailnet", "bob@example.com")}
        runner = ServeRunner(callers.get, tls_files)
        port = _free_tcp_port()
        cfg = ServeConfig().with_entry(ServeEntry(port, Kind.HTTPS, f"http://127.0.0.1:{backend_port}"))
        try:
            # No certificate yet: refused with the reason, nothing listening, status says why.
            with pytest.raises(NoCertificate, match="not been issued yet"):
                await runner.apply(cfg, ("127.0.0.1",), strict_port=port)
            assert "not been issued yet" in runner.status(cfg)[0]["error"]
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            # An expired certificate is refused too (issued in the past, 1 h of life).
            _node_cert(certs, tailnet_ca, time.time() - 7200, lifetime=3600)
            why.clear()
            with pytest.raises(NoCertificate, match="not valid now"):
                await runner.apply(cfg, ("127.0.0.1",), strict_port=port)

            _node_cert(certs, tailnet_ca, time.time())
            await runner.apply(cfg, ("127.0.0.1",), strict_port=port)
            trusting = ssl.create_default_context(cadata=tailnet_ca.cert_pem)  # what `meshnode cert --ca` gives

            async def fetch(ctx: ssl.SSLContext) -> tuple[dict, int]:
                async with aiohttp.ClientSession() as http:
                    async with http.get(f"https://127.0.0.1:{port}/x", ssl=ctx, server_hostname="web.tailnet",
                                        headers={"Tailscale-User-Login": "forged"}) as resp:
                        got = await resp.json()
                # The certificate a new connection is served (its serial tells renewals apart).
                _, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="web.tailnet")
                der = w.get_extra_info("ssl_object").getpeercert(True)
                w.close()
                return got, x509.load_der_x509_certificate(der).serial_number

            got, serial1 = await fetch(trusting)
            assert got["headers"]["Tailscale-User-Login"] == "bob@example.com"
            assert got["headers"]["X-Forwarded-Proto"] == "https"
            assert serial1 == ca.cert_info(certs.cert_path.read_text()).serial
            # A client that does not trust the tailnet CA (the system store only) fails verification.
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await fetch(ssl.create_default_context())
            # Nor does one that trusts another tailnet's CA.
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await fetch(ssl.create_default_context(cadata=ca.create_ca("tailnet", time.time()).cert_pem))
            # Hostile callers: one stalls before its ClientHello, one sends plain HTTP to the TLS port;
            # neither stops others, and a ClientHello without SNI (a client dialling the IP) is served.
            _stalled = await asyncio.open_connection("127.0.0.1", port)
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await asyncio.wait_for(r.read(), 5) == b""  # closed, no answer in plain text
            no_sni = ssl.create_default_context(cadata=tailnet_ca.cert_pem)
            no_sni.check_hostname = False
            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=no_sni, server_hostname="")
            w.write(b"GET / HTTP/1.1\r\nHost: web.tailnet\r\nConnection: close\r\n\r\n")
            assert (await asyncio.wait_for(r.read(), 5)).startswith(b"HTTP/1.1 200")
            got, _ = await fetch(trusting)
            assert got["headers"]["Tailscale-User-Login"] == "bob@example.com"
            _stalled[1].close()
            # The daemon renews: new connections get the new certificate, no restart of the listener.
            _node_cert(certs, tailnet_ca, time.time())
            got, serial2 = await fetch(trusting)
            assert serial2 != serial1 and serial2 == ca.cert_info(certs.cert_path.read_text()).serial
            assert got["headers"]["Tailscale-User-Login"] == "bob@example.com"
        finally:
            await runner.close()
            await backend.cleanup()
    asyncio.run(main())


def test_https_entry_round_trips_and_takes_an_http_target() -> None:
    assert parse_target(Kind.HTTPS, "8080") == "http://127.0.0.1:8080"
    with pytest.raises(ServeError, match="not supported"):
        parse_target(Kind.HTTPS, "https://127.0.0.1:8443")
    cfg = ServeConfig().with_entry(ServeEntry(443, Kind.HTTPS, "http://127.0.0.1:8080"))
    assert parse_config(json.loads(json.dumps(cfg.to_json()))) == cfg


def test_certificate_problem_says_why_https_cannot_serve(tmp_path: Path) -> None:
    from meshnode.node.serve import certificate_problem
    now = time.time()
    assert "meshnode up" in certificate_problem(None, False, False, None, now)
    assert "map has no CA" in certificate_problem(None, True, False, None, now)
    assert "not been issued yet" in certificate_problem(None, True, True, None, now)
    assert "rate limited" in certificate_problem(None, True, True, "cannot get a certificate: rate limited", now)
    tailnet_ca = ca.create_ca("tailnet", now)
    certs = NodeCertificates(tmp_path / "tls")
    _node_cert(certs, tailnet_ca, now - 7200, lifetime=3600)
    expired = certs.current()
    why = certificate_problem(expired, True, True, None, now)
    assert why is not None and "expired at" in why and "control server reachable" in why
    _node_cert(certs, tailnet_ca, now)
    assert certificate_problem(certs.current(), True, True, None, now) is None
