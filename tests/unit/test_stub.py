"""The stub resolver (stub.py) against test upstreams on loopback: answers, errors, upstreams by name."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from pathlib import Path

import pytest

from magicdns.stub import StubError, StubResolver, resolve_upstreams
from magicdns.upstream import Upstream, UpstreamError, split_host_port
from tests.integration.upstreams import EXAMPLE_ZONE, Behavior, FakeUpstream

pytestmark = pytest.mark.timeout(30)

ZONE = dict(EXAMPLE_ZONE)
ZONE[("dns.example.test", "A")] = ["dns.example.test. 300 IN A 127.0.0.9"]


def test_resolves_both_families_and_literals() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", zone=ZONE) as up:
            async with StubResolver([Upstream(up.host, up.port)], use_hosts_file=False) as stub:
                assert await stub.resolve("www.example.test") == (ipaddress.ip_address("192.0.2.10"),
                                                                  ipaddress.ip_address("2001:db8::10"))
                assert await stub.resolve("www.example.test.", socket.AF_INET) == (
                    ipaddress.ip_address("192.0.2.10"),)
                assert await stub.resolve("192.0.2.1") == (ipaddress.ip_address("192.0.2.1"),)
                assert await stub.resolve("[::1]") == (ipaddress.ip_address("::1"),)
                with pytest.raises(StubError, match="nope.example.test"):
                    await stub.resolve("nope.example.test")
            assert any(b"www" in q for q in up.queries)
    asyncio.run(main())


def test_silent_resolver_is_an_error_within_the_timeout() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2") as up:
            up.behavior = Behavior.SILENT
            async with StubResolver([Upstream(up.host, up.port)], timeout=0.3, tries=1,
                                    use_hosts_file=False) as stub:
                with pytest.raises(StubError):
                    await asyncio.wait_for(stub.resolve("www.example.test"), 5)
    asyncio.run(main())


def test_from_system_reads_the_backup_never_ourselves(tmp_path: Path) -> None:
    backup = tmp_path / "resolv.conf.pre-meshnode"
    backup.write_text("nameserver 192.0.2.53\nnameserver 100.100.100.100\n")
    conf = tmp_path / "resolv.conf"
    conf.write_text(f"# original saved in: {backup}\nnameserver 100.100.100.100\n")
    assert StubResolver.from_system(conf).nameservers == (Upstream("192.0.2.53"),)
    conf.write_text("nameserver 100.100.100.100\n")  # only ourselves, and no backup named
    with pytest.raises(StubError):
        StubResolver.from_system(conf)


def test_upstreams_given_by_name() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", zone=ZONE) as up:
            async with StubResolver([Upstream(up.host, up.port)], use_hosts_file=False) as stub:
                got = await resolve_upstreams(["192.0.2.1", "dns.example.test:5353", "[::1]:53"], stub)
                assert got == (Upstream("192.0.2.1"), Upstream("127.0.0.9", 5353), Upstream("::1"))
                with pytest.raises(StubError):
                    await resolve_upstreams(["nope.example.test"], stub)
    asyncio.run(main())


@pytest.mark.parametrize("bad", ["", "a..b", "dns.example:0", "dns.example:x", "-x:99999", "1.2.3.999", "a b"])
def test_bad_upstream_names(bad: str) -> None:
    with pytest.raises(UpstreamError):
        split_host_port(bad)


def test_hosts_file_wins_like_glibc(tmp_path: Path) -> None:
    from magicdns.stub import hosts_file_addresses

    hosts = tmp_path / "hosts"
    hosts.write_text("# comment\n192.0.2.5 Login.Example.Test login\nfe80::1%eth0 login\nbad line\n")
    assert hosts_file_addresses("login.example.test.", hosts) == (ipaddress.ip_address("192.0.2.5"),)
    assert [str(a) for a in hosts_file_addresses("login", hosts)] == ["192.0.2.5", "fe80::1"]
    assert hosts_file_addresses("nope", tmp_path / "missing") == ()


def test_no_event_thread_watching_resolv_conf() -> None:
    async def main() -> None:
        stub = StubResolver([Upstream("127.0.0.1")])
        channel = stub._channel()
        assert channel._event_thread is False  # sockets on our loop; nothing reloads resolv.conf
        await stub.close()
    asyncio.run(main())


def test_aiohttp_client_resolves_through_the_stub() -> None:
    """An aiohttp request to a name only the stub's resolver knows reaches the right address."""
    import aiohttp
    from aiohttp import web

    from magicdns.stub import AiohttpStubResolver

    zone = dict(ZONE)
    zone[("login.example.test", "A")] = ["login.example.test. 300 IN A 127.0.0.1"]

    async def main() -> None:
        async def hello(_: web.Request) -> web.Response:
            return web.Response(text="control")

        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            async with FakeUpstream.start("127.0.0.2", zone=zone) as up:
                stub = StubResolver([Upstream(up.host, up.port)], use_hosts_file=False)
                connector = aiohttp.TCPConnector(resolver=AiohttpStubResolver(stub))
                async with aiohttp.ClientSession(connector=connector) as http:
                    async with http.get(f"http://login.example.test:{port}/") as resp:
                        assert await resp.text() == "control"
        finally:
            await runner.cleanup()
    asyncio.run(main())


