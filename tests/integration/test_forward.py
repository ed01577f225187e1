"""Forwarding against real upstreams on loopback: scriptable fake servers (tests/integration/upstreams.py)
and Debian's dnsmasq. Every server is started inside the test (or a fixture) and stopped in a finalizer."""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import uvloop
from dnslib import EDNS0, QTYPE, RCODE, RR, DNSRecord, EDNSOption

from magicdns.cache import Cache, query_info, scan_message
from magicdns.forward import ForwardingLoopError, Forwarder, reject_self
from magicdns.upstream import Upstream
from tests.support import async_wait_until, free_port, wait_until
from tests.integration.upstreams import EXAMPLE_ZONE, Behavior, FakeUpstream, build_answer

T = TypeVar("T")


def run(main: Callable[[], Awaitable[T]]) -> T:
    """Run an async test body on uvloop, as the server does."""
    return uvloop.run(main())  # type: ignore[arg-type]


def up(fake: FakeUpstream) -> Upstream:
    return Upstream(fake.host, fake.port)


def query(name: str, qtype: str = "A", *, edns: bool = False, do: bool = False,
          options: list[EDNSOption] | None = None) -> bytes:
    q = DNSRecord.question(name, qtype)
    if edns or do or options:
        q.add_ar(EDNS0(udp_len=1232, flags="do" if do else "", opts=options or []))
    return bytes(q.pack())


# Far longer than any race below is allowed to take: a bound against hangs only. What each test
# asserts is which way the race ended (counters, which upstream was asked), never how fast.
HANG_GUARD = 20.0


def within_guard(aw: Awaitable[T]) -> Awaitable[T]:
    return asyncio.wait_for(aw, HANG_GUARD)


def addresses(reply: bytes) -> list[str]:
    return sorted(str(rr.rdata) for rr in DNSRecord.parse(reply).rr if rr.rtype in (QTYPE.A, QTYPE.AAAA))


