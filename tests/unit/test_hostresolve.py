"""hostresolve.HostResolver: a control URL by host name through a given (original) resolver, every
address of the name tried, the one that answered kept; /etc/hosts when no original resolver exists.

Two real control servers of one tailnet (one SQLite file) listen on 127.0.0.3 and 127.0.0.4 at the
same port; a test DNS server on loopback gives login.example.test both addresses."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import pytest

from magicdns.stub import StubError, StubResolver
from magicdns.upstream import Upstream
from meshnode.control.client import ControlClient, generate_private_key
from meshnode.control.server import ControlServer, ServerConfig
from meshnode.control.store import ControlStore
from meshnode.hostresolve import HostResolver
from tests.integration.upstreams import EXAMPLE_ZONE, FakeUpstream

pytestmark = pytest.mark.timeout(60)

ZONE = dict(EXAMPLE_ZONE)
ZONE[("login.example.test", "A")] = ["login.example.test. 300 IN A 127.0.0.3",
                                     "login.example.test. 300 IN A 127.0.0.4"]


def test_control_client_keeps_to_the_address_that_answers(tmp_path: Path) -> None:
    async def main() -> None:
        servers = [ControlServer(ControlStore(tmp_path / "control.db"), ServerConfig())]
        port = await servers[0].start("127.0.0.3", 0)
        servers.append(ControlServer(ControlStore(tmp_path / "control.db"), ServerConfig()))
        await servers[1].start("127.0.0.4", port)
        async with FakeUpstream.start("127.0.0.2", zone=ZONE) as up:
            resolver = HostResolver(lambda: StubResolver([Upstream(up.host, up.port)], use_hosts_file=False))
            assert await resolver.addresses("login.example.test") == [ipaddress.ip_address("127.0.0.3"),
                                                                       ipaddress.ip_address("127.0.0.4")]
            client = ControlClient(f"http://login.example.test:{port}", generate_private_key(),
                                   generate_private_key(), resolver=resolver, timeout=5)
            try:
                key = await client.fetch_server_key()
                assert resolver.preferred("login.example.test") == ipaddress.ip_address("127.0.0.3")
                await servers[0].stop()       # the first address stops answering: the next one does
                assert await client.fetch_server_key() == key
                assert resolver.preferred("login.example.test") == ipaddress.ip_address("127.0.0.4")
                # The first comes back: the client stays where it is (no flapping back).
                servers[0] = ControlServer(ControlStore(tmp_path / "control.db"), ServerConfig())
                await servers[0].start("127.0.0.3", port)
                assert (await resolver.addresses("login.example.test"))[0] == ipaddress.ip_address("127.0.0.4")
                await client.close()
                await client.fetch_server_key()
                assert resolver.preferred("login.example.test") == ipaddress.ip_address("127.0.0.4")
            finally:
                await client.close()
            assert sum(b"login" in q for q in up.queries) >= 3   # asked every time: no stale cache
            # What an exit node keeps outside the tunnel: every address of every control URL.
            many = ControlClient(f"http://login.example.test:{port},http://nope.example.test,https://[fd00::1]",
                                 generate_private_key(), generate_private_key(), resolver=resolver)
            assert await many.server_addresses() == ("127.0.0.4", "127.0.0.3", "fd00::1")
        for s in servers:
            await s.stop()
    asyncio.run(main())


def test_no_original_resolver_leaves_hosts_and_literals(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.5 login.example.test\n")

    def none() -> StubResolver:
        raise StubError("no usable nameserver in /etc/resolv.conf (or its backup)")

    async def main() -> None:
        r = HostResolver(none, hosts_file=str(hosts))
        assert await r.addresses("login.example.test") == [ipaddress.ip_address("127.0.0.5")]
        assert await r.addresses("[::1]") == [ipaddress.ip_address("::1")]
        with pytest.raises(StubError, match="cannot resolve other.example.test: no usable nameserver"):
            await r.addresses("other.example.test")
    asyncio.run(main())
