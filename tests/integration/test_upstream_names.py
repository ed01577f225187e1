"""Encrypted upstreams by name (`tls://NAME`, `https://NAME/dns-query`): NAME's addresses come from
a stub resolver (the system's original ones, or `--bootstrap-dns`), never from ourselves; they are
kept for their TTL and looked up again when every address fails.

The upstream is a real `magicdns serve --dot/--doh` with a test CA on 127.0.0.1; the stub's resolver
is a FakeUpstream on 127.0.0.2 whose zone the test rewrites (no real name is ever asked for).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import dns.message
import dns.query
import pytest

from magicdns.stub import NameCache, StubResolver
from magicdns.upstream import Upstream, parse_upstream
from magicdns.upstream_tls import EncryptedUpstreamError, EncryptedUpstreams
from tests.integration.magicdns_proc import MagicDnsProcess, run_cli, start_magicdns
from tests.integration.tls_helpers import make_ca, make_leaf, write_pair
from tests.integration.upstreams import EXAMPLE_ZONE, FakeUpstream
from tests.support import free_port

pytestmark = pytest.mark.timeout(60)

NAME = "dot.example.test"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca("names CA")
    cert, key = write_pair(d, make_leaf(ca, (NAME,), ()))
    return {"ca_file": ca.write(d / "ca.pem"), "cert": cert, "key": key}


@pytest.fixture(scope="module")
def upstream(pki: dict, tmp_path_factory: pytest.TempPathFactory):
    """A DoT and DoH server for NAME on 127.0.0.1 that answers www.upstream.test."""
    view = tmp_path_factory.mktemp("up") / "view.json"
    view.write_text(json.dumps({"domain": "upstream.test", "self": {"name": "ns", "addresses": ["100.64.9.1"]},
                                "peers": [], "version": 1, "dns": {"records": [
                                    {"name": "www.upstream.test", "type": "A", "value": "192.0.2.10", "ttl": 120}]}}))
    s = start_magicdns("--dot", "127.0.0.1:0", "--doh", "127.0.0.1:0", "--tls-cert", str(pki["cert"]),
                       "--tls-key", str(pki["key"]), view=str(view), db=False, probe="www.upstream.test")
    out = run_cli("status", "--control-socket", s.control_socket, "--json")
    for item in json.loads(out.stdout)["encrypted"]["listeners"]:
        kind, addr = item.split()
        s.extra[kind] = int(addr.rsplit(":", 1)[1])
    yield s
    s.stop()


def zone_with(address: str, ttl: int = 300) -> dict:
    z = dict(EXAMPLE_ZONE)
    z[(NAME, "A")] = [f"{NAME}. {ttl} IN A {address}"]
    return z


def name_queries(fake: FakeUpstream) -> int:
    return sum(1 for q in fake.queries if b"\x03dot\x07example" in q and q[-4:-2] == b"\x00\x01")


@pytest.mark.parametrize("kind", ["tls", "https"])
def test_a_name_is_resolved_by_the_stub_and_re_resolved_when_its_address_fails(
        upstream: MagicDnsProcess, pki: dict, kind: str) -> None:
    port = upstream.extra["dot" if kind == "tls" else "doh"]
    up = parse_upstream(f"tls://{NAME}:{port}" if kind == "tls" else f"https://{NAME}:{port}/dns-query")
    assert up.by_name
    query = dns.message.make_query("www.upstream.test", "A").to_wire()

    async def main() -> None:
        # First the name points at an address where nothing listens (127.0.0.3: the server is bound
        # to 127.0.0.1 only): the connection is refused, the query fails, the name is forgotten.
        async with FakeUpstream.start("127.0.0.2", zone=zone_with("127.0.0.3")) as fake:
            names = NameCache(lambda: StubResolver([Upstream(fake.host, fake.port)], use_hosts_file=False))
            ups = EncryptedUpstreams([str(pki["ca_file"])], names=names)
            try:
                with pytest.raises(EncryptedUpstreamError):
                    await ups.query(up, query)
                assert name_queries(fake) == 1
                fake.zone = zone_with("127.0.0.1")  # the operator moved the name
                reply = dns.message.from_wire(await ups.query(up, query))
                assert "192.0.2.10" in reply.to_text()
                assert name_queries(fake) == 2  # asked again because every address had failed
                for _ in range(5):  # then one kept connection, and the cached address for new ones
                    await ups.query(up, query)
                assert name_queries(fake) == 2 and ups.connects == 1
            finally:
                await ups.close()
    asyncio.run(main())


def test_a_name_that_resolves_to_ourselves_is_never_used(pki: dict) -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", zone=zone_with("100.100.100.100")) as fake:
            names = NameCache(lambda: StubResolver([Upstream(fake.host, fake.port)], use_hosts_file=False))
            ups = EncryptedUpstreams([str(pki["ca_file"])], names=names)
            try:
                with pytest.raises(EncryptedUpstreamError, match="no address but ourselves"):
                    await ups.query(parse_upstream(f"tls://{NAME}"), dns.message.make_query("a.test", "A").to_wire())
            finally:
                await ups.close()
    asyncio.run(main())


def test_a_name_the_stub_cannot_resolve_fails_the_query_with_the_reason(pki: dict) -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", zone=dict(EXAMPLE_ZONE)) as fake:
            names = NameCache(lambda: StubResolver([Upstream(fake.host, fake.port)], use_hosts_file=False))
            ups = EncryptedUpstreams([str(pki["ca_file"])], names=names)
            try:
                with pytest.raises(EncryptedUpstreamError, match=f"cannot resolve {NAME}"):
                    await ups.query(parse_upstream(f"tls://{NAME}"), dns.message.make_query("a.test", "A").to_wire())
            finally:
                await ups.close()
    asyncio.run(main())


@pytest.mark.parametrize("kind", ["tls", "https"])
def test_serve_with_an_upstream_by_name_and_bootstrap_dns(upstream: MagicDnsProcess, pki: dict, kind: str,
                                                          tmp_path: Path) -> None:
    """`magicdns serve --upstream tls://NAME:PORT --bootstrap-dns IP:PORT`: forwarded answers, with
    NAME resolved by the bootstrap resolver (a second magicdns that knows NAME), not by itself."""
    view = tmp_path / "boot.json"
    view.write_text(json.dumps({"domain": "example.test", "self": {"name": "boot", "addresses": ["100.64.9.1"]},
                                "peers": [], "version": 1,
                                "dns": {"records": [{"name": NAME, "type": "A", "value": "127.0.0.1"}]}}))
    boot = start_magicdns(view=str(view), db=False, probe=NAME)
    port = upstream.extra["dot" if kind == "tls" else "doh"]
    spec = f"tls://{NAME}:{port}" if kind == "tls" else f"https://{NAME}:{port}/dns-query"
    view2 = tmp_path / "front.json"  # a tailnet of its own, so my-server.tailnet is forwarded
    view2.write_text(json.dumps({"domain": "front.test", "self": {"name": "f", "addresses": ["100.64.9.2"]},
                                 "peers": [], "version": 1}))
    server = start_magicdns("--upstream", spec, "--bootstrap-dns", f"127.0.0.1:{boot.port}",
                            "--upstream-ca", str(pki["ca_file"]), view=str(view2), db=False, probe=None)
    try:
        q = dns.message.make_query("www.upstream.test", "A")
        r = dns.query.udp(q, "127.0.0.1", port=server.port, timeout=6)
        assert "192.0.2.10" in r.to_text(), r.to_text() + server.log()[-2000:]
        st = json.loads(run_cli("status", "--control-socket", server.control_socket, "--json").stdout)
        assert spec in json.dumps(st["forwarder"]["upstreams"])  # health under the name the operator wrote
        names = st["forwarder"]["encrypted_upstreams"]["names"]
        assert names["names"][NAME]["addresses"] == ["127.0.0.1"] and names["lookups"] == 1
        text = run_cli("status", "--control-socket", server.control_socket).stdout
        assert f"upstream name {NAME}: 127.0.0.1" in text, text
    finally:
        server.stop()
        boot.stop()


def test_bootstrap_dns_must_be_a_plain_address(tmp_path: Path) -> None:
    out = run_cli("serve", "--listen", f"127.0.0.1:{free_port()}", "--bootstrap-dns", "tls://x.test",
                  "--control-socket", str(tmp_path / "s"), "--resolv-conf", str(tmp_path / "none"))
    assert out.returncode == 2 and "--bootstrap-dns" in out.stderr, out.stderr


def test_an_address_that_hangs_is_tried_last_next_time(upstream: MagicDnsProcess, pki: dict) -> None:
    """NAME has two addresses and the first hangs (accepts TCP, never speaks TLS): the race gives
    up while it is still connecting, and the next query goes to the other address first, rather
    than spending every race on the dead one."""
    import socket

    port = upstream.extra["dot"]
    hang = socket.socket()
    hang.bind(("127.0.0.3", port))  # same port, another loopback address
    hang.listen(8)
    zone = dict(EXAMPLE_ZONE)
    zone[(NAME, "A")] = [f"{NAME}. 300 IN A 127.0.0.3", f"{NAME}. 300 IN A 127.0.0.1"]
    query = dns.message.make_query("www.upstream.test", "A").to_wire()
    up = parse_upstream(f"tls://{NAME}:{port}")

    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2", zone=zone) as fake:
            names = NameCache(lambda: StubResolver([Upstream(fake.host, fake.port)], use_hosts_file=False))
            ups = EncryptedUpstreams([str(pki["ca_file"])], names=names)
            try:
                with pytest.raises(asyncio.TimeoutError):  # the forwarder's race deadline, in short
                    await asyncio.wait_for(ups.query(up, query), 1.0)
                reply = await asyncio.wait_for(ups.query(up, query), 2.0)  # < CONNECT_TIMEOUT (3 s)
                assert "192.0.2.10" in dns.message.from_wire(reply).to_text()
                assert names.lookups == 1  # the same addresses, in a better order: no new lookup
            finally:
                await ups.close()
    try:
        asyncio.run(main())
    finally:
        hang.close()
