"""Forwarding overload against a real server on loopback (issue 8): a query over the in-flight cap is
answered at once with a well-formed SERVFAIL, under the cap it is forwarded, and a backlogged
batched listener that is behind starts only a few forwards however many unique names arrive."""

from __future__ import annotations

import asyncio
import socket
import struct

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import pytest

from magicdns.dispatch import DATAGRAMS_PER_FORWARD
from magicdns.message import question_end
from magicdns.upstream import Upstream
from tests.integration.test_server_abuse import make_view, start
from tests.integration.upstreams import EXAMPLE_ZONE, Behavior, FakeUpstream
from tests.support import async_wait_until

pytestmark = pytest.mark.timeout(60)


def _client(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.setblocking(False)
    sock.connect(("127.0.0.1", port))
    return sock


async def _recv(sock: socket.socket, timeout: float = 5.0) -> bytes:
    return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), timeout)


def _shapes() -> list[dns.message.Message]:
    """Query shapes a shed SERVFAIL must get right: plain, EDNS with DO and a cookie, CD set, RD
    clear, mixed case, a long name, another type."""
    plain = dns.message.make_query("Plain.Example.TEST", "A")
    cookie = dns.message.make_query("wIth-CooKie.example.test", "AAAA", want_dnssec=True,
                                    options=[dns.edns.GenericOption(dns.edns.COOKIE, b"\x01" * 8)])
    cd = dns.message.make_query("cd.example.test", "TXT", use_edns=0)
    cd.flags |= dns.flags.CD
    no_rd = dns.message.make_query("no-rd.example.test", "MX")
    no_rd.flags &= ~dns.flags.RD
    long = dns.message.make_query(".".join(["a" * 60] * 3) + ".example.test", "A", use_edns=0, payload=1232)
    return [plain, cookie, cd, no_rd, long]


def test_shed_servfail_is_well_formed_for_every_query_shape() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", behavior=Behavior.SILENT) as up:
            server = await start(make_view((Upstream(up.host, up.port),)), max_inflight=1, forward_timeout=20.0)
            sock = _client(server.bound[0][1])
            try:
                hold = dns.message.make_query("hold.example.test", "A")
                sock.send(hold.to_wire())
                await async_wait_until(lambda: server.forwarder.inflight == 1, what="the cap to be held")
                for q in _shapes():
                    wire = q.to_wire()
                    sock.send(wire)
                    raw = await _recv(sock)
                    r = dns.message.from_wire(raw)
                    assert r.id == q.id and r.rcode() == dns.rcode.SERVFAIL
                    assert r.flags & dns.flags.QR and r.flags & dns.flags.RA
                    assert not r.flags & (dns.flags.AA | dns.flags.TC | dns.flags.AD)
                    assert (r.flags & dns.flags.RD) == (q.flags & dns.flags.RD)
                    assert (r.flags & dns.flags.CD) == (q.flags & dns.flags.CD)
                    assert raw[3] & 0x40 == 0  # Z
                    qend = question_end(wire)
                    assert raw[12:qend] == wire[12:qend]  # the question, case and all
                    assert struct.unpack("!HHHH", raw[4:12])[:3] == (1, 0, 0)
                    assert not r.answer and not r.authority and not r.additional
                    if q.edns < 0:
                        assert r.edns < 0
                    else:
                        assert r.edns == 0 and (r.ednsflags & dns.flags.DO) == (q.ednsflags & dns.flags.DO)
                        # Nothing of the client's echoed (its cookie): at most our Extended DNS Error.
                        assert [o.otype for o in r.options] in ([], [dns.edns.EDE])
                assert len(up.queries) == 1  # none of them went upstream
                assert server.status()["queries"]["overload"] == len(_shapes())
            finally:
                sock.close()
                await server.stop()
    asyncio.run(main())


def test_forwarded_under_the_cap_and_shed_over_it() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", behavior=Behavior.SILENT) as up:
            server = await start(make_view((Upstream(up.host, up.port),)), max_inflight=3, forward_timeout=20.0)
            sock = _client(server.bound[0][1])
            try:
                for i in range(3):
                    sock.send(dns.message.make_query(f"under{i}.example.test", "A").to_wire())
                    await async_wait_until(lambda: len(up.queries) == i + 1, what=f"forward {i} upstream")
                assert server.forwarder.inflight == 3 and server.status()["queries"]["overload"] == 0
                over = dns.message.make_query("over.example.test", "A")
                sock.send(over.to_wire())
                r = dns.message.from_wire(await _recv(sock, timeout=2.0))  # not after the 20 s timeout
                assert r.id == over.id and r.rcode() == dns.rcode.SERVFAIL
                assert len(up.queries) == 3 and server.status()["queries"]["overload"] == 1
                local = dns.message.make_query("server.tailnet", "A")
                sock.send(local.to_wire())
                r = dns.message.from_wire(await _recv(sock))
                assert r.id == local.id and r.answer  # the cap is on forwarding only
            finally:
                sock.close()
                await server.stop()
    asyncio.run(main())