class FakeClock:
    """The cache's clock, moved by hand so TTL expiry needs no waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- faithful forwarding -------------------------------------------------------------------------

def test_query_forwarded_faithfully_apart_from_the_id() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2") as a:
            fwd = Forwarder()
            q = DNSRecord.question("WwW.Example.TEST", "AAAA")
            q.header.rd = 1
            q.header.cd = 1
            q.header.ad = 1
            q.add_ar(EDNS0(udp_len=1400, flags="do",
                           opts=[EDNSOption(10, b"\x01\x02\x03\x04\x05\x06\x07\x08"), EDNSOption(65001, b"xyz")]))
            wire = bytes(q.pack())
            reply = await fwd.forward(wire, (up(a),), allow_tailnet_answers=False)
            assert len(a.queries) == 1
            sent = a.queries[0]
            assert sent[2:] == wire[2:]  # flags, question case, OPT and its options untouched
            r = DNSRecord.parse(reply)
            assert r.header.id == q.header.id
            assert str(r.q.qname) == "WwW.Example.TEST."
            assert addresses(reply) == ["2001:db8::10"]
            opt = [rr for rr in r.ar if rr.rtype == QTYPE.OPT][0]
            assert [o.code for o in opt.rdata] == [10, 65001]  # the upstream's options reach the client
            await fwd.close()
    run(main)


def test_fresh_id_and_source_port_per_query() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2") as a:
            fwd = Forwarder()
            wire = query("www.example.test")
            for _ in range(20):
                await fwd.forward(wire, (up(a),), allow_tailnet_answers=False)
            ids = {q[0:2] for q in a.queries}
            ports = {src[1] for src in a.sources}
            assert len(ids) >= 15 and len(ports) >= 15  # random; collisions are possible but rare
    run(main)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_upstream_udp_and_tcp() -> None:
    async def main() -> None:
        async with FakeUpstream.start("::1", behavior=Behavior.TRUNCATE) as a:
            fwd = Forwarder()
            reply = await fwd.forward(query("www.example.test", "AAAA"), (up(a),), allow_tailnet_answers=False)
            assert addresses(reply) == ["2001:db8::10"]
            assert len(a.queries) == 1 and len(a.tcp_queries) == 1
    run(main)


def test_any_type_passes_through() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2") as a:
            fwd = Forwarder(cache=Cache())
            reply = await fwd.forward(query("big.example.test", "TXT"), (up(a),), allow_tailnet_answers=False)
            assert len(DNSRecord.parse(reply).rr) == 12
            reply = await fwd.forward(query("alias.example.test", "CNAME"), (up(a),), allow_tailnet_answers=False)
            assert str(DNSRecord.parse(reply).rr[0].rdata) == "www.example.test."
    run(main)


# -- racing and failures -------------------------------------------------------------------------

def test_silent_first_upstream_loses_the_race() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", behavior=Behavior.SILENT) as a, \
                FakeUpstream.start("127.0.0.3") as b:
            fwd = Forwarder(stagger=0.15, timeout=1000.0)
            reply = await within_guard(fwd.forward(query("www.example.test"), (up(a), up(b)),
                                                   allow_tailnet_answers=False))
            assert addresses(reply) == ["192.0.2.10"]
            assert len(a.queries) == 1 and len(b.queries) == 1
            # Won by b after the stagger, not ended by the (here unreachable) timeout.
            s = fwd.stats()
            assert s["timeouts"] == 0 and s["answered"] == 1
            assert s["upstreams"][up(b).spec]["answered"] == 1 and s["upstreams"][up(a).spec]["answered"] == 0
            # The silent one is now ranked behind: the next query goes to b first.
            await fwd.forward(query("www.example.test", "AAAA"), (up(a), up(b)), allow_tailnet_answers=False)
            assert len(b.queries) == 2 and len(a.queries) == 1
    run(main)


def test_servfail_moves_on_at_once() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", behavior=Behavior.SERVFAIL) as a, \
                FakeUpstream.start("127.0.0.3") as b:
            # Stagger and timeout beyond the hang guard: b can only be asked because a failed.
            fwd = Forwarder(stagger=1000.0, timeout=2000.0)
            reply = await within_guard(fwd.forward(query("www.example.test"), (up(a), up(b)),
                                                   allow_tailnet_answers=False))
            assert addresses(reply) == ["192.0.2.10"] and len(b.queries) == 1
            assert fwd.stats()["upstreams"][up(a).spec]["servfail"] == 1 and fwd.stats()["timeouts"] == 0
    run(main)


def test_refused_port_moves_on_at_once() -> None:
    async def main() -> None:
        dead = Upstream("127.0.0.2", free_port(host="127.0.0.2"))  # nothing listens: ICMP unreachable
        async with FakeUpstream.start("127.0.0.3") as b:
            fwd = Forwarder(stagger=1000.0, timeout=2000.0)  # b is asked only because dead failed
            reply = await within_guard(fwd.forward(query("www.example.test"), (dead, up(b)),
                                                   allow_tailnet_answers=False))
            assert addresses(reply) == ["192.0.2.10"] and len(b.queries) == 1
            assert fwd.stats()["upstreams"][dead.spec]["last_error"].startswith("recv")
    run(main)


def test_upstream_failure_and_recovery_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", behavior=Behavior.SILENT) as a:
            fwd = Forwarder(timeout=0.2)
            for _ in range(3):
                await fwd.forward(query("www.example.test"), (up(a),), allow_tailnet_answers=False)
            a.behavior = Behavior.NORMAL
            for _ in range(3):
                await fwd.forward(query("www.example.test"), (up(a),), allow_tailnet_answers=False)

    with caplog.at_level("INFO", logger="magicdns.forward"):
        run(main)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "failing: timeout" in lines[0] and "answers again" in lines[1]


def test_all_servfail_gives_servfail_within_the_bound() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", behavior=Behavior.SERVFAIL) as a, \
                FakeUpstream.start("127.0.0.3", behavior=Behavior.REFUSED) as b:
            # Both fail at once: the race ends then, not at the (unreachable) stagger or timeout.
            fwd = Forwarder(stagger=1000.0, timeout=2000.0)
            wire = query("www.example.test")
            reply = await within_guard(fwd.forward(wire, (up(a), up(b)), allow_tailnet_answers=False))
            assert fwd.stats()["timeouts"] == 0
            r = DNSRecord.parse(reply)
            assert r.header.rcode == RCODE.SERVFAIL  # an upstream's REFUSED is not the client's
            assert r.header.id == DNSRecord.parse(wire).header.id
            assert len(a.queries) == 1 and len(b.queries) == 1
            assert fwd.stats()["servfail"] == 1
    run(main)


def test_all_silent_gives_servfail_at_the_timeout() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", behavior=Behavior.SILENT) as a, \
                FakeUpstream.start("127.0.0.3", behavior=Behavior.SILENT) as b:
            fwd = Forwarder(stagger=0.1, timeout=0.6)
            wire = query("www.example.test", edns=True)
            reply = await within_guard(fwd.forward(wire, (up(a), up(b)), allow_tailnet_answers=False))
            r = DNSRecord.parse(reply)
            assert r.header.rcode == RCODE.SERVFAIL and r.header.qr == 1
            opt = [rr for rr in r.ar if rr.rtype == QTYPE.OPT][0]
            assert [(o.code, o.data) for o in opt.rdata] == [(15, b"\x00\x16")]  # EDE 22
            s = fwd.stats()
            assert s["timeouts"] == 1 and s["inflight"] == 0
            assert s["upstreams"][up(a).spec]["timeouts"] == 1
    run(main)


def test_upstream_servfail_passed_on_with_its_details() -> None:
    async def main() -> None:
        def servfail_with_ede(q: bytes, _src: object) -> bytes:
            r = DNSRecord.parse(q).reply()
            r.header.rcode = RCODE.SERVFAIL
            r.add_ar(EDNS0(udp_len=1232, opts=[EDNSOption(15, b"\x00\x06")]))  # EDE 6: DNSSEC Bogus
            return bytes(r.pack())

        async with FakeUpstream.start("127.0.0.2", hook=servfail_with_ede) as a:
            fwd = Forwarder()
            reply = await fwd.forward(query("www.example.test", edns=True), (up(a),), allow_tailnet_answers=False)
            r = DNSRecord.parse(reply)
            assert r.header.rcode == RCODE.SERVFAIL
            assert [(o.code, o.data) for o in r.ar[0].rdata] == [(15, b"\x00\x06")]
    run(main)


def test_no_upstreams_gives_servfail() -> None:
    async def main() -> None:
        fwd = Forwarder()
        reply = await fwd.forward(query("www.example.test"), (), allow_tailnet_answers=False)
        assert DNSRecord.parse(reply).header.rcode == RCODE.SERVFAIL
    run(main)


def test_slow_upstream_answer_is_awaited() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", behavior=Behavior.SLOW, delay=0.3) as a:
            fwd = Forwarder(timeout=3.0)
            reply = await fwd.forward(query("www.example.test"), (up(a),), allow_tailnet_answers=False)
            assert addresses(reply) == ["192.0.2.10"]
    run(main)


def test_truncated_reply_is_retried_over_tcp() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", behavior=Behavior.TRUNCATE) as a:
            fwd = Forwarder(cache=Cache())
            wire = query("big.example.test", "TXT", edns=True)
            reply = await fwd.forward(wire, (up(a),), allow_tailnet_answers=False)
            r = DNSRecord.parse(reply)
            assert r.header.tc == 0 and len(r.rr) == 12
            assert len(a.queries) == 1 and len(a.tcp_queries) == 1
            assert a.tcp_queries[0][2:] == wire[2:]
            assert fwd.stats()["tcp_fallbacks"] == 1
    run(main)


def test_silent_tcp_after_truncation_is_bounded() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", behavior=Behavior.TRUNCATE, tcp_silent=True) as a, \
                FakeUpstream.start("127.0.0.3") as b:
            fwd = Forwarder(stagger=0.15, timeout=1000.0)
            reply = await within_guard(fwd.forward(query("www.example.test"), (up(a), up(b)),
                                                   allow_tailnet_answers=False))
            assert addresses(reply) == ["192.0.2.10"]
            assert len(a.tcp_queries) == 1 and len(b.queries) == 1
            s = fwd.stats()  # b won after the stagger while a's TCP fallback hung
            assert s["timeouts"] == 0 and s["tcp_fallbacks"] == 1 and s["upstreams"][up(b).spec]["answered"] == 1
            lone = Forwarder(timeout=0.5)
            reply = await within_guard(lone.forward(query("www.example.test"), (up(a),), allow_tailnet_answers=False))
            assert DNSRecord.parse(reply).header.rcode == RCODE.SERVFAIL
            assert lone.stats()["timeouts"] == 1  # the silent TCP fallback is ended by the race's timeout
            await fwd.close()
            await lone.close()
            assert not fwd._tcp_tasks and not lone._tcp_tasks
    run(main)


def test_cancelled_forward_releases_everything() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", behavior=Behavior.SILENT) as a:
            fwd = Forwarder(timeout=30.0)
            task = asyncio.create_task(fwd.forward(query("www.example.test"), (up(a),), allow_tailnet_answers=False))
            await async_wait_until(lambda: fwd.inflight == 1, what="query in flight")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert fwd.inflight == 0 and not fwd._outgoing
    run(main)


# -- spoofing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("behavior", [Behavior.SPOOF_ID, Behavior.SPOOF_QUESTION])
def test_mismatched_replies_are_dropped(behavior: Behavior) -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", behavior=behavior) as a:
            fwd = Forwarder()
            reply = await fwd.forward(query("www.example.test"), (up(a),), allow_tailnet_answers=False)
            assert addresses(reply) == ["192.0.2.10"]
            assert str(DNSRecord.parse(reply).q.qname) == "www.example.test."
            assert fwd.stats()["dropped_mismatch"] == 1
    run(main)


def test_garbled_replies_never_break_the_forwarder() -> None:
    async def main() -> None:
        rng = random.Random(2026)

        def garble(q: bytes, _src: object) -> list[bytes]:
            good = bytearray(build_answer(q, EXAMPLE_ZONE).pack())
            qend = query_info(q).qend
            lo = qend if rng.random() < 0.7 else 0  # mostly keep ID and question: reach the parser
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(lo, len(good))
                good[pos:pos + rng.randint(1, 3)] = bytes(rng.randrange(256) for _ in range(rng.randint(0, 3)))
            servfail = DNSRecord.parse(q).reply()
            servfail.header.rcode = RCODE.SERVFAIL
            return [bytes(good), bytes(servfail.pack())]  # the SERVFAIL ends each round at once

        async with FakeUpstream.start("127.0.0.2", hook=garble) as a:
            fwd = Forwarder(cache=Cache(), timeout=2.0)
            for i in range(300):
                wire = query(rng.choice(["www", "multi", "alias", "rebind", "nope"]) + ".example.test",
                             rng.choice(["A", "AAAA", "TXT"]), edns=bool(i % 2))
                reply = await fwd.forward(wire, (up(a),), allow_tailnet_answers=bool(i % 3))
                assert reply[:2] == wire[:2] and reply[2] & 0x80
                scan_message(reply)  # whatever got through is well-formed
            s = fwd.stats()
            assert s["inflight"] == 0 and not fwd._outgoing and s["queries"] == 300
            assert s["malformed"] > 0 and s["dropped_mismatch"] > 0
    run(main)


def test_question_case_must_match_as_sent() -> None:
    async def main() -> None:
        def flip_case(q: bytes, _src: object) -> bytes:
            r = DNSRecord.parse(q).reply()
            r.q.qname = str(r.q.qname).upper()
            return bytes(r.pack())

        async with FakeUpstream.start("127.0.0.2", hook=flip_case) as a:
            fwd = Forwarder(timeout=0.5)
            reply = await fwd.forward(query("www.example.test"), (up(a),), allow_tailnet_answers=False)
            assert DNSRecord.parse(reply).header.rcode == RCODE.SERVFAIL
            assert fwd.stats()["dropped_mismatch"] == 1
    run(main)


def test_reply_from_another_port_is_ignored() -> None:
    async def main() -> None:
        forger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        forger.bind(("127.0.0.2", 0))

        def forge(q: bytes, src: tuple[str, int] | None) -> None:
            # Right ID and question, wrong source port: a blind spoofer that guessed everything else.
            r = DNSRecord.parse(q).reply()
            r.add_answer(*RR.fromZone("www.example.test. 300 IN A 203.0.113.66"))
            assert src is not None
            forger.sendto(bytes(r.pack()), src)
            return None

        try:
            async with FakeUpstream.start("127.0.0.2", behavior=Behavior.SLOW, delay=0.2, hook=forge) as a:
                fwd = Forwarder()
                reply = await fwd.forward(query("www.example.test"), (up(a),), allow_tailnet_answers=False)
                assert addresses(reply) == ["192.0.2.10"]
        finally:
            forger.close()
    run(main)


# -- cache ---------------------------------------------------------------------------------------

def test_cache_hit_after_first_query() -> None:
    async def main() -> None:
        clock = FakeClock()
        async with FakeUpstream.start("127.0.0.2") as a:
            fwd = Forwarder(cache=Cache(), clock=clock)
            first = query("multi.example.test")
            await fwd.forward(first, (up(a),), allow_tailnet_answers=False)
            assert fwd.answer_from_cache(first, clock.now) is not None
            second = DNSRecord.question("MULTI.example.test", "A")
            clock.now += 50.4
            hit = fwd.answer_from_cache(bytes(second.pack()), clock.now)
            assert hit is not None and len(a.queries) == 1
            r = DNSRecord.parse(hit)
            assert r.header.id == second.header.id
            assert str(r.q.qname) == "MULTI.example.test."
            assert sorted(rr.ttl for rr in r.rr) == [10, 70]  # 60 and 120, 50 s older
            clock.now += 10
            assert fwd.answer_from_cache(bytes(second.pack()), clock.now) is None  # min TTL 60 passed
            assert fwd.stats()["cache"]["hits"] == 2
    run(main)


def test_negative_answers_are_cached_from_the_soa() -> None:
    async def main() -> None:
        clock = FakeClock()
        async with FakeUpstream.start("127.0.0.2") as a:
            fwd = Forwarder(cache=Cache(), clock=clock)
            nx = query("nope.example.test")
            nodata = query("www.example.test", "MX")
            assert DNSRecord.parse(await fwd.forward(nx, (up(a),), allow_tailnet_answers=False)).header.rcode == RCODE.NXDOMAIN
            await fwd.forward(nodata, (up(a),), allow_tailnet_answers=False)
            clock.now += 59
            for wire, rcode in ((nx, RCODE.NXDOMAIN), (nodata, RCODE.NOERROR)):
                hit = fwd.answer_from_cache(wire, clock.now)
                assert hit is not None
                r = DNSRecord.parse(hit)
                assert r.header.rcode == rcode and not r.rr
                assert r.auth[0].rtype == QTYPE.SOA and r.auth[0].ttl == 1  # min(300, MINIMUM 60) - 59
            clock.now += 1
            assert fwd.answer_from_cache(nx, clock.now) is None
            assert len(a.queries) == 2
    run(main)


def test_stale_answer_served_when_upstreams_die() -> None:
    async def main() -> None:
        clock = FakeClock()
        port = free_port(host="127.0.0.2")
        fwd = Forwarder(cache=Cache(), clock=clock, timeout=0.5)
        wire = query("www.example.test")
        async with FakeUpstream.start("127.0.0.2", port) as a:
            await fwd.forward(wire, (up(a),), allow_tailnet_answers=False)
        clock.now += 3600  # long expired, well inside the one-day stale window
        assert fwd.answer_from_cache(wire, clock.now) is None
        reply = await within_guard(fwd.forward(wire, (Upstream("127.0.0.2", port),), allow_tailnet_answers=False))
        r = DNSRecord.parse(reply)
        assert r.header.rcode == RCODE.NOERROR and [rr.ttl for rr in r.rr] == [30]
        assert addresses(reply) == ["192.0.2.10"]
        assert fwd.stats()["cache"]["stale_served"] == 1
        async with FakeUpstream.start("127.0.0.2", behavior=Behavior.SILENT) as silent:
            reply = await fwd.forward(wire, (up(silent),), allow_tailnet_answers=False)
            assert addresses(reply) == ["192.0.2.10"]
    run(main)


def test_servfail_is_not_cached_but_the_failure_is_remembered_briefly() -> None:
    async def main() -> None:
        clock = FakeClock()
        async with FakeUpstream.start("127.0.0.2", behavior=Behavior.SERVFAIL) as a:
            fwd = Forwarder(cache=Cache(failure_ttl=1.0), clock=clock)
            wire = query("www.example.test")
            await fwd.forward(wire, (up(a),), allow_tailnet_answers=False)
            assert fwd.stats()["cache"]["entries"] == 0
            # RFC 9520: for a second, the failure is answered without asking the upstreams again.
            again = fwd.answer_from_cache(wire, clock.now + 0.5)
            assert again is not None and DNSRecord.parse(again).header.rcode == RCODE.SERVFAIL
            assert again[:2] == wire[:2] and fwd.stats()["failure_cached"] == 1
            assert fwd.answer_from_cache(wire, clock.now + 1.0) is None
            a.behavior = Behavior.NORMAL
            await fwd.forward(wire, (up(a),), allow_tailnet_answers=False)
            assert addresses(fwd.answer_from_cache(wire, clock.now + 0.1) or b"") == ["192.0.2.10"]
    run(main)


def test_formerr_from_upstream_is_passed_on_and_not_remembered() -> None:
    async def main() -> None:
        def formerr(q: bytes, _src: object) -> bytes:
            r = DNSRecord.parse(q).reply()
            r.header.rcode = RCODE.FORMERR
            return bytes(r.pack())

        async with FakeUpstream.start("127.0.0.2", hook=formerr) as a:
            fwd = Forwarder(cache=Cache())
            wire = query("www.example.test")
            reply = await fwd.forward(wire, (up(a),), allow_tailnet_answers=False)
            assert DNSRecord.parse(reply).header.rcode == RCODE.FORMERR
            assert fwd.answer_from_cache(wire, time.monotonic()) is None
    run(main)


# -- rebinding -----------------------------------------------------------------------------------

def test_rebinding_answers_are_stripped() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2") as a:
            fwd = Forwarder(cache=Cache())
            reply = await fwd.forward(query("rebind.example.test"), (up(a),), allow_tailnet_answers=False)
            assert addresses(reply) == ["192.0.2.20"]
            reply = await fwd.forward(query("rebind.example.test", "AAAA"), (up(a),), allow_tailnet_answers=False)
            r = DNSRecord.parse(reply)
            assert r.header.rcode == RCODE.NOERROR and not r.rr  # NODATA
            reply = await fwd.forward(query("onlytail.example.test"), (up(a),), allow_tailnet_answers=False)
            assert addresses(reply) == []
            reply = await fwd.forward(query("mapped.example.test", "AAAA"), (up(a),), allow_tailnet_answers=False)
            assert addresses(reply) == ["::ffff:c000:201"]
            assert fwd.stats()["rebind_blocked"] == 4
            # What the client got is what the cache serves.
            assert addresses(fwd.answer_from_cache(query("rebind.example.test"), time.monotonic()) or b"") == ["192.0.2.20"]
    run(main)


def test_rebinding_covers_nat64_and_svcb_hints() -> None:
    """64:ff9b::/96 holding a 100.64.0.0/10 address, and HTTPS ipv4hint/ipv6hint into the tailnet,
    are stripped like plain A/AAAA records (issue 8); other hints and addresses stay."""
    zone = dict(EXAMPLE_ZONE)
    zone[("nat64.example.test", "AAAA")] = ["nat64.example.test. 300 IN AAAA 64:ff9b::6440:102",
                                            "nat64.example.test. 300 IN AAAA 64:ff9b::c000:201"]
    zone[("svc.example.test", "HTTPS")] = [
        "svc.example.test. 300 IN HTTPS 1 . alpn=h2 ipv4hint=100.64.1.2,192.0.2.1 ipv6hint=fd7a:115c:a1e0::2"]

    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", zone=zone) as a:
            fwd = Forwarder(cache=Cache())
            reply = await fwd.forward(query("nat64.example.test", "AAAA"), (up(a),), allow_tailnet_answers=False)
            assert addresses(reply) == ["64:ff9b::c000:201"]
            reply = await fwd.forward(query("svc.example.test", "HTTPS"), (up(a),), allow_tailnet_answers=False)
            (rr,) = DNSRecord.parse(reply).rr
            text = str(rr.rdata)
            assert "ipv4hint=192.0.2.1" in text and "100.64" not in text and "fd7a" not in text
            assert fwd.stats()["rebind_blocked"] == 2
            reply = await fwd.forward(query("svc.example.test", "HTTPS"), (up(a),), allow_tailnet_answers=True)
            assert "100.64.1.2" in str(DNSRecord.parse(reply).rr[0].rdata)
    run(main)


def test_rebinding_logged_once_per_name(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2") as a:
            fwd = Forwarder()
            for _ in range(3):
                await fwd.forward(query("rebind.example.test"), (up(a),), allow_tailnet_answers=False)
            assert fwd.stats()["rebind_blocked"] == 3

    with caplog.at_level("INFO", logger="magicdns.forward"):
        run(main)
    lines = [r.getMessage() for r in caplog.records if "rebinding" in r.getMessage()]
    assert lines == ["rebinding protection: removed tailnet addresses from the answer for rebind.example.test."]


def test_tailnet_answers_allowed_for_tailnet_routes() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2") as a:
            fwd = Forwarder()
            reply = await fwd.forward(query("rebind.example.test"), (up(a),), allow_tailnet_answers=True)
            assert addresses(reply) == ["100.64.1.2", "192.0.2.20"]
            assert fwd.stats()["rebind_blocked"] == 0
    run(main)


# -- bounds and loops ----------------------------------------------------------------------------

def test_inflight_cap_answers_servfail_at_once() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", behavior=Behavior.SILENT) as a:
            fwd = Forwarder(max_inflight=2, timeout=30.0)
            tasks = [asyncio.create_task(fwd.forward(query(f"q{i}.example.test"), (up(a),),
                                                     allow_tailnet_answers=False)) for i in range(2)]
            await async_wait_until(lambda: fwd.inflight == 2, what="two queries in flight")
            # "At once" exactly: the reply is handed over before start() returns, nothing in flight.
            got: list[bytes] = []
            assert fwd.start(query("www.example.test"), (up(a),), allow_tailnet_answers=False,
                             done=got.append) is None
            (reply,) = got
            assert DNSRecord.parse(reply).header.rcode == RCODE.SERVFAIL
            assert fwd.stats()["overload"] == 1 and len(a.queries) == 2
            await fwd.close()
            for r in await asyncio.gather(*tasks):
                assert DNSRecord.parse(r).header.rcode == RCODE.SERVFAIL
            assert fwd.inflight == 0
    run(main)


def test_identical_queries_in_flight_share_one_upstream_query() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", behavior=Behavior.SLOW, delay=0.3) as a:
            fwd = Forwarder()
            first = query("www.example.test", options=[EDNSOption(10, b"cookie-1")])
            second_q = DNSRecord.question("WWW.example.TEST")
            second_q.add_ar(EDNS0(udp_len=1232, opts=[EDNSOption(10, b"cookie-2")]))
            second = bytes(second_q.pack())
            lead = asyncio.create_task(fwd.forward(first, (up(a),), allow_tailnet_answers=False))
            await async_wait_until(lambda: len(a.queries) == 1, what="the first query upstream")
            joined = await fwd.forward(second, (up(a),), allow_tailnet_answers=False)
            led = await lead
            assert len(a.queries) == 1 and fwd.stats()["coalesced"] == 1
            r1, r2 = DNSRecord.parse(led), DNSRecord.parse(joined)
            assert addresses(led) == addresses(joined) == ["192.0.2.10"]
            assert r2.header.id == second_q.header.id and str(r2.q.qname) == "WWW.example.TEST."
            assert r1.ar[0].rdata[0].data == b"cookie-1"
            assert r2.ar[0].rdata == []  # never the other client's cookie
            # Another route or rebinding rule is another flight.
            await asyncio.gather(fwd.forward(first, (up(a),), allow_tailnet_answers=False),
                                 fwd.forward(first, (up(a),), allow_tailnet_answers=True))
            assert len(a.queries) == 3
    run(main)


def test_closed_forwarder_answers_at_once() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2") as a:
            fwd = Forwarder()
            await fwd.close()
            reply = await fwd.forward(query("www.example.test"), (up(a),), allow_tailnet_answers=False)
            assert DNSRecord.parse(reply).header.rcode == RCODE.SERVFAIL and not a.queries
    run(main)


def test_own_query_coming_back_is_recognised() -> None:
    async def main() -> None:
        holder: dict[str, Any] = {}
        seen: list[bool] = []

        def listener(q: bytes, _src: object) -> bytes | None:
            # Plays our own server's listener: the forwarder's upstream is ourselves.
            looped = holder["fwd"].looped(q)
            seen.append(looped)
            if looped:
                r = DNSRecord.parse(q).reply()
                r.header.rcode = RCODE.SERVFAIL
                return bytes(r.pack())
            return None

        async with FakeUpstream.start("127.0.0.2", hook=listener) as a:
            fwd = holder["fwd"] = Forwarder(timeout=2.0)
            wire = query("www.example.test")
            assert not fwd.looped(wire)
            reply = await fwd.forward(wire, (up(a),), allow_tailnet_answers=False)
            assert seen == [True]
            assert DNSRecord.parse(reply).header.rcode == RCODE.SERVFAIL
            assert not fwd.looped(a.queries[0])  # no longer in flight
            assert fwd.stats()["looped"] == 1
    run(main)


def test_reject_self() -> None:
    ours = (Upstream("0.0.0.0", 53), Upstream("127.0.0.1", 5353))
    assert reject_self((Upstream("1.1.1.1"), Upstream("127.0.0.1", 5300)), ours)
    for bad in (Upstream("100.100.100.100"), Upstream("fd7a:115c:a1e0::53"), Upstream("127.0.0.53"),
                Upstream("127.0.0.1", 5353), Upstream("::ffff:127.0.0.1", 5353)):
        with pytest.raises(ForwardingLoopError, match="loop"):
            reject_self((Upstream("1.1.1.1"), bad), ours)


# -- dnsmasq as a real upstream ------------------------------------------------------------------

@pytest.fixture(scope="module")
def dnsmasq() -> Any:
    binary = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    if not shutil.which(binary):
        pytest.skip("dnsmasq is not installed")
    host = "127.0.0.9"
    port = free_port(host=host)
    proc = subprocess.Popen(
        [binary, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
         f"--listen-address={host}", f"--port={port}", "--bind-interfaces", "--pid-file",
         "--user=root", "--cache-size=0", "--address=/example.test/192.0.2.1",
         "--txt-record=txt.example.test,hello"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ready() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            s.sendto(query("probe.example.test"), (host, port))
            return len(s.recv(512)) > 12

    try:
        wait_until(lambda: proc.poll() is None and ready(), what="dnsmasq answering")
        yield Upstream(host, port)
    finally:
        proc.kill()
        proc.wait()


def test_dnsmasq_upstream(dnsmasq: Upstream) -> None:
    async def main() -> None:
        fwd = Forwarder(cache=Cache())
        reply = await fwd.forward(query("Host.Example.Test", edns=True), (dnsmasq,), allow_tailnet_answers=False)
        r = DNSRecord.parse(reply)
        assert addresses(reply) == ["192.0.2.1"] and str(r.q.qname) == "Host.Example.Test."
        reply = await fwd.forward(query("txt.example.test", "TXT"), (dnsmasq,), allow_tailnet_answers=False)
        assert "hello" in str(DNSRecord.parse(reply).rr[0].rdata)
        # dnsmasq has no upstream of its own and refuses: the client gets SERVFAIL, not REFUSED.
        reply = await fwd.forward(query("www.elsewhere.test"), (dnsmasq,), allow_tailnet_answers=False)
        assert DNSRecord.parse(reply).header.rcode == RCODE.SERVFAIL
    run(main)


# -- measurements (printed, not asserted) --------------------------------------------------------

_RESPONDER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.8", 0))
print(s.getsockname()[1], flush=True)
while True:
    data, addr = s.recvfrom(2048)
    if data == b"quit":
        break
    # Echo the query as its own reply: QR set, RA set, NOERROR, no answers (cacheable it is not).
    s.sendto(data[:2] + bytes((data[2] | 0x80, 0x80)) + data[4:], addr)
"""


