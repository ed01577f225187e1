"""Forwarding queries that are not for a local zone to upstream resolvers (DESIGN.md section 3).

One `Forwarder` per server. For each query:
- the client's query goes out unchanged except for a fresh random ID (`secrets`), from a fresh
  socket (so a fresh kernel-chosen random source port) per attempt; the socket is connected, so the
  kernel drops datagrams from any other address or port, and an ICMP port-unreachable fails the
  attempt at once instead of waiting for a timeout;
- replies with the wrong ID, without QR, or whose question bytes differ from what we sent (compared
  case-sensitively) are dropped and counted, and the wait goes on;
- the upstreams of a route race: the one with the lowest smoothed RTT first, the next after
  `stagger` seconds without an answer, or at once when an attempt fails (SERVFAIL, REFUSED, FORMERR,
  NOTIMP, a network error); the first good answer wins;
- a truncated (TC) UDP reply is retried over TCP (RFC 7766 framing) to the same upstream;
- after `timeout` seconds, or when every upstream failed: a stale cached answer (RFC 8767), else the
  last upstream's SERVFAIL/FORMERR/NOTIMP reply (an upstream's REFUSED becomes our SERVFAIL), else a
  SERVFAIL we build (with an RFC 8914 Extended DNS Error when the client sent EDNS);
- a query identical to one in flight (same cache key, route and rebinding rule) waits for that one's
  answer instead of asking again, and gets it with its own ID and question case, minus OPT options;
- more than `max_inflight` queries at once: the new one gets a stale answer or SERVFAIL at once;
- unless the route allows it, tailnet addresses are removed from the answer (rebinding protection,
  rebind.py: A/AAAA, IPv4-mapped and NAT64 forms, SVCB/HTTPS hints); what is left is what the
  client gets and what is cached.

The race rules live in race.py, a sans-I/O core (time passed in, sends and one deadline out);
`_RaceIO` here is its asyncio glue: sockets, one timer, the future the caller awaits. The per-query
work is kept to callbacks on the loop (no task per attempt); only a TCP fallback runs as a task,
because it is rare.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import socket
import _socket
import struct
import time
from typing import TYPE_CHECKING, Callable, Iterable

from dnslib import DNSError

from .cache import (Cache, MessageScan, QueryInfo, Rcode, WireError, query_info, question_end, scan_message,
                    strip_opt_options)
from .message import error_reply as _message_error_reply
from .ranges import RESOLVER_V4, RESOLVER_V6
from .rebind import TAILNET_V4, TAILNET_V6, strip_tailnet_addresses, tailnet_address_records  # noqa: F401
from .race import FAILURE_RCODES as _FAILURE_RCODES
from .race import Health as _Health
from .race import Race, Send, Transport, UpstreamHealth  # noqa: F401  (UpstreamHealth: public API)
from .upstream import Upstream

if TYPE_CHECKING:
    from .upstream_tls import EncryptedUpstreams

log = logging.getLogger(__name__)

# Addresses that are this resolver wherever it runs (DESIGN.md section 1), from ranges.py.
MAGICDNS_V4 = RESOLVER_V4
MAGICDNS_V6 = RESOLVER_V6

EDE_OTHER = 0
EDE_NO_REACHABLE_AUTHORITY = 22

_UNREACHABLE_RCODES = frozenset((Rcode.SERVFAIL, Rcode.REFUSED))  # failures of the upstream, not the query
_REBIND_LOG_INTERVAL = 600.0  # seconds between two log lines for the same name
_REBIND_LOG_NAMES = 4096  # names remembered for that rate limit
_PURGE_INTERVAL = 300.0  # seconds between two sweeps of the cache for dead entries


class ForwardingLoopError(ValueError):
    """An upstream that is this resolver itself: forwarding to it would loop."""


# -- configuration-time checks -----------------------------------------------------------------

def _addr(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_self(upstream: Upstream, own_addresses: Iterable[Upstream] = ()) -> bool:
    """True when `upstream` is this resolver: the MagicDNS addresses, or one of our listen addresses
    (a wildcard listener, 0.0.0.0 or ::, is reached through any loopback address on its port).
    An upstream by name (`tls://NAME`) is checked when its addresses are known (upstream_tls.py)."""
    if not upstream.host:
        return False
    addr = _addr(upstream.host)
    if addr in (MAGICDNS_V4, MAGICDNS_V6):
        return True
    for own in own_addresses:
        mine = _addr(own.host)
        if own.port != upstream.port:
            continue
        if mine == addr or (mine.is_unspecified and (addr.is_loopback or addr.is_unspecified)):
            return True
    return False


def reject_self(upstreams: Iterable[Upstream], own_addresses: Iterable[Upstream] = ()) -> tuple[Upstream, ...]:
    """`upstreams` unchanged, or ForwardingLoopError naming the first one that is ourselves."""
    own = tuple(own_addresses)
    result = tuple(upstreams)
    for up in result:
        if is_self(up, own):
            raise ForwardingLoopError(f"upstream {up.spec} is this resolver itself; forwarding to it would loop")
    return result


# -- replies we build ----------------------------------------------------------------------------

def error_reply(query: bytes, rcode: Rcode, ede: int | None = None) -> bytes:
    """message.error_reply (the one error reply) with an RFC 8914 Extended DNS Error when the
    client sent EDNS; b"" when `query` is not a query at all."""
    return _message_error_reply(query, rcode, True, ede=ede) or b""


# -- one query's race: asyncio glue around race.Race ----------------------------------------------

_UDP_NONBLOCK = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK  # Linux: non-blocking from creation


def _new_id() -> bytes:
    return secrets.token_bytes(2)


class _RaceIO:
    """Sockets, timer and future around one `Race`: read, call the core, do what it says."""

    __slots__ = ("fwd", "loop", "core", "socks", "tasks", "timer", "timer_at", "result")

    def __init__(self, fwd: "Forwarder", query: bytes, qend: int, upstreams: list[Upstream]) -> None:
        self.fwd = fwd
        self.loop = fwd._loop
        self.socks: dict[int, _socket.socket] = {}  # attempt -> its connected UDP socket
        self.tasks: dict[int, asyncio.Task[None]] = {}  # attempt -> its TCP fallback
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at: float | None = None
        self.result: asyncio.Future[None] = self.loop.create_future()
        self.core = Race(query, qend, upstreams, [fwd._health_of(u) for u in upstreams], now=self.loop.time(),
                         timeout=fwd.timeout, stagger=fwd.stagger, new_id=_new_id, book=fwd)
        self._pump()

    def _pump(self) -> None:
        """Carry out what the core asks: sends, closes, the one timer, the end."""
        core = self.core
        while True:
            sends = core.datagrams_to_send(self.loop.time())
            for send in sends:
                if send.transport is Transport.UDP:
                    self._send_udp(send)
                else:
                    self._start_tcp(send)
            for index in core.closed_attempts():
                self._close_attempt(index)
            if not sends:
                break
        if core.done:
            self._cancel_timer()
            if not self.result.done():
                self.result.set_result(None)
            return
        at = core.get_timer()
        if at != self.timer_at:
            self._cancel_timer()
            if at is not None:
                self.timer_at = at
                self.timer = self.loop.call_at(at, self._on_timer)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.timer_at = None

    def _on_timer(self) -> None:
        self.timer = None
        self.timer_at = None
        self.core.handle_timer(self.loop.time())
        self._pump()

    def _send_udp(self, send: Send) -> None:
        up = send.upstream
        if up.scheme != "dns":  # DoT/DoH: a query on the upstream's shared connection (upstream_tls.py)
            self._start_encrypted(send)
            return
        try:
            # The C socket type without socket.socket's Python wrapper, created non-blocking in one
            # call: a third less CPU per attempt, and attempts are the forwarding hot path.
            sock = _socket.socket(socket.AF_INET6 if up.family_v6 else socket.AF_INET, _UDP_NONBLOCK)
        except OSError as exc:
            self.core.attempt_failed(send.attempt, f"socket: {exc.strerror}", self.loop.time())
            return
        self.socks[send.attempt] = sock
        try:
            sock.connect((up.host, up.port))
            sock.send(send.wire)
        except OSError as exc:
            self.core.attempt_failed(send.attempt, f"send: {exc.strerror or exc}", self.loop.time())
            return
        self.loop.add_reader(sock.fileno(), self._on_readable, send.attempt, sock)

    def _on_readable(self, index: int, sock: _socket.socket) -> None:
        core = self.core
        while self.socks.get(index) is sock:
            try:
                data = sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # ICMP unreachable reported on the connected socket
                core.attempt_failed(index, f"recv: {exc.strerror or exc}", self.loop.time())
                break
            if core.receive(index, data, self.loop.time()):
                break
        self._pump()

    def _close_attempt(self, index: int) -> None:
        sock = self.socks.pop(index, None)
        if sock is not None:
            self.loop.remove_reader(sock.fileno())
            sock.close()
        task = self.tasks.get(index)
        if task is not None and not task.done() and self.core.done:
            task.cancel()

    def _start_tcp(self, send: Send) -> None:
        self.tasks[send.attempt] = task = self.loop.create_task(self._tcp(send))
        tasks = self.fwd._tcp_tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _tcp(self, send: Send) -> None:
        up = send.upstream
        core = self.core
        writer: asyncio.StreamWriter | None = None
        try:
            # No explicit timeout: the race's deadline cancels this task.
            reader, writer = await asyncio.open_connection(up.host, up.port)
            writer.write(struct.pack(">H", len(send.wire)) + send.wire)
            await writer.drain()
            while True:
                (length,) = struct.unpack(">H", await reader.readexactly(2))
                data = await reader.readexactly(length)
                if core.receive(send.attempt, data, self.loop.time()):
                    break
        except (OSError, asyncio.IncompleteReadError) as exc:
            reason = "closed by peer" if isinstance(exc, asyncio.IncompleteReadError) else (exc.strerror or str(exc))
            core.attempt_failed(send.attempt, f"tcp: {reason}", self.loop.time())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: fail this attempt, keep the race (and the server) going
            log.exception("TCP fallback to %s failed unexpectedly", up.spec)
            core.attempt_failed(send.attempt, f"tcp: {exc!r}", self.loop.time())
        finally:
            if writer is not None:
                writer.close()
        self._pump()

    def _start_encrypted(self, send: Send) -> None:
        self.tasks[send.attempt] = task = self.loop.create_task(self._encrypted(send))
        tasks = self.fwd._tcp_tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _encrypted(self, send: Send) -> None:
        core = self.core
        try:
            reply = await self.fwd.encrypted_upstreams().query(send.upstream, send.wire)
            core.receive(send.attempt, reply, self.loop.time())
        except OSError as exc:  # EncryptedUpstreamError: refused certificate, lost connection, HTTP status
            core.attempt_failed(send.attempt, f"{send.upstream.scheme}: {exc}", self.loop.time())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: fail this attempt, keep the race (and the server) going
            log.exception("encrypted query to %s failed unexpectedly", send.upstream.spec)
            core.attempt_failed(send.attempt, f"{send.upstream.scheme}: {exc!r}", self.loop.time())
        self._pump()

    def end(self) -> None:
        """End the race now, unanswered (the forwarder is closing)."""
        self.core.end()
        self._pump()

    def close(self) -> None:
        """Release every socket, timer and task of this race (called once, whatever happened)."""
        self._cancel_timer()
        self.core.close(self.loop.time())
        for index in self.core.closed_attempts():
            self._close_attempt(index)
        for index in list(self.socks):
            self._close_attempt(index)
        for task in self.tasks.values():
            if not task.done():
                task.cancel()


# -- the forwarder -------------------------------------------------------------------------------

class Forwarder:
    """Forwards queries to upstream resolvers, with a cache, racing, TCP fallback and bounds."""

    def __init__(self, *, cache: Cache | None = None, timeout: float = 2.5, stagger: float = 0.15,
                 max_inflight: int = 2048, loop: asyncio.AbstractEventLoop | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`clock` is the cache's clock (the `now` the server passes to `answer_from_cache`)."""
        if timeout <= 0 or stagger < 0 or max_inflight < 1:
            raise ValueError("timeout must be > 0, stagger >= 0, max_inflight >= 1")
        self.cache = cache
        self.timeout = timeout
        self.stagger = stagger
        self.max_inflight = max_inflight
        self._loop_arg = loop
        self._clock = clock
        self._health: dict[Upstream, _Health] = {}
        self._outgoing: dict[bytes, int] = {}  # (sent ID + question bytes) -> attempts in flight
        self._outgoing_ids: dict[bytes, int] = {}  # sent ID -> attempts in flight: looped()'s quick "no"
        self._races: set[_RaceIO] = set()
        # Identical queries in flight share one upstream query: (cache key, route, rebinding rule)
        # -> the leader's final reply (None when it failed).
        self._flights: dict[tuple[object, ...], asyncio.Future[bytes | None]] = {}
        self._closed = False
        self._tcp_tasks: set[asyncio.Task[None]] = set()
        self.encrypted: "EncryptedUpstreams | None" = None  # DoT/DoH connections, made on first use
        self._last_purge = clock()
        self._rebind_logged: dict[str, float] = {}
        self._inflight = 0
        self.queries = 0
        self.sent = 0
        self.answered = 0
        self.servfail = 0
        self.timeouts = 0
        self.tcp_fallbacks = 0
        self.overload = 0
        self.rebind_blocked = 0
        self.dropped_mismatch = 0
        self.looped_seen = 0
        self.stale_answers = 0
        self.coalesced = 0
        self.malformed = 0
        self.failure_cached = 0

    def encrypted_upstreams(self) -> "EncryptedUpstreams":
        if self.encrypted is None:
            from .upstream_tls import EncryptedUpstreams
            self.encrypted = EncryptedUpstreams()
        return self.encrypted

    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        return self._loop_arg or asyncio.get_running_loop()

    @property
    def inflight(self) -> int:
        return self._inflight

    def _health_of(self, up: Upstream) -> _Health:
        health = self._health.get(up)
        if health is None:
            health = self._health[up] = _Health()
        return health

    # The race's book (race.RaceBook): IDs in flight, for looped().
    def track(self, key: bytes) -> None:
        self._outgoing[key] = self._outgoing.get(key, 0) + 1
        sent_id = key[:2]
        self._outgoing_ids[sent_id] = self._outgoing_ids.get(sent_id, 0) + 1

    def untrack(self, key: bytes) -> None:
        left = self._outgoing[key] - 1
        if left:
            self._outgoing[key] = left
        else:
            del self._outgoing[key]
        sent_id = key[:2]
        left = self._outgoing_ids[sent_id] - 1
        if left:
            self._outgoing_ids[sent_id] = left
        else:
            del self._outgoing_ids[sent_id]

    # -- the server's entry points ---------------------------------------------------------------

    def answer_from_cache(self, query: bytes, now: float) -> bytes | None:
        """A fresh cached reply shaped for `query` (client's ID and question case, aged TTLs), or None."""
        cache = self.cache
        if cache is None:
            return None
        try:
            info = query_info(query)
        except WireError:
            return None
        reply = cache.get(query, info, now)
        if reply is None and cache.failed_recently(info, now):
            # Every upstream failed for this question a moment ago (RFC 9520): do not ask again yet.
            self.failure_cached += 1
            stale = cache.get_stale(query, info, now)
            if stale is not None:
                self.stale_answers += 1
                return stale
            return error_reply(query, Rcode.SERVFAIL, EDE_NO_REACHABLE_AUTHORITY)
        return reply

    def overloaded(self, query: bytes) -> bytes:
        """The answer for a query over the in-flight cap, given at once: a stale cached answer, else
        SERVFAIL (EDE "other"). Costs a header and question parse, no socket, no task."""
        self.queries += 1
        self.overload += 1
        try:
            info = query_info(query)
        except WireError:
            return error_reply(query, Rcode.FORMERR)
        return self._failed(query, info, None, EDE_OTHER)

    def looped(self, query: bytes) -> bool:
        """True if `query` is one of our own forwarded queries arriving back at our listener."""
        if query[0:2] not in self._outgoing_ids or len(query) < 12:
            return False
        try:
            qend = question_end(query)
        except WireError:
            return False
        if query[0:2] + query[12:qend] in self._outgoing:
            self.looped_seen += 1
            return True
        return False

    async def forward(self, query: bytes, upstreams: tuple[Upstream, ...], *,
                      allow_tailnet_answers: bool) -> bytes:
        """The reply for the client (never raises except on cancellation; returns within `timeout`
        plus scheduling slack): see the module docstring for the order of fallbacks."""
        self.queries += 1
        if not isinstance(query, bytes):
            query = bytes(query)
        try:
            info = query_info(query)
        except WireError:
            return error_reply(query, Rcode.FORMERR)
        if self._inflight >= self.max_inflight:
            self.overload += 1
            return self._failed(query, info, None, EDE_OTHER)
        if not upstreams or self._closed:
            return self._failed(query, info, None, EDE_NO_REACHABLE_AUTHORITY)
        flight_key = None if info.key is None else (info.key, upstreams, allow_tailnet_answers)
        if flight_key is not None:
            leader = self._flights.get(flight_key)
            if leader is not None:
                return await self._join(query, info, leader)
        shared: asyncio.Future[bytes | None] = self._loop.create_future()
        if flight_key is not None:
            self._flights[flight_key] = shared
        self._inflight += 1
        reply: bytes | None = None
        try:
            reply = await self._lead(query, info, upstreams, allow_tailnet_answers)
            return reply
        finally:
            self._inflight -= 1
            if flight_key is not None and self._flights.get(flight_key) is shared:
                del self._flights[flight_key]
            if not shared.done():
                shared.set_result(reply)

    async def _lead(self, query: bytes, info: QueryInfo, upstreams: tuple[Upstream, ...],
                    allow_tailnet_answers: bool) -> bytes:
        ordered = list(upstreams)
        if len(ordered) > 1:
            health = self._health
            ordered.sort(key=lambda u: health[u].srtt if u in health else 0.0)
        race: _RaceIO | None = None
        try:
            race = _RaceIO(self, query, info.qend, ordered)
            self._races.add(race)
            await race.result
            outcome = race.core.result
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must cost one SERVFAIL, not the server
            log.exception("forwarding failed unexpectedly")
            outcome = None
        finally:
            if race is not None:
                race.close()
                self._races.discard(race)
        if outcome is None:
            if race is not None and race.core.timed_out:
                self.timeouts += 1
            failure = race.core.failure if race is not None else None
            if self.cache is not None and (failure is None or (failure[3] & 0x0F) in _UNREACHABLE_RCODES):
                # FORMERR/NOTIMP are about the query itself and are not remembered as failures.
                self.cache.note_failure(info, self._clock())
            return self._failed(query, info, failure, EDE_NO_REACHABLE_AUTHORITY)
        data, scan = outcome
        return self._deliver(query, info, data, scan, allow_tailnet_answers)

    async def _join(self, query: bytes, info: QueryInfo, leader: "asyncio.Future[bytes | None]") -> bytes:
        """Wait for an identical query already in flight (same key, route and rebinding rule) rather
        than ask the upstreams again; the leader is bounded by `timeout`, and so is this."""
        self.coalesced += 1
        self._inflight += 1
        try:
            leader_reply = await asyncio.shield(leader)
        finally:
            self._inflight -= 1
        if leader_reply is None or (leader_reply[3] & 0x0F) in _FAILURE_RCODES:
            return self._failed(query, info, None, EDE_NO_REACHABLE_AUTHORITY)
        return self._reshape(query, info, leader_reply)

    def _reshape(self, query: bytes, info: QueryInfo, reply: bytes) -> bytes:
        """Another client's reply made ours: ID, RD and question case copied, its OPT options (the
        other client's cookie) removed."""
        try:
            stripped = strip_opt_options(reply, scan_message(reply))
        except WireError:
            stripped = None
        if stripped is None:
            return error_reply(query, Rcode.SERVFAIL)
        buf = bytearray(stripped)
        buf[0:2] = query[0:2]
        buf[2] = (buf[2] & 0xFE) | (query[2] & 0x01)
        buf[12:info.qend] = query[12:info.qend]
        return bytes(buf)

    def _deliver(self, query: bytes, info: QueryInfo, data: bytes, scan: MessageScan,
                 allow_tailnet_answers: bool) -> bytes:
        """The winning upstream reply made the client's: ID restored, rebinding filter, cached."""
        self.answered += 1
        reply = query[0:2] + data[2:]  # same layout as `data`: `scan` holds for it
        if not allow_tailnet_answers and tailnet_address_records(reply, scan):
            try:
                reply, names = strip_tailnet_addresses(reply)
                scan = scan_message(reply)
            except (DNSError, WireError, ValueError) as exc:
                log.warning("could not strip tailnet addresses from a reply (%s); answering SERVFAIL", exc)
                return error_reply(query, Rcode.SERVFAIL)
            self._note_rebind(names)
        if self.cache is not None:
            now = self._clock()
            self.cache.insert(query, info, reply, now, scan)
            if now - self._last_purge >= _PURGE_INTERVAL:
                # Entries past their stale window would otherwise wait for LRU eviction.
                self._last_purge = now
                self.cache.purge(now)
        return reply

    def _failed(self, query: bytes, info: QueryInfo, failure: bytes | None, ede: int) -> bytes:
        """Every upstream failed: stale, else the upstream's SERVFAIL/FORMERR/NOTIMP, else our SERVFAIL."""
        if self.cache is not None:
            stale = self.cache.get_stale(query, info, self._clock())
            if stale is not None:
                self.stale_answers += 1
                return stale
        self.servfail += 1
        # An upstream's REFUSED says it refuses *us*: the client did nothing wrong, so it gets
        # SERVFAIL. SERVFAIL (with its Extended DNS Error), FORMERR and NOTIMP are about the query.
        if failure is not None and len(failure) >= 12 and (failure[3] & 0x0F) != Rcode.REFUSED:
            return query[0:2] + failure[2:]
        return error_reply(query, Rcode.SERVFAIL, ede)

    def _note_rebind(self, names: tuple[str, ...]) -> None:
        self.rebind_blocked += 1
        now = self._clock()
        logged = self._rebind_logged
        if len(logged) > _REBIND_LOG_NAMES:
            logged.clear()
        for name in names:
            last = logged.get(name)
            if last is None or now - last >= _REBIND_LOG_INTERVAL:
                logged[name] = now
                log.info("rebinding protection: removed tailnet addresses from the answer for %s", name)

    # -- operators -------------------------------------------------------------------------------

    def upstream_health(self) -> tuple[UpstreamHealth, ...]:
        return tuple(h.snapshot(u.spec) for u, h in self._health.items())

    def stats(self) -> dict:
        """Counters, per-upstream health and cache figures, JSON-ready."""
        out: dict = {
            "queries": self.queries, "sent": self.sent, "answered": self.answered,
            "servfail": self.servfail, "timeouts": self.timeouts, "tcp_fallbacks": self.tcp_fallbacks,
            "stale_answers": self.stale_answers, "overload": self.overload, "inflight": self._inflight,
            "rebind_blocked": self.rebind_blocked, "dropped_mismatch": self.dropped_mismatch,
            "looped": self.looped_seen, "coalesced": self.coalesced,
            "malformed": self.malformed, "failure_cached": self.failure_cached,
            "upstreams": {h.upstream: {"sent": h.sent, "answered": h.answered, "servfail": h.servfail,
                                       "timeouts": h.timeouts, "tcp_fallbacks": h.tcp_fallbacks,
                                       "srtt_ms": h.srtt_ms, "last_error": h.last_error}
                          for h in self.upstream_health()},
        }
        if self.encrypted is not None:  # DoT/DoH connections, names of upstreams by name, DoH upgrade legs
            out["encrypted_upstreams"] = self.encrypted.stats()
        if self.cache is not None:
            c = self.cache.stats()
            out["cache"] = {"entries": c.entries, "bytes": c.bytes, "hits": c.hits, "misses": c.misses,
                            "stale_served": c.stale_served, "evictions": c.evictions, "inserts": c.inserts}
        return out

    def flush_cache(self) -> None:
        """Forget cached answers (call when routes change: an old answer may come from the wrong upstream)."""
        if self.cache is not None:
            self.cache.clear()

    async def close(self) -> None:
        """End every race in flight (their callers get SERVFAIL or stale) and release their sockets;
        later `forward` calls answer SERVFAIL (or stale) at once."""
        self._closed = True
        for race in list(self._races):
            race.end()
        # The awaiting forward() calls resume on the next loop turns and close their races (which
        # cancels TCP fallbacks); wait for that, boundedly, then for the cancelled tasks themselves.
        for _ in range(100):
            if not self._races:
                break
            await asyncio.sleep(0)
        tasks = [t for t in self._tcp_tasks if not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        if self.encrypted is not None:
            await self.encrypted.close()
