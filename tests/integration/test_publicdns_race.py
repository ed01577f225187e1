"""The opt-in DoH upgrade of public resolvers, raced against plain DNS, with loopback stand-ins.

The address table is injected: 127.0.0.1 plays a public resolver whose DoH endpoint is a real
`magicdns serve --doh` (test CA) and whose plain DNS is a FakeUpstream on another port; the two
answer the same name with different addresses, so each reply says which leg it came from. Nothing
is ever sent to a real public resolver.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket

import dns.message
import dns.rcode
import pytest

from magicdns.forward import Forwarder
from magicdns.publicdns import upgrade
from magicdns.upstream import Upstream
from magicdns.upstream_tls import EncryptedUpstreams
from tests.integration.magicdns_proc import MagicDnsProcess, run_cli, start_magicdns
from tests.integration.tls_helpers import make_ca, make_leaf, write_pair
from tests.integration.upstreams import EXAMPLE_ZONE, Behavior, FakeUpstream

pytestmark = pytest.mark.timeout(60)

NAME = "public.test"
QNAME = "www.upstream.test"
DOH_ANSWER = "192.0.2.10"
PLAIN_ANSWER = "192.0.2.99"
LOOPBACK = ipaddress.ip_address("127.0.0.1")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca("public CA")
    cert, key = write_pair(d, make_leaf(ca, (NAME,), ()))
    return {"ca_file": ca.write(d / "ca.pem"), "cert": cert, "key": key}


@pytest.fixture(scope="module")
def doh(pki: dict, tmp_path_factory: pytest.TempPathFactory):
    view = tmp_path_factory.mktemp("doh") / "view.json"
    view.write_text(json.dumps({"domain": "upstream.test", "self": {"name": "ns", "addresses": ["100.64.9.1"]},
                                "peers": [], "version": 1, "dns": {"records": [
                                    {"name": QNAME, "type": "A", "value": DOH_ANSWER, "ttl": 120}]}}))
    s = start_magicdns("--doh", "127.0.0.1:0", "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]),
                       view=str(view), db=False, probe=QNAME)
    out = run_cli("status", "--control-socket", s.control_socket, "--json")
    s.extra["doh"] = int(json.loads(out.stdout)["encrypted"]["listeners"][0].rsplit(":", 1)[1])
    yield s
    s.stop()


def plain_zone() -> dict:
    z = dict(EXAMPLE_ZONE)
    z[(QNAME, "A")] = [f"{QNAME}. 60 IN A {PLAIN_ANSWER}"]
    return z


def silent_tcp_port() -> tuple[socket.socket, int]:
    """A listener that accepts and never speaks: a DoH endpoint that hangs in the handshake."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s, s.getsockname()[1]


def refused_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused at once
    return port


async def ask(pki: dict, doh_port: int, plain: FakeUpstream, head_start: float,
              timeout: float = 2.5) -> tuple[dns.message.Message, EncryptedUpstreams]:
    table = {LOOPBACK: f"https://{NAME}:{doh_port}/dns-query"}
    ups = upgrade((Upstream("127.0.0.1", plain.port),), table)
    assert ups[0].scheme == "https" and ups[0].plain_behind == plain.port
    fwd = Forwarder(timeout=timeout)
    fwd.encrypted = enc = EncryptedUpstreams([str(pki["ca_file"])])
    enc.head_start = head_start
    try:
        q = dns.message.make_query(QNAME, "A")
        reply = await fwd.forward(q.to_wire(), ups, allow_tailnet_answers=False)
        msg = dns.message.from_wire(reply)
        assert msg.id == q.id
        return msg, enc
    finally:
        await fwd.close()


def test_doh_answers_and_plain_dns_is_never_sent(doh: MagicDnsProcess, pki: dict) -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.1", zone=plain_zone()) as plain:
            msg, enc = await ask(pki, doh.extra["doh"], plain, head_start=2.0)
            assert DOH_ANSWER in msg.to_text() and PLAIN_ANSWER not in msg.to_text()
            assert enc.upgraded_doh_answers == 1 and enc.upgraded_plain_answers == 0
            assert plain.queries == []  # DoH answered within its head start: nothing left in clear text
    asyncio.run(main())


def test_plain_dns_starts_at_once_when_doh_fails(pki: dict) -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.1", zone=plain_zone()) as plain:
            # A head start longer than the forward timeout: only DoH's failure can start plain DNS in time.
            msg, enc = await ask(pki, refused_port(), plain, head_start=30.0)
            assert PLAIN_ANSWER in msg.to_text()
            assert enc.upgraded_plain_answers == 1 and len(plain.queries) == 1
    asyncio.run(main())


def test_plain_dns_starts_after_the_head_start_when_doh_hangs(pki: dict) -> None:
    listener, port = silent_tcp_port()
    try:
        async def main() -> None:
            async with FakeUpstream.start("127.0.0.1", zone=plain_zone()) as plain:
                msg, enc = await ask(pki, port, plain, head_start=0.2)
                assert PLAIN_ANSWER in msg.to_text() and enc.upgraded_plain_answers == 1
        asyncio.run(main())
    finally:
        listener.close()


def test_both_legs_failing_is_servfail_within_the_bound(pki: dict) -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.1", zone=plain_zone()) as plain:
            plain.behavior = Behavior.SILENT
            msg, enc = await ask(pki, refused_port(), plain, head_start=0.1, timeout=1.0)
            assert msg.rcode() == dns.rcode.SERVFAIL
            assert len(plain.queries) == 1  # plain DNS was tried once DoH failed
    asyncio.run(main())


def test_a_spoofed_plain_reply_is_ignored(pki: dict) -> None:
    """The plain leg uses an ID of its own and checks the question: a reply with another ID is
    dropped and the real one taken."""
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.1", zone=plain_zone()) as plain:
            plain.behavior = Behavior.SPOOF_ID  # a wrong-ID datagram first, then the right one
            msg, enc = await ask(pki, refused_port(), plain, head_start=30.0)
            assert PLAIN_ANSWER in msg.to_text() and enc.upgraded_plain_answers == 1
    asyncio.run(main())


def test_serve_upgrade_public_dns_shows_upgraded_routes_without_querying(tmp_path) -> None:  # noqa: ANN001
    """`magicdns serve --upgrade-public-dns`: status shows the public upstream as DoH with plain DNS
    behind, others unchanged. No query is sent (these are real public addresses)."""
    for flag, want in (("--upgrade-public-dns", "https://dns.google@8.8.8.8/dns-query (upgraded"),
                       ("--no-upgrade-public-dns", "8.8.8.8")):
        s = start_magicdns("--upstream", "8.8.8.8", "--upstream", "192.0.2.1", flag, db=False, probe=None)
        try:
            st = json.loads(run_cli("status", "--control-socket", s.control_socket, "--json").stdout)
            assert st["routes"]["."][0].startswith(want) and st["routes"]["."][1] == "192.0.2.1", st["routes"]
            assert st["queries"]["forwarded"] == 0
        finally:
            s.stop()
