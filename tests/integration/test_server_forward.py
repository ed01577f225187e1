"""The server forwarding through real (test-started) upstreams: routes, fallbacks, TCP, truncation."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import pytest

from magicdns.records import parse_record
from magicdns.server import DnsServer, ServerConfig
from magicdns.upstream import Upstream
from magicdns.view import DnsSettings, DnsView, Host
from tests.integration.upstreams import Behavior, FakeUpstream
from tests.support import async_wait_until

pytestmark = pytest.mark.timeout(60)


def make_view(nameservers: tuple[Upstream, ...], routes: dict[str, tuple[Upstream, ...]] | None = None,
              version: int = 1) -> DnsView:
    return DnsView(
        peers=(Host("server", (ipaddress.ip_address("100.64.0.2"),)),),
        dns=DnsSettings(nameservers=nameservers, routes=routes or {},
                        records=(parse_record("ext", "CNAME", "www.example.test"),)),
        version=version)


async def start(view: DnsView, **config: object) -> DnsServer:
    server = DnsServer(ServerConfig(listen=(("127.0.0.1", 0),), forward_timeout=1.0, forward_stagger=0.05,
                                    **config))  # type: ignore[arg-type]
    await server.start(view)
    return server


async def ask(server: DnsServer, name: str, rtype: str = "A", tcp: bool = False, **kw: object) -> dns.message.Message:
    q = dns.message.make_query(name, rtype, **kw)  # type: ignore[arg-type]
    port = server.bound[0][1]
    if tcp:
        return await dns.asyncquery.tcp(q, "127.0.0.1", port=port, timeout=5)
    return await dns.asyncquery.udp(q, "127.0.0.1", port=port, timeout=5)


def addrs(r: dns.message.Message) -> list[str]:
    return sorted(str(rd) for rrset in r.answer for rd in rrset if rrset.rdtype in (1, 28))


def test_split_routes_pick_the_most_specific_upstream() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2") as general, FakeUpstream.start("127.0.0.3") as special:
            special.zone = {("www.example.test", "A"): ["www.example.test. 300 IN A 192.0.2.99"]}
            view = make_view((Upstream(general.host, general.port),),
                             {"www.example.test": (Upstream(special.host, special.port),)})
            server = await start(view)
            try:
                assert addrs(await ask(server, "www.example.test")) == ["192.0.2.99"]
                assert addrs(await ask(server, "multi.example.test")) == ["192.0.2.12", "192.0.2.13"]
                assert len(special.queries) == 1 and len(general.queries) == 1
                # the second time the answer comes from the cache: no new upstream query
                assert addrs(await ask(server, "www.example.test")) == ["192.0.2.99"]
                assert len(special.queries) == 1
                assert server.status()["queries"]["cache_answers"] == 1
            finally:
                await server.stop()
    asyncio.run(main())


def test_fallback_upstreams_when_the_view_has_none() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2") as system:
            server = await start(make_view(()), fallback_upstreams=(Upstream(system.host, system.port),))
            try:
                assert addrs(await ask(server, "www.example.test")) == ["192.0.2.10"]
            finally:
                await server.stop()
            bare = await start(make_view(()))
            try:
                assert (await ask(bare, "www.example.test")).rcode() == dns.rcode.REFUSED
            finally:
                await bare.stop()
    asyncio.run(main())


def test_all_upstreams_failing_gives_servfail_within_the_bound() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", behavior=Behavior.SILENT) as silent, \
                FakeUpstream.start("127.0.0.3", behavior=Behavior.SERVFAIL) as failing:
            server = await start(make_view((Upstream(silent.host, silent.port),
                                            Upstream(failing.host, failing.port))))
            try:
                r = await ask(server, "www.example.test")  # its own 5 s timeout: a hang fails here
                assert r.rcode() == dns.rcode.SERVFAIL
                # Ended by the forward timeout (the silent one) after the SERVFAIL of the other.
                fwd = server.status()["forwarder"]
                assert fwd["timeouts"] == 1 and fwd["servfail"] == 1 and fwd["inflight"] == 0
                assert len(silent.queries) == 1 and len(failing.queries) == 1
            finally:
                await server.stop()
    asyncio.run(main())


def test_forwarded_reply_is_truncated_to_the_client_and_complete_over_tcp() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2") as up:
            server = await start(make_view((Upstream(up.host, up.port),)))
            try:
                r = await ask(server, "big.example.test", "TXT", use_edns=False)
                assert r.flags & dns.flags.TC
                r = await ask(server, "big.example.test", "TXT", tcp=True)
                assert not r.flags & dns.flags.TC and len(r.answer[0]) == 12
            finally:
                await server.stop()
    asyncio.run(main())


def test_rebinding_blocked_on_the_default_route() -> None:
    # Routes to resolvers inside the tailnet are trusted (Zone sets allow_tailnet_answers, checked in
    # tests/unit/test_engine.py; the forwarder's side in test_forward.py).
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2") as up:
            server = await start(make_view((Upstream(up.host, up.port),)))
            try:
                assert addrs(await ask(server, "rebind.example.test")) == ["192.0.2.20"]
                assert server.status()["forwarder"]["rebind_blocked"] >= 1
            finally:
                await server.stop()
    asyncio.run(main())


def test_tcp_replies_come_back_in_completion_order() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", behavior=Behavior.SLOW, delay=0.3) as slow:
            server = await start(make_view((Upstream(slow.host, slow.port),)))
            try:
                port = server.bound[0][1]
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                first = dns.message.make_query("www.example.test", "A")   # forwarded: slow
                second = dns.message.make_query("server.tailnet", "A")    # local: at once
                writer.write(b"".join(struct.pack("!H", len(w)) + w for w in (first.to_wire(), second.to_wire())))
                await writer.drain()
                ids = []
                for _ in range(2):
                    size = struct.unpack("!H", await reader.readexactly(2))[0]
                    ids.append(dns.message.from_wire(await reader.readexactly(size)).id)
                assert ids == [second.id, first.id]
                writer.close()
            finally:
                await server.stop()
    asyncio.run(main())


def test_tcp_idle_timeout_and_connection_cap() -> None:
    async def main() -> None:
        server = await start(make_view(()), tcp_idle_timeout=0.3, max_tcp_connections=2)
        try:
            port = server.bound[0][1]
            conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            await async_wait_until(lambda: server.status()["tcp"]["connections"] == 2, timeout=2)
            r3, w3 = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(r3.read(1), 2) == b""  # over the cap: closed at once
            assert server.status()["tcp"]["rejected"] == 1
            for reader, _ in conns:  # idle connections are closed by the server
                assert await asyncio.wait_for(reader.read(1), 3) == b""
            assert server.status()["tcp"]["idle_closed"] == 2
            for _, w in conns + [(r3, w3)]:
                w.close()
        finally:
            await server.stop()
    asyncio.run(main())


def test_view_swap_under_load_loses_no_query() -> None:
    async def main() -> None:
        server = await start(make_view(()))
        try:
            port = server.bound[0][1]
            loop = asyncio.get_running_loop()
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect(("127.0.0.1", port))
            sent = 0
            answered = 0
            for round_ in range(20):
                server.set_view(make_view((), version=round_ + 2))
                for _ in range(50):
                    q = dns.message.make_query("server.tailnet", "A")
                    await loop.sock_sendall(sock, q.to_wire())
                    sent += 1
                    reply = dns.message.from_wire(await asyncio.wait_for(loop.sock_recv(sock, 4096), 2))
                    assert reply.id == q.id and addrs(reply) == ["100.64.0.2"]
                    answered += 1
            assert sent == answered == 1000
            sock.close()
        finally:
            await server.stop()
    asyncio.run(main())


def test_cname_to_an_outside_name_is_followed_for_recursive_queries() -> None:
    """RFC 1034 3.6.2/4.3.1: RD set, our CNAME's target is forwarded and the whole chain comes back
    (not AA: part of it is not ours); RD clear, the authoritative bare CNAME."""
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2") as up:
            server = await start(make_view((Upstream(up.host, up.port),)))
            try:
                for tcp in (False, True):
                    r = await ask(server, "Ext.Tailnet", tcp=tcp)
                    assert [(str(x.name).lower(), x.rdtype) for x in r.answer] == [
                        ("ext.tailnet.", 5), ("www.example.test.", 1)]
                    assert addrs(r) == ["192.0.2.10"] and not r.flags & dns.flags.AA
                    assert str(r.question[0].name) == "Ext.Tailnet."
                r = await ask(server, "ext.tailnet", "AAAA", use_edns=0)  # NODATA-free v6 answer
                assert addrs(r) == ["2001:db8::10"] and r.edns == 0
                q = dns.message.make_query("ext.tailnet", "A")
                q.flags &= ~dns.flags.RD
                r = await dns.asyncquery.udp(q, "127.0.0.1", port=server.bound[0][1], timeout=5)
                assert [x.rdtype for x in r.answer] == [5] and r.flags & dns.flags.AA
            finally:
                await server.stop()
    asyncio.run(main())


def test_forwarded_chain_ending_in_the_tailnet_is_completed() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2") as up:
            up.zone = {**up.zone, ("back.example.test", "CNAME"): ["back.example.test. 300 IN CNAME server.tailnet."]}
            server = await start(make_view((Upstream(up.host, up.port),)))
            try:
                for _ in range(2):  # the second answer comes from the cache, completed again
                    r = await ask(server, "back.example.test")
                    assert [(str(x.name), x.rdtype) for x in r.answer] == [
                        ("back.example.test.", 5), ("server.tailnet.", 1)]
                    assert addrs(r) == ["100.64.0.2"] and r.rcode() == dns.rcode.NOERROR
                assert len(up.queries) == 1
            finally:
                await server.stop()
    asyncio.run(main())


@pytest.mark.parametrize("batch", [True, False])
def test_both_udp_listeners_on_v4_and_v6(batch: bool) -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2") as up:
            server = DnsServer(ServerConfig(listen=(("127.0.0.1", 0), ("::1", 0)), batch_udp=batch,
                                            forward_timeout=1.0))
            await server.start(make_view((Upstream(up.host, up.port),)))
            try:
                assert bool(server._batch) == batch
                for host, port in server.bound:
                    q = dns.message.make_query("server.tailnet", "A")
                    r = await dns.asyncquery.udp(q, host, port=port, timeout=5)
                    assert addrs(r) == ["100.64.0.2"]
                    q = dns.message.make_query("www.example.test", "A")  # forwarded: reply via sendto
                    r = await dns.asyncquery.udp(q, host, port=port, timeout=5)
                    assert addrs(r) == ["192.0.2.10"]
                # a burst larger than one batch is answered in full
                port = server.bound[0][1]
                loop = asyncio.get_running_loop()
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.setblocking(False)
                sock.connect(("127.0.0.1", port))
                ids = set()
                for i in range(150):
                    q = dns.message.make_query("server.tailnet", "A")
                    ids.add(q.id)
                    sock.send(q.to_wire())
                got = set()
                while got != ids:
                    got.add(dns.message.from_wire(await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)).id)
                sock.close()
            finally:
                await server.stop()
    asyncio.run(main())


def test_overlong_labels_and_names_are_formerr_unlogged_and_never_forwarded(caplog: pytest.LogCaptureFixture) -> None:
    long_label = b"\x40" + b"a" * 64 + b"\x07example\x04test\x00"
    long_name = (b"\x3f" + b"a" * 63) * 3 + b"\x3e" + b"b" * 62 + b"\x00"

    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2") as up:
            server = await start(make_view((Upstream(up.host, up.port),)))
            try:
                loop = asyncio.get_running_loop()
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.setblocking(False)
                sock.connect(("127.0.0.1", server.bound[0][1]))
                for i in range(20):
                    qname = long_label if i % 2 else long_name
                    sock.send(struct.pack("!HHHHHH", i, 0x0100, 1, 0, 0, 0) + qname + b"\x00\x01\x00\x01")
                    reply = await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
                    assert reply[:2] == struct.pack("!H", i) and reply[3] & 0xF == dns.rcode.FORMERR
                sock.close()
                assert up.queries == [] and server.counters.dropped == 0
            finally:
                await server.stop()

    with caplog.at_level("DEBUG", logger="magicdns"):
        asyncio.run(main())
    assert not [r for r in caplog.records if r.levelno >= 30], [r.getMessage() for r in caplog.records]


def test_replies_known_at_once_are_returned_to_the_listener_not_sent_behind_its_back() -> None:
    """Dispatch.forward_or_reply: a cache hit and a query shed over the in-flight cap come back as
    the call's result (a batched listener sends them with its other replies, in one sendmmsg); a
    query that goes upstream returns None and its reply arrives through reply_to, once."""
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", behavior=Behavior.SLOW, delay=0.3) as up:
            server = await start(make_view((Upstream(up.host, up.port),)), max_inflight=1)
            dispatch = server.dispatch
            late: list[bytes] = []
            try:
                first = dns.message.make_query("www.example.test", "A")
                fwd = dispatch.answer(first.to_wire())
                assert dispatch.forward_or_reply(fwd, first.to_wire(), "127.0.0.1", late.append, False) is None
                # The cap (1) is held by the first: the next is shed, its SERVFAIL returned at once.
                other = dns.message.make_query("multi.example.test", "A")
                shed = dispatch.forward_or_reply(dispatch.answer(other.to_wire()), other.to_wire(), "127.0.0.1",
                                                 late.append, False)
                assert shed is not None
                r = dns.message.from_wire(shed)
                assert r.id == other.id and r.rcode() == dns.rcode.SERVFAIL and not late
                await async_wait_until(lambda: len(late) == 1, timeout=10, what="the forwarded reply")
                assert dns.message.from_wire(late[0]).id == first.id
                # Now cached: the same question is answered by the call itself.
                again = dns.message.make_query("www.example.test", "A")
                hit = dispatch.forward_or_reply(dispatch.answer(again.to_wire()), again.to_wire(), "127.0.0.1",
                                                late.append, False)
                assert hit is not None and dns.message.from_wire(hit).id == again.id and len(late) == 1
                assert len(up.queries) == 1
                c = server.status()["queries"]
                assert c["overload"] == 1 and c["cache_answers"] == 1 and c["forwarded"] == 1
            finally:
                await server.stop()
    asyncio.run(main())


def test_forwarded_queries_in_flight_hold_no_task() -> None:
    """The forwarding path runs on callbacks (Forwarder.start): queries waiting for a slow
    upstream hold a socket and a timer each, no asyncio task (each task cost loop turns and
    latency on every forwarded query)."""
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", behavior=Behavior.SILENT) as up:
            server = await start(make_view((Upstream(up.host, up.port),)))
            dispatch = server.dispatch
            got: list[bytes] = []
            try:
                before = len(asyncio.all_tasks())
                for i in range(10):
                    q = dns.message.make_query(f"q{i}.example.test", "A").to_wire()
                    assert dispatch.forward_or_reply(dispatch.answer(q), q, "127.0.0.1", got.append, False) is None
                await async_wait_until(lambda: len(up.queries) == 10, what="ten queries upstream")
                assert server.forwarder.inflight == 10 and len(asyncio.all_tasks()) == before
                # forward_timeout is 1 s: every one is answered SERVFAIL by its own timer.
                await async_wait_until(lambda: len(got) == 10, timeout=10, what="ten SERVFAILs")
                assert {dns.message.from_wire(r).rcode() for r in got} == {dns.rcode.SERVFAIL}
                assert server.forwarder.inflight == 0 and server.status()["forwarder"]["timeouts"] == 10
            finally:
                await server.stop()
    asyncio.run(main())
