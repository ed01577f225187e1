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
