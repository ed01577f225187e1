"""The asyncio DNS server: UDP and TCP listeners around the answer engine and the forwarder.

The listeners are thin: check the client, hand the bytes to the engine, write what comes back.
A new view is a new `Engine` swapped in with one assignment, so a query sees one snapshot whole.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import ipaddress
import logging
import resource
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from dnslib import QTYPE, DNSRecord

from .cache import Cache, QueryInfo
from .chase import chase_reply, complete_chain
from .dispatch import Dispatch, LateReply, ListenerLimits, ReplyTo, bound, per_client_share
from .encrypted import EncryptedConfig, EncryptedListenError, EncryptedListeners
from .engine import Chase, Engine, Forward
from .forward import EDE_OTHER, Forwarder, error_reply, read_query, servfail_reply
from .message import Rcode, header_only_reply, truncate
from .querylog import QueryLog
from .ranges import TAILNET_RANGES
from .tcp import TcpConnection, TcpSlots
from .udp import UdpListener
from .udpbatch import BatchUdpListener
from .upstream import Upstream
from .view import DnsView
from .zone import RESOLVER_V4, RESOLVER_V6, LocalZone, Zone

log = logging.getLogger(__name__)
_monotonic = time.monotonic

# Loopback and the tailnet ranges (ranges.py): the clients a MagicDNS resolver serves.
DEFAULT_ALLOW = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"), *TAILNET_RANGES)


class ServerError(RuntimeError):
    """The server cannot start (a port in use, a bad address); the message says which."""


class _TcpPortTaken(Exception):
    """UDP got the port but TCP could not: with port 0 the caller tries another."""


def raise_fd_limit() -> None:
    """Lift the soft open-files limit to the hard one: every forwarding attempt holds a socket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass(frozen=True)
class ServerConfig:
    """How the server listens and whom it answers."""

    listen: tuple[tuple[str, int], ...] = (("127.0.0.1", 53),)
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = DEFAULT_ALLOW
    fallback_upstreams: tuple[Upstream, ...] = ()
    resolver_addresses: tuple[str, ...] = (str(RESOLVER_V4), str(RESOLVER_V6))
    tcp_idle_timeout: float = 10.0  # a complete message must arrive within this
    max_tcp_connections: int = 512
    max_tcp_per_client: int | None = None  # None: max(4, max_tcp_connections / 8)
    max_tcp_pipeline: int = 64
    tcp_write_high_water: int = 64 * 1024  # replies buffered for a non-reading client, then it is not read
    forward_timeout: float = 2.5
    forward_stagger: float = 0.15
    max_inflight: int = 2048
    # New upstream queries a second (token bucket, burst of one second's worth; 0: no limit): an
    # operator's fixed cap. Without it, forwards are still shed when the listener falls behind.
    max_forward_qps: int = 0
    cache_entries: int = 20_000
    cache_bytes: int = 32 * 1024 * 1024
    query_log: str | None = None
    reuse_port: bool = False
    batch_udp: bool = True  # recvmmsg/sendmmsg listener where the platform has it (udpbatch.py)
    extra: dict[str, Any] = field(default_factory=dict)
    encrypted: EncryptedConfig = EncryptedConfig()  # DoT/DoH listeners and their certificate (encrypted.py)
    upstream_ca: tuple[str, ...] = ()  # CA files trusted for tls:// and https:// upstreams, besides the system's
    # Who resolves the names in tls://NAME and https://NAME/ upstreams (stub.NameCache): these
    # resolvers, else the original ones of this resolv.conf (its backup once a node replaced it).
    bootstrap_dns: tuple[Upstream, ...] = ()
    resolv_conf: str = "/etc/resolv.conf"
    # Plain upstreams that are well-known public resolvers go over their DoH endpoint (publicdns.py).
    upgrade_public_dns: bool = False