async def _direct(sock: socket.socket, wire: bytes) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, wire)
    await loop.sock_recv(sock, 2048)


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


async def _measure(target: Upstream, n: int = 2000) -> dict[str, float]:
    """Sequential queries, alternately direct (a connected socket on the same loop) and through
    `Forwarder.forward`; wall-clock and process CPU time of each, plus the cache hit cost."""
    wire = query("www.example.test", edns=True)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect((target.host, target.port))
    fwd = Forwarder(cache=Cache())
    direct: list[float] = []
    forwarded: list[float] = []
    try:
        for _ in range(200):  # warm up both paths
            await _direct(sock, wire)
            await fwd.forward(wire, (target,), allow_tailnet_answers=False)
        cpu_direct = cpu_forward = 0.0
        for _ in range(n):
            c0, t0 = time.process_time(), time.perf_counter()
            await _direct(sock, wire)
            c1, t1 = time.process_time(), time.perf_counter()
            await fwd.forward(wire, (target,), allow_tailnet_answers=False)
            c2, t2 = time.process_time(), time.perf_counter()
            direct.append(t1 - t0)
            forwarded.append(t2 - t1)
            cpu_direct += c1 - c0
            cpu_forward += c2 - c1
    finally:
        sock.close()
    assert fwd.stats()["cache"]["entries"] == 0  # every query went upstream
    # The cache hit path (answer_from_cache), on a cacheable reply inserted by hand.
    cache = Cache()
    reply = DNSRecord.parse(wire).reply()
    reply.add_answer(*RR.fromZone("www.example.test. 300 IN A 192.0.2.10"))
    reply.add_ar(EDNS0(udp_len=1232))
    cache.insert(wire, query_info(wire), bytes(reply.pack()), 0.0)
    cached = Forwarder(cache=cache)
    m = 20000
    t0 = time.perf_counter()
    for i in range(m):
        cached.answer_from_cache(wire, 10.0 + i * 1e-3)
    hit_us = (time.perf_counter() - t0) / m * 1e6
    return {
        "direct_median_us": statistics.median(direct) * 1e6, "direct_p99_us": _pct(direct, 0.99) * 1e6,
        "forward_median_us": statistics.median(forwarded) * 1e6,
        "forward_p99_us": _pct(forwarded, 0.99) * 1e6,
        "overhead_median_us": (statistics.median(forwarded) - statistics.median(direct)) * 1e6,
        "overhead_p99_us": (_pct(forwarded, 0.99) - _pct(direct, 0.99)) * 1e6,
        "cpu_direct_us": cpu_direct / n * 1e6, "cpu_forward_us": cpu_forward / n * 1e6,
        "cache_hit_us": hit_us,
    }


