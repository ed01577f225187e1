"""Fake upstream resolvers for tests: one asyncio UDP + TCP server on a loopback address whose
behaviour the test picks (answer, stay silent, SERVFAIL, truncate, spoof first, answer slowly).

    async with FakeUpstream.start("127.0.0.2", zone=EXAMPLE_ZONE) as up:
        up.behavior = Behavior.SILENT
        ... Upstream(up.host, up.port) ...
        up.queries  # every query received (UDP and TCP), as wire bytes

Answers are built with dnslib from a tiny zone: a dict of (lowercased name, type name) -> list of
record texts in zone-file form. Names present with other types get NODATA, other names NXDOMAIN,
both with an SOA in the authority section. A client's OPT is echoed with its options (as a server
echoing a cookie would), so EDNS pass-through is visible in replies.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import struct
from dataclasses import dataclass, field
from typing import Callable, Mapping

from dnslib import EDNS0, QTYPE, RCODE, RR, DNSRecord

Zone = Mapping[tuple[str, str], list[str]]

EXAMPLE_SOA = "example.test. 300 IN SOA ns.example.test. admin.example.test. 1 3600 600 86400 60"

EXAMPLE_ZONE: dict[tuple[str, str], list[str]] = {
    ("www.example.test", "A"): ["www.example.test. 300 IN A 192.0.2.10"],
    ("www.example.test", "AAAA"): ["www.example.test. 300 IN AAAA 2001:db8::10"],
    ("short.example.test", "A"): ["short.example.test. 5 IN A 192.0.2.11"],
    ("multi.example.test", "A"): ["multi.example.test. 120 IN A 192.0.2.12",
                                  "multi.example.test. 60 IN A 192.0.2.13"],
    ("alias.example.test", "CNAME"): ["alias.example.test. 300 IN CNAME www.example.test."],
    ("rebind.example.test", "A"): ["rebind.example.test. 300 IN A 100.64.1.2",
                                   "rebind.example.test. 300 IN A 192.0.2.20"],
    ("rebind.example.test", "AAAA"): ["rebind.example.test. 300 IN AAAA fd7a:115c:a1e0::2"],
    ("mapped.example.test", "AAAA"): ["mapped.example.test. 300 IN AAAA ::ffff:6464:101",
                                      "mapped.example.test. 300 IN AAAA ::ffff:c000:201"],
    ("onlytail.example.test", "A"): ["onlytail.example.test. 300 IN A 100.100.1.1"],
    ("big.example.test", "TXT"): [f'big.example.test. 300 IN TXT "{"x" * 200} {i}"' for i in range(12)],
    ("nottl.example.test", "A"): ["nottl.example.test. 0 IN A 192.0.2.14"],
}


class Behavior(enum.Enum):
    NORMAL = "normal"
    SILENT = "silent"  # receive, never answer
    SERVFAIL = "servfail"
    REFUSED = "refused"
    TRUNCATE = "truncate"  # UDP: TC set and no records; TCP: the full answer
    SPOOF_ID = "spoof-id"  # a reply with a wrong ID first, then the right one
    SPOOF_QUESTION = "spoof-question"  # a reply for another question first, then the right one
    SLOW = "slow"  # the right answer after `delay` seconds


def build_answer(query: bytes, zone: Zone, soa: str = EXAMPLE_SOA) -> DNSRecord:
    """The authoritative-style answer of `zone` to `query` (dnslib; a test helper, not fast)."""
    request = DNSRecord.parse(query)
    reply = request.reply()
    reply.header.aa = 0
    reply.header.ra = 1
    qname = str(request.q.qname).rstrip(".").lower()
    qtype = QTYPE.get(request.q.qtype)
    texts = zone.get((qname, qtype)) or zone.get((qname, "CNAME"))
    if texts:
        for text in texts:
            reply.add_answer(*RR.fromZone(text))
    else:
        if not any(name == qname for name, _t in zone):
            reply.header.rcode = RCODE.NXDOMAIN
        reply.add_auth(*RR.fromZone(soa))
    for rr in request.ar:
        if rr.rtype == QTYPE.OPT:
            reply.add_ar(EDNS0(udp_len=1232, flags="do" if rr.ttl & 0x8000 else "", opts=list(rr.rdata)))
    return reply


@dataclass
class FakeUpstream:
    """A scriptable upstream on `host`:`port` (UDP and TCP). Use `FakeUpstream.start` as a context."""

    host: str
    port: int
    zone: Zone = field(default_factory=lambda: EXAMPLE_ZONE)
    behavior: Behavior = Behavior.NORMAL
    delay: float = 0.5
    queries: list[bytes] = field(default_factory=list)
    tcp_queries: list[bytes] = field(default_factory=list)
    sources: list[tuple[str, int]] = field(default_factory=list)  # the UDP source of each query
    tcp_silent: bool = False  # accept TCP connections and queries, never answer them
    # Called with each received query and its source (None over TCP); returning bytes (or a list of
    # messages) sends those instead of the usual reply.
    hook: Callable[[bytes, tuple[str, int] | None], bytes | list[bytes] | None] | None = None
    _udp: asyncio.DatagramTransport | None = None
    _tcp: asyncio.base_events.Server | None = None

    @classmethod
    def start(cls, host: str, port: int = 0, **kwargs: object) -> "_Running":
        return _Running(cls(host, port, **kwargs))  # type: ignore[arg-type]

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def answer(self, query: bytes, over_tcp: bool, source: tuple[str, int] | None = None) -> list[bytes]:
        """The datagrams (or TCP messages) to send back for `query`, in order."""
        if self.hook is not None:
            special = self.hook(query, source)
            if special is not None:
                return special if isinstance(special, list) else [special]
        b = self.behavior
        if b is Behavior.SILENT:
            return []
        try:
            reply = build_answer(query, self.zone)
        except Exception:
            return []
        if b in (Behavior.SERVFAIL, Behavior.REFUSED):
            reply.rr = []
            reply.auth = []
            reply.header.rcode = RCODE.SERVFAIL if b is Behavior.SERVFAIL else RCODE.REFUSED
            return [reply.pack()]
        if b is Behavior.TRUNCATE and not over_tcp:
            reply.rr = []
            reply.auth = []
            reply.header.tc = 1
            return [reply.pack()]
        wire = reply.pack()
        if b is Behavior.SPOOF_ID:
            wrong = bytes(((wire[0] ^ 0x5A), wire[1] ^ 0xA5)) + wire[2:]
            return [wrong, wire]
        if b is Behavior.SPOOF_QUESTION:
            other = DNSRecord.parse(wire)
            other.q.qname = "evil.example.test"
            return [other.pack(), wire]
        return [wire]


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, up: FakeUpstream) -> None:
        self.up = up
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.up.queries.append(data)
        self.up.sources.append(addr)
        replies = self.up.answer(data, over_tcp=False, source=addr)
        if not replies:
            return
        if self.up.behavior is Behavior.SLOW:
            loop = asyncio.get_running_loop()
            loop.call_later(self.up.delay, self._send, replies, addr)
        else:
            self._send(replies, addr)

    def _send(self, replies: list[bytes], addr: tuple[str, int]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            for reply in replies:
                self.transport.sendto(reply, addr)


class _Running:
    """Async context manager that starts the UDP and TCP listeners and always stops them."""

    def __init__(self, up: FakeUpstream) -> None:
        self.up = up

    async def __aenter__(self) -> FakeUpstream:
        up = self.up
        loop = asyncio.get_running_loop()
        wanted = up.port
        # With port 0 the kernel picks a free UDP port, which TCP may hold elsewhere (other tests run
        # in parallel): pick again rather than fail.
        for _ in range(1 if wanted else 20):
            transport, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(up),
                                                               local_addr=(up.host, wanted))
            up.port = transport.get_extra_info("sockname")[1]
            try:
                up._tcp = await asyncio.start_server(self._serve_tcp, up.host, up.port)
            except OSError as exc:
                transport.close()
                if wanted or exc.errno != errno.EADDRINUSE:
                    raise
                continue
            except BaseException:
                transport.close()
                raise
            up._udp = transport
            return up
        raise OSError(errno.EADDRINUSE, f"no port on {up.host} free for both UDP and TCP")

    async def __aexit__(self, *exc: object) -> None:
        if self.up._udp is not None:
            self.up._udp.close()
        if self.up._tcp is not None:
            self.up._tcp.close()
            await self.up._tcp.wait_closed()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up = self.up
        try:
            while True:
                (length,) = struct.unpack(">H", await reader.readexactly(2))
                query = await reader.readexactly(length)
                up.tcp_queries.append(query)
                if up.behavior is Behavior.SLOW:
                    await asyncio.sleep(up.delay)  # the behaviour under test, not synchronisation
                if up.tcp_silent:
                    continue
                for reply in up.answer(query, over_tcp=True):
                    writer.write(struct.pack(">H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
