"""Hostile clients against a real server: non-readers, slowloris, oversize replies, forwarding floods.

Each test here failed before its fix (issue 8, "Hard to abuse")."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import struct
import time
from pathlib import Path

import dns.asyncquery
import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from magicdns.server import DnsServer, ServerConfig
from magicdns.upstream import Upstream
from magicdns.view import DnsSettings, DnsView, Host
from tests.integration.magicdns_proc import ROOT, run_cli, start_magicdns
from tests.integration.upstreams import Behavior, FakeUpstream
from tests.support import async_wait_until, wait_until

pytestmark = pytest.mark.timeout(90)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _frame(wire: bytes) -> bytes:
    return struct.pack("!H", len(wire)) + wire


def test_tcp_client_that_never_reads_is_not_buffered_and_is_closed(tmp_path: Path) -> None:
    """1.5 MB of pipelined queries for an 80-address name from a client that reads nothing: the
    server stops reading it (RSS stays bounded) and aborts it at the idle timeout."""
    view = json.loads((ROOT / "conf" / "view.json").read_text())
    view["peers"].append({"name": "many", "addresses": [f"100.64.1.{i}" for i in range(1, 81)]})
    view_path = tmp_path / "view.json"
    view_path.write_text(json.dumps(view))
    srv = start_magicdns("--tcp-idle-timeout", "2", view=str(view_path), workdir=str(tmp_path))
    try:
        base = _rss_kib(srv.proc.pid)
        query = _frame(dns.message.make_query("many.tailnet", "A").to_wire())
        payload = query * (1_500_000 // len(query) + 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a reader that never reads
        sock.connect((srv.host, srv.port))
        sock.setblocking(False)
        sent, deadline = 0, time.monotonic() + 8
        while sent < len(payload) and time.monotonic() < deadline:
            try:
                sent += sock.send(payload[sent:sent + 65536])
            except BlockingIOError:
                time.sleep(0.01)  # the kernel's buffers are full: the server is not reading us
        peak = base
        end = time.monotonic() + 1.0
        while time.monotonic() < end:  # let the server chew whatever it still reads
            peak = max(peak, _rss_kib(srv.proc.pid))
            time.sleep(0.05)
        assert (peak - base) < 32 * 1024, f"server RSS grew by {(peak - base) // 1024} MiB"

        def closed() -> bool:
            status = json.loads(run_cli("status", "--control-socket", srv.control_socket, "--json").stdout)
            return status["tcp"]["connections"] == 0 and status["tcp"]["stalled_closed"] == 1

        wait_until(closed, timeout=10, what="the non-reading connection to be aborted")
        sock.close()
        assert srv.query("my-server.tailnet", tcp=True).answer  # and TCP still serves others
    finally:
        srv.stop()


def make_view(nameservers: tuple[Upstream, ...] = (), extra_hosts: tuple[Host, ...] = ()) -> DnsView:
    return DnsView(peers=(Host("server", (ipaddress.ip_address("100.64.0.2"),)), *extra_hosts),
                   dns=DnsSettings(nameservers=nameservers), version=1)


async def start(view: DnsView, **config: object) -> DnsServer:
    settings: dict[str, object] = {"forward_timeout": 1.0, "forward_stagger": 0.05, **config}
    server = DnsServer(ServerConfig(listen=(("127.0.0.1", 0),), **settings))  # type: ignore[arg-type]
    await server.start(view)
    return server


def test_slowloris_cannot_take_the_tcp_slots() -> None:
    """512 connections from 127.0.0.2 dribbling one byte a second: at most cap/8 of them get a slot,
    each is closed one idle timeout after it opened (partial bytes do not keep it alive), and TCP
    queries from 127.0.0.1 are answered the whole time."""
    async def main() -> None:
        server = await start(make_view(), tcp_idle_timeout=1.0, max_tcp_connections=64)
        port = server.bound[0][1]
        writers: list[asyncio.StreamWriter] = []
        try:
            async def slow_open() -> None:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.bind(("127.0.0.2", 0))
                sock.setblocking(False)
                try:
                    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
                    _, w = await asyncio.open_connection(sock=sock)
                except OSError:
                    sock.close()
                    return
                writers.append(w)

            await asyncio.gather(*(slow_open() for _ in range(512)))
            assert len(writers) == 512  # the kernel accepted them; the server aborts all but 8
            await async_wait_until(lambda: server.status()["tcp"]["rejected"] >= 512 - 8, timeout=10)
            assert server.status()["tcp"]["per_client_rejected"] >= 512 - 8
            assert server.status()["tcp"]["connections"] <= 8
            start_t = time.monotonic()
            answered = 0
            while time.monotonic() - start_t < 3.0:  # three idle timeouts of dribbling
                for w in writers:
                    if not w.is_closing():
                        try:
                            w.write(b"\x01")  # a length prefix of 257, then its body, slowly
                        except (ConnectionError, RuntimeError):
                            pass
                q = dns.message.make_query("server.tailnet", "A")
                r = await dns.asyncquery.tcp(q, "127.0.0.1", port=port, timeout=2)
                assert r.answer and r.rcode() == dns.rcode.NOERROR
                answered += 1
                await asyncio.sleep(0.25)
            assert answered >= 8
            # The dribblers never completed a message: all closed after one timeout.
            assert server.status()["tcp"]["connections"] == 0
            assert server.status()["tcp"]["idle_closed"] >= 8, server.status()["tcp"]
        finally:
            for w in writers:
                w.close()
            await server.stop()
    asyncio.run(main())


def test_partial_message_is_not_kept_alive_but_a_slow_complete_one_is() -> None:
    async def main() -> None:
        server = await start(make_view(), tcp_idle_timeout=0.6)
        port = server.bound[0][1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            wire = _frame(dns.message.make_query("server.tailnet", "A").to_wire())
            t0 = time.monotonic()
            for byte in wire[:-1]:  # never completes: one byte every 0.1 s
                if reader.at_eof():
                    break
                writer.write(bytes((byte,)))
                await asyncio.sleep(0.1)
            assert await asyncio.wait_for(reader.read(1), 3) == b""
            assert time.monotonic() - t0 < 0.6 + 1.5
            # Whole messages, each within the timeout, keep a connection open as long as they come.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(4):
                writer.write(wire)
                (size,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 2))
                await reader.readexactly(size)
                await asyncio.sleep(0.3)
            writer.close()
        finally:
            await server.stop()
    asyncio.run(main())


def test_reply_over_64k_over_tcp_is_truncated_not_dropped() -> None:
    """A name with 3,000 IPv6 addresses: ~84 KB of answer. Over TCP the client gets TC and as many
    records as fit in 65,535 bytes, and the connection keeps working."""
    huge = Host("huge", tuple(ipaddress.ip_address(f"fd7a:115c:a1e0::{i:x}") for i in range(1, 3001)))

    async def main() -> None:
        server = await start(make_view(extra_hosts=(huge,)))
        port = server.bound[0][1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for name in ("huge.tailnet", "server.tailnet"):
                q = dns.message.make_query(name, "AAAA" if name.startswith("huge") else "A")
                writer.write(_frame(q.to_wire()))
                (size,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 5))
                r = dns.message.from_wire(await reader.readexactly(size))
                assert r.id == q.id
                if name.startswith("huge"):
                    assert r.flags & dns.flags.TC and 0 < len(r.answer[0]) < 3000
                else:
                    assert r.answer
            writer.close()
        finally:
            await server.stop()
    asyncio.run(main())


def test_forwarding_over_the_inflight_cap_is_servfail_at_once() -> None:
    """An upstream that never answers holds the cap; the next forwarded query is answered SERVFAIL
    at once (not after the forward timeout), and authoritative answers keep coming."""
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2") as up:
            up.behavior = Behavior.SILENT
            server = await start(make_view((Upstream(up.host, up.port),)), max_inflight=4, forward_timeout=5.0)
            port = server.bound[0][1]
            try:
                held = [asyncio.create_task(dns.asyncquery.udp(dns.message.make_query(f"h{i}.example.test", "A"),
                                                               "127.0.0.1", port=port, timeout=8))
                        for i in range(4)]
                await async_wait_until(lambda: server.forwarder.inflight == 4, timeout=3)
                # The client gives up after 2 s, the forward timeout is 5 s: a SERVFAIL here was not
                # waited for; it was never sent upstream either.
                r = await dns.asyncquery.udp(dns.message.make_query("over.example.test", "A"), "127.0.0.1",
                                             port=port, timeout=2)
                assert r.rcode() == dns.rcode.SERVFAIL
                assert server.status()["queries"]["overload"] >= 1 and len(up.queries) == 4
                assert server.status()["forwarder"]["timeouts"] == 0
                for _ in range(50):
                    r = await dns.asyncquery.udp(dns.message.make_query("server.tailnet", "A"), "127.0.0.1",
                                                 port=port, timeout=2)
                    assert r.answer
                for t in held:
                    t.cancel()
                await asyncio.gather(*held, return_exceptions=True)
            finally:
                await server.stop()
    asyncio.run(main())


def test_forwarding_rate_budget_sheds_a_flood_of_unique_names() -> None:
    """Over --max-forward-qps, a new forwarded name is answered SERVFAIL at once without asking the
    upstream; cached names and authoritative answers are not limited."""
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2") as up:
            server = await start(make_view((Upstream(up.host, up.port),)), max_forward_qps=5)
            port = server.bound[0][1]
            try:
                async def ask(name: str) -> dns.message.Message:
                    return await dns.asyncquery.udp(dns.message.make_query(name, "A"), "127.0.0.1",
                                                    port=port, timeout=2)

                first = await ask("www.example.test")
                assert first.rcode() == dns.rcode.NOERROR
                codes = [(await ask(f"u{i}.example.test")).rcode() for i in range(30)]
                assert codes.count(dns.rcode.SERVFAIL) >= 20  # the burst of 5 spent, a few refilled
                asked = len(up.queries)
                assert asked <= 1 + 10
                assert (await ask("www.example.test")).answer  # from the cache
                for _ in range(50):
                    assert (await ask("server.tailnet")).answer
                assert len(up.queries) == asked
                assert server.status()["queries"]["overload"] >= 20
            finally:
                await server.stop()
    asyncio.run(main())


def test_backlogged_listener_sheds_forwards_and_answers_every_local_name() -> None:
    """600 datagrams queued before the server reads any (a flood of unique forwarded names mixed
    with the tailnet's own): every local name is answered, and most flood queries are answered
    SERVFAIL at once instead of being forwarded."""
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2") as up:
            server = await start(make_view((Upstream(up.host, up.port),)))
            port = server.bound[0][1]
            loop = asyncio.get_running_loop()
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.setblocking(False)
            sock.connect(("127.0.0.1", port))
            try:
                local, flood = set(), set()
                for i in range(600):  # sent without yielding: the server reads only afterwards
                    local_q = i % 4 == 0
                    q = dns.message.make_query("server.tailnet" if local_q else f"f{i}.example.test", "A")
                    q.id = i  # unique: random IDs would collide among 600
                    (local if local_q else flood).add(q.id)
                    sock.send(q.to_wire())
                got: dict[int, int] = {}
                while len(got) < 600:
                    try:
                        r = dns.message.from_wire(await asyncio.wait_for(loop.sock_recv(sock, 4096), 5))
                    except TimeoutError:
                        raise AssertionError((len(got), server.status()["queries"], server.forwarder.stats())) from None
                    got[r.id] = r.rcode()
                assert all(got[i] == dns.rcode.NOERROR for i in local)
                shed = sum(1 for i in flood if got[i] == dns.rcode.SERVFAIL)
                assert shed >= len(flood) // 2, (shed, len(flood))
                assert len(up.queries) < len(flood) // 2
            finally:
                sock.close()
                await server.stop()
    asyncio.run(main())
