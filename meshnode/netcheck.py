"""Netcheck: what the network between this node and the relays looks like (Tailscale's net/netcheck).

The core (`NetcheckProbe`) is sans-I/O: it makes STUN binding requests for resolved relay servers,
takes the datagrams that come back with the time they arrived, and writes a `NetcheckReport`:
- whether UDP works at all, over IPv4 and over IPv6;
- the global address:port the relays see (the NAT's mapping of our one socket);
- whether that mapping varies by destination (two servers see different ports: an
  endpoint-dependent, "hard" NAT, where hole punching rarely works);
- the latency to each relay region, and the preferred (home) region, with hysteresis: the old home
  stays unless another region is more than a third faster, so the home does not flap;
- the captive-portal result the runner measured through `/generate_204`.

`run_netcheck()` is the thin asyncio runner: it resolves the relay map's servers, sends every
request from ONE UDP socket (the mapping is per socket; a dual-stack socket when IPv6 exists),
retransmits, feeds answers to the core and fetches `/generate_204` from the home region.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
import urllib.parse
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Mapping

from .derp.derpmap import RelayMap
from .stun.message import StunError, new_txid, parse_response, request

HYSTERESIS = 2 / 3          # a new home must have under 2/3 of the old home's latency


@dataclass(frozen=True, slots=True)
class NetcheckReport:
    udp: bool
    ipv4: bool
    ipv6: bool
    global_v4: str | None                    # "IP:PORT"
    global_v6: str | None                    # "[IP]:PORT"
    mapping_varies_by_dest_ip: bool | None   # None: fewer than two IPv4 servers answered
    port_mapping: tuple[str, ...] = ()       # protocols that answered (PCP, NAT-PMP, UPnP): node/netcheckrun.py
    preferred_relay: int | None = None
    relay_latency_ms: Mapping[int, float] = field(default_factory=lambda: MappingProxyType({}))
    captive_portal: bool | None = None
    nat: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"udp": self.udp, "ipv4": self.ipv4, "ipv6": self.ipv6, "global_v4": self.global_v4,
                "global_v6": self.global_v6, "mapping_varies_by_dest_ip": self.mapping_varies_by_dest_ip,
                "port_mapping": list(self.port_mapping), "preferred_relay": self.preferred_relay,
                "relay_latency_ms": {str(k): round(v, 3) for k, v in sorted(self.relay_latency_ms.items())},
                "captive_portal": self.captive_portal, "nat": self.nat}


@dataclass(frozen=True, slots=True)
class Target:
    """One STUN server to ask: a relay server's resolved address."""

    region_id: int
    node_name: str
    ip: str
    port: int


@dataclass(slots=True)
class _Sent:
    target: Target
    txid: bytes
    first_sent: float
    answered_at: float | None = None
    mapped: tuple[str, int] | None = None


def describe_nat(udp: bool, varies: bool | None, global_v4: str | None, local_ips: frozenset[str]) -> str:
    """The NAT situation in words, and what it means for direct connections."""
    if not udp:
        return ("UDP is blocked (no STUN server answered): peers are reached only through the relay, "
                "over HTTPS")
    if global_v4 is None:
        return "IPv6 only: direct connections need peers with IPv6"
    ip = global_v4.rsplit(":", 1)[0]
    if ip in local_ips:
        return "no NAT: this node has a public address; peers can connect to it directly"
    if varies is None:
        return ("behind a NAT of unknown kind (only one STUN server answered): direct connections may "
                "or may not work; the relay is used when they do not")
    if varies:
        return ("behind an endpoint-dependent (\"hard\", symmetric) NAT: the mapping changes with each "
                "destination, so hole punching works only with peers behind easy NATs or with a port "
                "mapping; otherwise traffic goes through the relay")
    return ("behind an endpoint-independent (\"easy\") NAT: the mapping is the same for every "
            "destination, so direct connections through hole punching are expected to work")


class NetcheckProbe:
    """The sans-I/O core of one netcheck run."""

    def __init__(self, targets: list[Target], now: float) -> None:
        self._sent: dict[bytes, _Sent] = {}
        for t in targets:
            txid = new_txid()
            self._sent[txid] = _Sent(t, txid, now)

    def requests(self) -> list[tuple[Target, bytes]]:
        """The datagrams to send (again): every request not yet answered."""
        return [(s.target, request(s.txid)) for s in self._sent.values() if s.answered_at is None]

    @property
    def done(self) -> bool:
        return all(s.answered_at is not None for s in self._sent.values())

    def receive(self, data: bytes, now: float) -> bool:
        """A datagram that arrived on the socket; True if it answered one of our requests."""
        try:
            resp = parse_response(data)
        except StunError:
            return False
        sent = self._sent.get(resp.txid)
        if sent is None or sent.answered_at is not None:
            return False
        sent.answered_at = now
        sent.mapped = (resp.ip, resp.port)
        return True

    def report(self, *, previous_home: int | None = None, captive_portal: bool | None = None,
               local_ips: frozenset[str] = frozenset()) -> NetcheckReport:
        answered = [s for s in self._sent.values() if s.answered_at is not None and s.mapped]
        v4 = [s for s in answered if ipaddress.ip_address(s.target.ip).version == 4]
        v6 = [s for s in answered if ipaddress.ip_address(s.target.ip).version == 6]
        latency: dict[int, float] = {}
        for s in answered:
            ms = (s.answered_at - s.first_sent) * 1000.0  # type: ignore[operator]
            rid = s.target.region_id
            latency[rid] = min(latency.get(rid, ms), ms)
        global_v4 = _hostport(v4[0].mapped) if v4 else None  # type: ignore[arg-type]
        global_v6 = _hostport(v6[0].mapped) if v6 else None  # type: ignore[arg-type]
        varies: bool | None = None
        servers = {(s.target.ip, s.target.port): s.mapped for s in v4}
        if len(servers) >= 2:
            varies = len(set(servers.values())) > 1
        return NetcheckReport(
            udp=bool(answered), ipv4=bool(v4), ipv6=bool(v6), global_v4=global_v4, global_v6=global_v6,
            mapping_varies_by_dest_ip=varies, preferred_relay=preferred_region(latency, previous_home),
            relay_latency_ms=MappingProxyType(latency), captive_portal=captive_portal,
            nat=describe_nat(bool(answered), varies, global_v4, local_ips))