def _report(what: str, figures: dict[str, float], capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print(f"\nforwarding figures, {what} (us): " + ", ".join(f"{k}={v:.1f}" for k, v in figures.items()))


def test_measure_forwarding_overhead(capsys: pytest.CaptureFixture[str]) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _RESPONDER], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = 0
    try:
        port = int(proc.stdout.readline())
        figures = uvloop.run(_measure(Upstream("127.0.0.8", port)))
    finally:
        if port:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"quit", ("127.0.0.8", port))
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    _report("minimal responder", figures, capsys)


def test_measure_forwarding_overhead_dnsmasq(dnsmasq: Upstream, capsys: pytest.CaptureFixture[str]) -> None:
    # dnsmasq answers --address names with TTL 0, so nothing is cached and every query goes upstream.
    _report("dnsmasq", uvloop.run(_measure(dnsmasq)), capsys)


# -- the callback form (Forwarder.start, the server's path) ---------------------------------------

def test_a_failing_listener_costs_its_own_reply_only(caplog: pytest.LogCaptureFixture) -> None:
    """A leader whose listener raises (a closed transport, a bug) does not keep its joiner waiting
    or leak the in-flight count; the error is logged once."""
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", behavior=Behavior.SLOW, delay=0.2) as a:
            fwd = Forwarder()

            def broken(_reply: bytes) -> None:
                raise OSError("transport closed")

            got: list[bytes] = []
            assert fwd.start(query("www.example.test"), (up(a),), allow_tailnet_answers=False, done=broken) is not None
            fwd.start(query("WWW.example.test"), (up(a),), allow_tailnet_answers=False, done=got.append)
            assert fwd.inflight == 2 and fwd.stats()["coalesced"] == 1
            await within_guard(async_wait_until(lambda: got, what="the joiner's reply"))
            assert addresses(got[0]) == ["192.0.2.10"] and len(a.queries) == 1
            assert fwd.inflight == 0 and not fwd._outgoing and not fwd._races

    with caplog.at_level("ERROR", logger="magicdns.forward"):
        run(main)
    assert [r.getMessage() for r in caplog.records] == ["delivering a forwarded reply failed"]


def test_cancelled_leader_answers_its_joiners_at_once_and_asks_nobody_again() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", behavior=Behavior.SILENT) as a:
            fwd = Forwarder(timeout=1000.0)
            leader_got: list[bytes] = []
            joiner_got: list[bytes] = []
            leader = fwd.start(query("www.example.test"), (up(a),), allow_tailnet_answers=False,
                               done=leader_got.append)
            fwd.start(query("www.example.test"), (up(a),), allow_tailnet_answers=False, done=joiner_got.append)
            await async_wait_until(lambda: len(a.queries) == 1, what="the leader's query upstream")
            assert leader is not None
            leader.cancel()
            # Synchronously: the joiner has SERVFAIL, the cancelled leader nothing, all released.
            assert not leader_got and len(joiner_got) == 1
            assert DNSRecord.parse(joiner_got[0]).header.rcode == RCODE.SERVFAIL
            assert fwd.inflight == 0 and not fwd._outgoing and not fwd._races and not fwd._flights
            assert len(a.queries) == 1 and fwd.stats()["timeouts"] == 0
    run(main)