class DnsServer:
    """One resolver instance: listeners, the current engine, the forwarder."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.view: DnsView | None = None
        self.forwarder = Forwarder(
            cache=Cache(max_entries=config.cache_entries, max_bytes=config.cache_bytes),
            timeout=config.forward_timeout, stagger=config.forward_stagger,
            max_inflight=config.max_inflight)
        self.qlog = QueryLog.open(config.query_log) if config.query_log else None
        limits = ListenerLimits(
            idle_timeout=config.tcp_idle_timeout, max_connections=config.max_tcp_connections,
            max_per_client=(config.max_tcp_per_client if config.max_tcp_per_client is not None
                            else per_client_share(config.max_tcp_connections)),
            max_pipeline=config.max_tcp_pipeline, write_high_water=config.tcp_write_high_water)
        self.dispatch = Dispatch(config.allow, self.forward_or_reply, limits, self.qlog)
        self.counters = self.dispatch.counters
        self._transports: list[asyncio.BaseTransport] = []
        self._batch: list[BatchUdpListener] = []
        self._servers: list[asyncio.base_events.Server] = []
        self._stopping = False
        self._tcp = TcpSlots(limits)
        self.encrypted = EncryptedListeners(self.dispatch, limits, config.encrypted)
        # Encrypted upstreams: TLS contexts made on first use; names (tls://NAME) asked of the
        # bootstrap resolvers or the system's original ones, never of ourselves.
        from .stub import NameCache, StubResolver
        from .upstream_tls import EncryptedUpstreams

        def make_stub() -> StubResolver:
            if config.bootstrap_dns:
                return StubResolver(config.bootstrap_dns)
            return StubResolver.from_system(config.resolv_conf, own_addresses=tuple(
                Upstream(h, p) for h, p in config.listen))
        self.forwarder.encrypted = EncryptedUpstreams(config.upstream_ca, names=NameCache(make_stub))
        self._forward_budget = TokenBucket(config.max_forward_qps)
        self.bound: list[tuple[str, int]] = []
        self.started_at = time.time()

    @property
    def engine(self) -> Engine | None:
        """The answer engine of the current snapshot."""
        return self.dispatch.engine

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, view: DnsView) -> None:
        """Build the first snapshot and bind every listener (UDP and TCP on each address)."""
        raise_fd_limit()
        self.set_view(view)
        loop = asyncio.get_running_loop()
        try:
            for host, port in self.config.listen:
                port = await self._bind(loop, host, port)
                self.bound.append((host, port))
            await self.encrypted.start()
        except EncryptedListenError as exc:
            await self.stop()
            raise ServerError(str(exc)) from None
        except BaseException:
            await self.stop()
            raise
        log.info("listening on %s", ", ".join(_fmt(h, p) for h, p in self.bound))

    async def _bind(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> int:
        """Bind UDP and TCP on one address; with port 0, retry until one port is free for both."""
        for attempt in range(20):
            try:
                return await self._bind_once(loop, host, port)
            except _TcpPortTaken:
                if port != 0 and attempt == 0:
                    raise ServerError(f"cannot listen on {_fmt(host, port)} (TCP): address in use") from None
        raise ServerError(f"cannot find a port free for both UDP and TCP on {host}")

    async def _bind_once(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> int:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        udp = socket.socket(family, socket.SOCK_DGRAM)
        try:
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.config.reuse_port:
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            if family == socket.AF_INET6:
                udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            udp.bind((host, port))
        except OSError as exc:
            udp.close()
            raise ServerError(f"cannot listen on {_fmt(host, port)} (UDP): {exc.strerror}") from None
        bound = udp.getsockname()[1]
        try:
            server = await loop.create_server(lambda: TcpConnection(self.dispatch, self._tcp), host=host, port=bound,
                                              family=family, reuse_address=True,
                                              reuse_port=self.config.reuse_port or None, backlog=1024)
        except OSError as exc:
            udp.close()
            if exc.errno == errno.EADDRINUSE:
                raise _TcpPortTaken() from None  # the kernel's free UDP port is busy for TCP
            raise ServerError(f"cannot listen on {_fmt(host, bound)} (TCP): {exc.strerror}") from None
        if self.config.batch_udp and BatchUdpListener.supported():
            udp.setblocking(False)
            listener = BatchUdpListener(self.dispatch, udp)
            listener.start(loop)
            self._batch.append(listener)
        else:
            transport, _ = await loop.create_datagram_endpoint(lambda: UdpListener(self.dispatch), sock=udp)
            self._transports.append(transport)
        self._servers.append(server)
        return bound

    async def stop(self) -> None:
        """Close listeners and connections and finish forwarding tasks."""
        for t in self._transports:
            t.close()
        for b in self._batch:
            b.close()
        for s in self._servers:
            s.close()
        for conn in list(self._tcp.conns):
            conn.transport.abort()
        await self.encrypted.stop()
        self._stopping = True  # queries still in flight end below, unanswered: their listeners are closed
        await self.forwarder.close()
        for s in self._servers:
            await s.wait_closed()
        self._transports.clear()
        self._batch.clear()
        self._servers.clear()
        if self.qlog:
            self.qlog.close()

    def set_view(self, view: DnsView) -> None:
        """Swap in a new snapshot: one assignment, so no query sees half of two views."""
        self._install(Zone(*self._zone_args(view)), view)

    async def set_view_async(self, view: DnsView) -> None:
        """`set_view`, building the snapshot in a thread so large views do not stall the listeners."""
        loop = asyncio.get_running_loop()
        zone = await loop.run_in_executor(None, Zone, *self._zone_args(view))
        self._install(zone, view)

    def _zone_args(self, view: DnsView) -> tuple[DnsView, tuple[Upstream, ...], tuple[str, ...]]:
        """The view and fallback the zone is built from: with the public-DNS upgrade on (here or in
        the view's DNS settings), well-known public resolvers become DoH with plain DNS behind."""
        fallback = self.config.fallback_upstreams
        if self.config.upgrade_public_dns or view.dns.upgrade_public_dns:
            from . import publicdns
            table = self.config.extra.get("publicdns_table", publicdns.KNOWN_DOH)  # tests: loopback stand-ins
            dns = dataclasses.replace(view.dns, nameservers=publicdns.upgrade(view.dns.nameservers, table),
                                      routes=publicdns.upgrade_routes(view.dns.routes, table))
            view = dataclasses.replace(view, dns=dns)
            fallback = publicdns.upgrade(fallback, table)
        return view, fallback, self.config.resolver_addresses

    def _install(self, zone: Zone, view: DnsView) -> None:
        old = self.engine
        if old is not None:
            self.counters.engine_fast += old.fast_hits
            self.counters.engine_slow += old.slow
            if _routes_changed(old.zone, zone):
                self.forwarder.flush_cache()  # a cached answer may have come from the wrong upstream
        self.dispatch.engine = Engine(zone)
        self.view = view

    # -- clients ---------------------------------------------------------------------------------

    def client_allowed(self, host: str) -> bool:
        return self.dispatch.client_allowed(host)

    def forward(self, fwd: Forward, data: bytes, reply_to: ReplyTo, tcp: bool) -> None:
        """Answer a non-local query: its reply goes to `reply_to`, now or later."""
        reply = self.forward_or_reply(fwd, data, reply_to, tcp)
        if reply is not None:
            reply_to(reply)

    def forward_or_reply(self, fwd: Forward, data: bytes, reply_to: ReplyTo | LateReply, tcp: bool) -> bytes | None:
        """Answer a non-local query: the reply when it is known at once (cache, shed, no route, a
        loop), else None and a race whose reply goes to `reply_to` (dispatch.ForwardFn; a
        `LateReply` is bound only then)."""
        if fwd.__class__ is Chase:  # our CNAME leads out of our zones: ask for its target
            self._chase(fwd, data, bound(reply_to))  # type: ignore[arg-type]
            return None
        c = self.counters
        route = fwd.route
        if route is None or not route.upstreams:
            c.no_upstream += 1
            return _refused(data) or None
        forwarder = self.forwarder
        dispatch = self.dispatch
        allowance = dispatch.forward_allowance
        if allowance == 0 or forwarder.inflight >= forwarder.max_inflight:
            return self._shed(fwd, data, tcp, fwd.info)
        if forwarder.looped(data):
            c.looped += 1
            log.warning("forwarding loop: one of our own upstream queries came back to us")
            return _servfail(data) or None
        now = _monotonic()
        info = fwd.info  # the engine's reading, else read once for the cache, the shedding and the race
        if info is None:
            info = read_query(data)
        cached = forwarder.answer_from_cache(data, now, info)
        if cached is not None:
            c.cache_answers += 1
            cached = complete_chain(self.engine.zone, cached)  # type: ignore[union-attr]
            return cached if tcp or len(cached) <= fwd.limit else truncate(cached, fwd.limit)
        budget = self._forward_budget
        if budget.rate and not budget.take(now):  # over --max-forward-qps (a cache hit never is)
            return self._shed(fwd, data, tcp, info)
        if allowance > 0:
            dispatch.forward_allowance = allowance - 1
        c.forwarded += 1
        limit = fwd.limit
        reply_to = bound(reply_to)

        # Called from the upstream socket's reader callback (forward.py): no task per query.
        def done(reply: bytes) -> None:
            if self._stopping:
                return
            reply = complete_chain(self.engine.zone, reply)  # type: ignore[union-attr]
            if not tcp and len(reply) > limit:
                reply = truncate(reply, limit)
            reply_to(reply)

        self.forwarder.start(data, route.upstreams, allow_tailnet_answers=route.allow_tailnet_answers, done=done,
                             info=info)
        return None

    def _shed(self, fwd: Forward, data: bytes, tcp: bool, info: QueryInfo | None = None) -> bytes | None:
        """Over the in-flight cap, over --max-forward-qps, or the listener is behind with no forward
        left for this batch (dispatch.Backlog): answered now, before any task, socket or closure
        exists. A cached answer, fresh or stale (RFC 8767), still goes out; otherwise SERVFAIL (EDE
        "other"). This is what every query of a flood of unique names costs, so it does the least
        that is right: one reading of the question (the cache key; `info` when the caller has it),
        one cache lookup for fresh and stale alike, the reply built from that reading. A loop check
        is not needed: a looping query gets SERVFAIL."""
        self.counters.overload += 1
        if info is None:
            info = read_query(data)
            if info is None:
                return error_reply(data, Rcode.FORMERR) or None
        cache = self.forwarder.cache
        if cache is not None:
            hit = cache.get_stale(data, info, _monotonic())
            if hit is not None:
                return self._fitted(complete_chain(self.engine.zone, hit), fwd, tcp)  # type: ignore[union-attr]
        return servfail_reply(data, info, EDE_OTHER)

    @staticmethod
    def _fitted(reply: bytes, fwd: Forward, tcp: bool) -> bytes | None:
        """`reply` fitted to the client's UDP size (a cached answer can be large)."""
        if not tcp and len(reply) > fwd.limit:
            return truncate(reply, fwd.limit)
        return reply or None

    def _chase(self, chase: Chase, data: bytes, reply_to: Callable[[bytes], None]) -> None:
        """Forward the chase's subquery like any query (cache, race, rebinding rules of the target's
        route), then hand the client our chain spliced in front of the answer (chase.py)."""
        self.forward(Forward(chase.route, 65535), chase.subquery,
                     lambda reply: reply_to(chase_reply(chase, data, reply)), tcp=True)

    # -- operators -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Listeners, view, routes, upstream health, counters: what `magicdns status` shows."""
        engine = self.engine
        zone = engine.zone if engine else None
        c = self.counters
        routes: dict[str, Any] = {}
        if zone is not None:
            for suffix, target in sorted(zone.routes.items()):
                if isinstance(target, LocalZone):
                    if target.kind in ("reverse4", "reverse6"):
                        continue
                    routes[suffix] = "local"
                else:
                    routes[suffix] = [_shown(u) for u in target.upstreams]
            routes["."] = [_shown(u) for u in zone.default_route.upstreams] if zone.default_route else []
        fast = c.engine_fast + (engine.fast_hits if engine else 0)
        slow = c.engine_slow + (engine.slow if engine else 0)
        return {
            "listeners": [_fmt(h, p) for h, p in self.bound],
            "uptime_s": round(time.time() - self.started_at, 1),
            "view": {"domain": zone.domain if zone else None, "version": zone.serial if zone else None,
                     "hosts": len(zone.hosts) if zone else 0,
                     "records": sum(len(r) for r in zone.records.values()) if zone else 0,
                     "warnings": list(zone.warnings) if zone else []},
            "routes": routes,
            "queries": {"udp": c.udp, "tcp": c.tcp, "answered_fast": fast, "answered_slow": slow,
                        "forwarded": c.forwarded, "cache_answers": c.cache_answers,
                        "refused_clients": c.refused_clients, "dropped": c.dropped,
                        "no_upstream": c.no_upstream, "looped": c.looped, "overload": c.overload},
            "tcp": {"connections": len(self._tcp.conns), "rejected": c.tcp_rejected,
                    "per_client_rejected": c.tcp_per_client_rejected, "idle_closed": c.tcp_idle_closed,
                    "stalled_closed": c.tcp_stalled_closed},
            "forwarder": self.forwarder.stats(),
            **({"encrypted": self.encrypted.status()} if self.config.encrypted.wanted else {}),
        }

    async def query(self, name: str, qtype: str = "A") -> dict[str, Any]:
        """Resolve through this server's own logic (local zone, cache, forwarding): for `dns query`."""
        q = DNSRecord.question(name, qtype.upper())
        q.header.id = 0
        data = bytes(q.pack())
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()

        def done(reply: bytes) -> None:
            if not fut.done():
                fut.set_result(reply)

        assert self.engine is not None
        result = self.engine.handle(data, tcp=True)
        if isinstance(result, Forward):
            self.forward(result, data, done, tcp=True)
        elif result is not None:
            done(result)
        else:
            done(header_only_reply(data, Rcode.FORMERR) or b"")
        reply = await asyncio.wait_for(fut, self.config.forward_timeout + 1)
        return reply_to_json(reply)


def reply_to_json(reply: bytes) -> dict[str, Any]:
    """A reply as JSON: rcode, flags, and each section's records in presentation format."""
    msg = DNSRecord.parse(reply)
    h = msg.header

    def rrs(section: list) -> list[dict[str, Any]]:
        return [{"name": str(rr.rname), "type": QTYPE.get(rr.rtype), "ttl": rr.ttl,
                 "value": rr.rdata.toZone() if hasattr(rr.rdata, "toZone") else str(rr.rdata)}
                for rr in section if rr.rtype != QTYPE.OPT]

    from dnslib import RCODE
    return {"rcode": RCODE.get(h.rcode), "flags": {"aa": bool(h.aa), "tc": bool(h.tc), "rd": bool(h.rd),
                                                 "ra": bool(h.ra)},
            "question": [{"name": str(q.qname), "type": QTYPE.get(q.qtype)} for q in msg.questions],
            "answer": rrs(msg.rr), "authority": rrs(msg.auth), "additional": rrs(msg.ar)}


class TokenBucket:
    """`rate` events a second with a burst of one second's worth; rate 0 allows everything."""

    __slots__ = ("rate", "tokens", "last")

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.tokens = float(rate)
        self.last = float("-inf")

    def take(self, now: float) -> bool:
        if not self.rate:
            return True
        tokens = min(float(self.rate), self.tokens + (now - self.last) * self.rate) if self.last != float("-inf") \
            else self.tokens
        self.last = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True


def _routes_changed(old: Zone, new: Zone) -> bool:
    return old.routes != new.routes or old.default_route != new.default_route


def _shown(up: Upstream) -> str:
    """An upstream as `status` shows it: an upgraded public resolver says so (publicdns.py)."""
    return f"{up.spec} (upgraded; plain DNS to port {up.plain_behind} behind)" if up.plain_behind else up.spec


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _refused(data: bytes) -> bytes | None:
    return error_reply(data, Rcode.REFUSED) or None


def _servfail(data: bytes) -> bytes | None:
    return error_reply(data, Rcode.SERVFAIL) or None
