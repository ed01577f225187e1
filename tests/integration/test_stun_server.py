"""The STUN server on loopback, asked by aioice (aiortc's independent RFC 5389 implementation), by our
own client, and by raw sockets whose source port the test knows."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aioice import stun as aioice_stun

from meshnode.stun.client import stun_query
from meshnode.stun.message import new_txid, parse_response, request
from meshnode.stun.server import start_stun_server
from tests.support import stop_process

MESHNODE = str(Path(sys.executable).parent / "meshnode")


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_binding_request_from_a_known_port_gets_that_port_back() -> None:
    async def body() -> None:
        transport, server = await start_stun_server("127.0.0.1", 0)
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            txid = new_txid()
            await loop.sock_sendto(sock, request(txid), ("127.0.0.1", server.port))
            data = await asyncio.wait_for(loop.sock_recv(sock, 2048), 2)
            got = parse_response(data)
            assert (got.txid, got.ip, got.port) == (txid, "127.0.0.1", sock.getsockname()[1])
            # aioice builds and parses RFC 5389 independently of our codec.
            msg = aioice_stun.Message(message_method=aioice_stun.Method.BINDING,
                                      message_class=aioice_stun.Class.REQUEST)
            await loop.sock_sendto(sock, bytes(msg), ("127.0.0.1", server.port))
            reply = aioice_stun.parse_message(await asyncio.wait_for(loop.sock_recv(sock, 2048), 2))
            assert reply.message_class == aioice_stun.Class.RESPONSE
            assert reply.transaction_id == msg.transaction_id
            assert reply.attributes["XOR-MAPPED-ADDRESS"] == ("127.0.0.1", sock.getsockname()[1])
            # Garbage and non-requests are never answered, and counted.
            for junk in (b"\0" * 3, b"hello world, not stun at all", bytes(reply)):
                await loop.sock_sendto(sock, junk, ("127.0.0.1", server.port))
            await loop.sock_sendto(sock, request(txid), ("127.0.0.1", server.port))
            assert parse_response(await asyncio.wait_for(loop.sock_recv(sock, 2048), 2)).txid == txid
            assert server.stats["not_stun"] == 2 and server.stats["bad_request"] == 1
            sock.close()
        finally:
            transport.close()
    asyncio.run(body())


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_binding() -> None:
    async def body() -> None:
        transport, server = await start_stun_server("::1", 0)
        try:
            got = await stun_query(("::1", server.port), timeout=2.0, local=("::1", 0))
            assert got.ip == "::1" and got.port > 0
        finally:
            transport.close()
    asyncio.run(body())


def test_query_times_out_when_nobody_answers() -> None:
    async def body() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
            silent.bind(("127.0.0.1", 0))
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                await stun_query(("127.0.0.1", silent.getsockname()[1]), timeout=0.3)
            assert time.monotonic() - t0 < 1.0
    asyncio.run(body())


def test_derp_serve_runs_stun(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    proc = subprocess.Popen([MESHNODE, "derp", "serve", "--listen", "127.0.0.1:0", "--stun-port", "0",
                             "--admit-any", "--ready-file", str(ready)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        _, stun_port = map(int, ready.read_text().split())
        got = asyncio.run(stun_query(("127.0.0.1", stun_port), timeout=2.0))
        assert got.ip == "127.0.0.1"
    finally:
        stop_process(proc)