# -- NameCache: the addresses of upstreams given by name (tls://NAME) ------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _a_queries(up: FakeUpstream, name: bytes = b"dot") -> int:
    return sum(1 for q in up.queries if name in q and q[-4:-2] == b"\x00\x01")


def test_name_cache_keeps_addresses_for_their_ttl_and_asks_once_for_many() -> None:
    from magicdns.stub import NameCache

    zone = dict(ZONE)
    zone[("dot.example.test", "A")] = ["dot.example.test. 120 IN A 127.0.0.7"]
    clock = Clock()

    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", zone=zone) as up:
            cache = NameCache(lambda: StubResolver([Upstream(up.host, up.port)], use_hosts_file=False), clock)
            got = await asyncio.gather(*(cache.addresses("dot.example.test") for _ in range(20)))
            assert set(got) == {(ipaddress.ip_address("127.0.0.7"),)}
            assert cache.lookups == 1 and _a_queries(up) == 1  # twenty users, one lookup
            clock.now += 119
            await cache.addresses("DOT.example.test.")
            assert cache.lookups == 1  # within the TTL: from the cache, whatever the spelling
            up.zone = {**zone, ("dot.example.test", "A"): ["dot.example.test. 1 IN A 127.0.0.8"]}
            clock.now += 2
            assert await cache.addresses("dot.example.test") == (ipaddress.ip_address("127.0.0.8"),)
            assert cache.lookups == 2
            clock.now += 5  # a TTL of 1 s is kept MIN_TTL (30 s): no lookup per query
            await cache.addresses("dot.example.test")
            assert cache.lookups == 2
            clock.now += 30
            await cache.addresses("dot.example.test")
            assert cache.lookups == 3
            await cache.close()
    asyncio.run(main())


def test_name_cache_forget_re_resolves_and_keeps_old_addresses_if_the_resolver_fails() -> None:
    from magicdns.stub import NameCache

    zone = dict(ZONE)
    zone[("dot.example.test", "A")] = ["dot.example.test. 300 IN A 127.0.0.7"]
    clock = Clock()

    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", zone=zone) as up:
            cache = NameCache(lambda: StubResolver([Upstream(up.host, up.port)], timeout=0.3, tries=1,
                                                   use_hosts_file=False), clock)
            assert await cache.addresses("dot.example.test") == (ipaddress.ip_address("127.0.0.7"),)
            up.zone = {**zone, ("dot.example.test", "A"): ["dot.example.test. 300 IN A 127.0.0.9"]}
            cache.forget("dot.example.test")  # every address failed: the next use asks again
            assert await cache.addresses("dot.example.test") == (ipaddress.ip_address("127.0.0.9"),)
            assert cache.lookups == 2
            cache.forget("dot.example.test")
            up.behavior = Behavior.SILENT  # the resolver is gone: the old addresses are still tried
            assert await cache.addresses("dot.example.test") == (ipaddress.ip_address("127.0.0.9"),)
            assert cache.lookups == 3
            await cache.addresses("dot.example.test")  # a failed lookup is not repeated per query
            assert cache.lookups == 3
            with pytest.raises(StubError):  # a name never resolved has nothing to fall back on
                await cache.addresses("other.example.test")
            with pytest.raises(StubError):  # and is not asked again for NEGATIVE_TTL
                await cache.addresses("other.example.test")
            assert cache.lookups == 4
            clock.now += NameCache.NEGATIVE_TTL
            up.behavior = Behavior.NORMAL
            with pytest.raises(StubError, match="other.example.test"):  # asked again: NXDOMAIN this time
                await cache.addresses("other.example.test")
            assert cache.lookups == 5
            await cache.close()
    asyncio.run(main())


def test_name_cache_without_resolvers_is_a_clear_error() -> None:
    from magicdns.stub import NameCache

    def none() -> StubResolver:
        raise StubError("no usable nameserver in /etc/resolv.conf (or its backup)")

    async def main() -> None:
        with pytest.raises(StubError, match="no usable nameserver"):
            await NameCache(none).addresses("dot.example.test")
    asyncio.run(main())


@pytest.mark.parametrize("spec,expect", [
    ("tls://dns.quad9.net", Upstream("", 853, "tls", "dns.quad9.net")),
    ("https://cloudflare-dns.com/dns-query", Upstream("", 443, "https", "cloudflare-dns.com", "/dns-query")),
    ("https://dns.example:8443/q", Upstream("", 8443, "https", "dns.example", "/q")),
    ("tls://192.0.2.1", Upstream("192.0.2.1", 853, "tls", "192.0.2.1")),
    ("https://x.example@[2001:db8::1]/dns-query", Upstream("2001:db8::1", 443, "https", "x.example", "/dns-query")),
])
def test_encrypted_upstreams_by_name_parse_and_round_trip(spec: str, expect: Upstream) -> None:
    from magicdns.upstream import parse_upstream

    up = parse_upstream(spec)
    assert up == expect and parse_upstream(up.spec) == up
    assert up.by_name == (not expect.host)


def test_upstreams_by_name_are_kept_by_name_for_the_connection_layer() -> None:
    async def main() -> None:
        got = await resolve_upstreams(["tls://dns.example.test:8853"], StubResolver([Upstream("127.0.0.1")]))
        assert got == (Upstream("", 8853, "tls", "dns.example.test"),)
    asyncio.run(main())
