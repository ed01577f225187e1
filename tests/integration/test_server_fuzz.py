"""Property test against the running server: random and mutated datagrams, then a normal query.

Every reply must be well-formed or absent, and the server must keep answering.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import dns.message
import dns.query
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from magicdns.server import DnsServer, ServerConfig
from magicdns.view import load_view

ROOT = Path(__file__).resolve().parents[2]


class ServerThread:
    """A real DnsServer on its own event loop in a thread, for synchronous hypothesis tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = DnsServer(ServerConfig(listen=(("127.0.0.1", 0),)))
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.start(load_view(ROOT / "conf" / "view.json")))
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(10)
        self.port = self.server.bound[0][1]

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def running() -> ServerThread:
    srv = ServerThread()
    yield srv
    srv.stop()


BASE = [dns.message.make_query(n, t, use_edns=e).to_wire()
        for n, t, e in (("my-server.tailnet", "A", 0), ("db.tailnet", "AAAA", False),
                        ("nope.tailnet", "TXT", 0), ("2.0.64.100.in-addr.arpa", "PTR", 0))]


@st.composite
def datagrams(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    wire = bytearray(draw(st.sampled_from(BASE)))
    for _ in range(draw(st.integers(1, 5))):
        pos = draw(st.integers(0, len(wire) - 1))
        wire[pos] = draw(st.integers(0, 255))
    return bytes(wire[:draw(st.integers(1, len(wire)))]) if draw(st.booleans()) else bytes(wire)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(datagrams())
def test_every_reply_is_well_formed_or_absent(running: ServerThread, data: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.05)  # short: most garbage gets no reply, and silence is a valid outcome
        s.sendto(data, ("127.0.0.1", running.port))
        try:
            reply = s.recv(65535)
        except socket.timeout:
            reply = None
    if reply is not None:
        assert len(reply) >= 12 and reply[:2] == data[:2] and reply[2] & 0x80
        assert len(reply) <= 1232
        # a question was echoed: the whole message must parse (dnspython reads UPDATE by RFC 2136 rules)
        if reply[4:6] != b"\x00\x00" and (reply[2] >> 3) & 0xF != 5:
            dns.message.from_wire(reply)
    probe = dns.message.make_query("my-server.tailnet", "A")
    answer = dns.query.udp(probe, "127.0.0.1", port=running.port, timeout=2)
    assert [str(rd) for rd in answer.answer[0]] == ["100.64.0.2"]