def test_a_saturated_listener_starts_one_forward_per_256_datagrams() -> None:
    """A closed-loop client keeps the socket full, so the listener reads 64 datagrams, then the 36
    behind them, and again (driven here by hand, 2,000 datagrams, a fifth of them local names).
    Every local name is answered; the flood starts about one forward per DATAGRAMS_PER_FORWARD
    datagrams read (before, each partial read forwarded all of its flood: 600 here)."""
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", behavior=Behavior.SILENT) as up:
            server = await start(make_view((Upstream(up.host, up.port),)), forward_timeout=20.0)
            listener = server._batch[0]
            asyncio.get_running_loop().remove_reader(listener.fd)  # read by hand below
            sock = _client(server.bound[0][1])
            sent = 0
            got: dict[int, int] = {}

            def serve(names: list[str]) -> None:
                nonlocal sent
                for name in names:
                    q = dns.message.make_query(name, "A")
                    q.id = sent
                    sent += 1
                    sock.send(q.to_wire())
                listener._on_readable()
                while True:
                    try:
                        r = dns.message.from_wire(sock.recv(4096))
                    except BlockingIOError:
                        return
                    got[r.id] = r.rcode()

            try:
                for _ in range(3):  # the listener falls behind on local names first
                    serve(["server.tailnet"] * 100)
                assert listener.backlog.behind and len(got) == 300
                for k in range(20):
                    serve(["server.tailnet" if i % 5 == 0 else f"f{k}-{i}.example.test" for i in range(100)])
                forwarded = server.status()["queries"]["forwarded"]
                assert 1 <= forwarded <= 2000 // DATAGRAMS_PER_FORWARD + 2, forwarded
                assert len(got) == sent - forwarded  # every other one answered at once
                assert sum(1 for code in got.values() if code == dns.rcode.NOERROR) == 300 + 400
                assert sum(1 for code in got.values() if code == dns.rcode.SERVFAIL) == 1600 - forwarded
                await async_wait_until(lambda: len(up.queries) == forwarded, what="the forwards upstream")
            finally:
                sock.close()
                await server.stop()
    asyncio.run(main())


def test_cached_names_are_still_answered_when_shed_fresh_then_stale() -> None:
    """Over the cap a forwarded name in the cache gets its cached answer, not SERVFAIL: fresh while
    its TTL lasts, then stale (RFC 8767: Extended DNS Error 3, "Stale Answer") instead of asking upstream."""
    zone = {**EXAMPLE_ZONE, ("soon.example.test", "A"): ["soon.example.test. 1 IN A 192.0.2.99"]}

    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", zone=zone) as up:
            server = await start(make_view((Upstream(up.host, up.port),)), max_inflight=1, forward_timeout=20.0)
            sock = _client(server.bound[0][1])

            async def ask(name: str) -> dns.message.Message:
                q = dns.message.make_query(name, "A", use_edns=0)
                sock.send(q.to_wire())
                r = dns.message.from_wire(await _recv(sock))
                assert r.id == q.id
                return r

            try:
                assert (await ask("www.example.test")).answer and (await ask("soon.example.test")).answer
                up.behavior = Behavior.SILENT
                sock.send(dns.message.make_query("hold.example.test", "A").to_wire())
                await async_wait_until(lambda: server.forwarder.inflight == 1, what="the cap to be held")
                asked = len(up.queries)
                r = await ask("www.example.test")
                assert r.rcode() == dns.rcode.NOERROR and r.answer[0].ttl > 30
                r = await ask("fresh-name.example.test")
                assert r.rcode() == dns.rcode.SERVFAIL

                async def stale() -> bool:
                    r = await ask("soon.example.test")
                    assert r.rcode() == dns.rcode.NOERROR and r.answer, r  # never SERVFAIL meanwhile
                    return [(o.otype, getattr(o, "code", None)) for o in r.options] == [(dns.edns.EDE, 3)]

                await async_wait_until(stale, timeout=5, what="the stale answer once the TTL ran out")
                assert len(up.queries) == asked  # nothing of this went upstream
            finally:
                sock.close()
                await server.stop()
    asyncio.run(main())


def test_forwarded_replies_reach_their_own_senders_from_one_batch() -> None:
    """The batched listener makes a query's reply closure only when its race starts (a shed query
    gets none: dispatch.LateReply), from the sender address of that datagram of the batch. Three
    clients, two forwarded names each and a local name between them, all in one read: every reply
    comes back to the client that asked, for its own question (a closure bound to the wrong datagram
    of the batch would send it elsewhere)."""
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", zone=EXAMPLE_ZONE) as up:
            server = await start(make_view((Upstream(up.host, up.port),)), forward_timeout=20.0)
            listener = server._batch[0]
            asyncio.get_running_loop().remove_reader(listener.fd)  # one read, by hand below
            clients = [_client(server.bound[0][1]) for _ in range(3)]
            asked: dict[int, tuple[int, str]] = {}
            try:
                for k in range(9):
                    name = "server.tailnet" if k % 3 == 1 else f"n{k}.example.test"
                    q = dns.message.make_query(name, "A")
                    q.id = 100 + k
                    clients[k % 3].send(q.to_wire())
                    asked[q.id] = (k % 3, name)
                listener._on_readable()  # a loopback send has landed when send() returns
                loop = asyncio.get_running_loop()
                loop.add_reader(listener.fd, listener._on_readable)
                for who, sock in enumerate(clients):
                    for _ in range(3):
                        r = dns.message.from_wire(await _recv(sock))
                        client, name = asked.pop(r.id)
                        assert client == who and str(r.question[0].name) == name + ".", (who, r)
                assert not asked
                assert server.status()["queries"]["forwarded"] == 6
            finally:
                for sock in clients:
                    sock.close()
                await server.stop()
    asyncio.run(main())