def preferred_region(latency: Mapping[int, float], previous: int | None) -> int | None:
    """The fastest region, except that the previous home stays unless the fastest beats it by a third."""
    if not latency:
        return None
    best = min(latency, key=lambda r: (latency[r], r))
    if previous is not None and previous in latency and previous != best:
        if latency[best] >= latency[previous] * HYSTERESIS:
            return previous
    return best


def _hostport(mapped: tuple[str, int]) -> str:
    ip, port = mapped
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


# --- the asyncio runner -------------------------------------------------------------------------------


async def resolve_targets(relay_map: RelayMap, control_url: str = "") -> list[Target]:
    """STUN targets of every relay server (fixed IPs first, else DNS; servers without STUN skipped)."""
    loop = asyncio.get_running_loop()
    out: list[Target] = []
    control_host = urllib.parse.urlsplit(control_url).hostname or ""
    for region in relay_map.regions:
        for node in region.nodes:
            if node.stun_port < 0:
                continue
            ips = [ip for ip in (node.ipv4, node.ipv6) if ip]
            if not ips:
                host = node.host or control_host
                if not host:
                    continue
                try:
                    infos = await loop.getaddrinfo(host, node.stun_port, type=socket.SOCK_DGRAM)
                except socket.gaierror:
                    continue
                ips = list(dict.fromkeys(str(i[4][0]) for i in infos))
            out += [Target(region.region_id, node.name, ip, node.stun_port) for ip in ips]
    return out


class _Socket(asyncio.DatagramProtocol):
    def __init__(self, probe: NetcheckProbe, wake: asyncio.Event) -> None:
        self.probe, self.wake = probe, wake

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.probe.receive(data, time.monotonic()) and self.probe.done:
            self.wake.set()


def _open_socket() -> tuple[socket.socket, bool]:
    """One UDP socket for every probe: dual stack when the host has IPv6."""
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
        return s, True
    except OSError:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", 0))
        return s, False


async def captive_portal_check(url: str, timeout: float = 2.0) -> bool | None:
    """GET <relay>/generate_204 with a challenge: a portal answers something else. None: no answer."""
    import aiohttp
    challenge = "ts_" + new_txid().hex()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
            async with http.get(url, headers={"X-Tailscale-Challenge": challenge}, allow_redirects=False) as resp:
                return not (resp.status == 204 and resp.headers.get("X-Tailscale-Response") == "response " + challenge)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return None


async def run_netcheck(relay_map: RelayMap, *, control_url: str = "", timeout: float = 2.0,
                       previous_home: int | None = None, check_captive_portal: bool = True,
                       local_ips: frozenset[str] = frozenset()) -> NetcheckReport:
    """Probe every relay server's STUN port from one socket; bounded by `timeout` (plus the portal check)."""
    targets = await resolve_targets(relay_map, control_url)
    probe = NetcheckProbe(targets, time.monotonic())
    wake = asyncio.Event()
    sock, dual = _open_socket()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: _Socket(probe, wake), sock=sock)
    try:
        deadline = time.monotonic() + timeout
        for attempt in range(3):
            for target, data in probe.requests():
                ip = target.ip
                if dual and ":" not in ip:
                    ip = "::ffff:" + ip
                elif not dual and ":" in ip:
                    continue
                try:
                    transport.sendto(data, (ip, target.port))
                except OSError:
                    pass
            left = deadline - time.monotonic()
            if probe.done or left <= 0:
                break
            try:
                await asyncio.wait_for(wake.wait(), left / (3 - attempt))
            except asyncio.TimeoutError:
                pass
            if probe.done:
                break
    finally:
        transport.close()
    report = probe.report(previous_home=previous_home, local_ips=local_ips)
    if check_captive_portal and report.preferred_relay is not None:
        region = relay_map.region(report.preferred_relay)
        if region is not None:
            url = region.nodes[0].url(control_url).rsplit("/derp", 1)[0] + "/generate_204"
            report = replace(report, captive_portal=await captive_portal_check(url))
    return report
