"""serve.py's pure parts: targets, the stored config, and the identity headers of the HTTP proxy;
and a real ServeRunner on loopback (TCP and HTTP) with the identity looked up per source address."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from meshnode.node.serve import (Caller, Kind, PortInUse, ServeConfig, ServeEntry, ServeError, ServeRunner,
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
