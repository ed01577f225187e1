"""Forwarding queries that are not for a local zone to upstream resolvers (DESIGN.md section 3).

One `Forwarder` per server. For each query:
- the client's query goes out unchanged except for a fresh random ID (os.urandom), from a socket
  of its own (so a fresh kernel-chosen random source port) per attempt, opened ahead of the query
  and closed after it (udppool.py); the socket is connected, so the kernel drops datagrams from any
  other address or port, and an ICMP port-unreachable fails the attempt at once instead of waiting
  for a timeout;
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
`_RaceIO` here is its asyncio glue: sockets, one deadline, a callback when the race ends. A query is
forwarded with `start` (the server's path): the first datagram leaves inside the caller's own
callback, and the reply is handed to `done` from the socket's reader callback. No task, no future
and no extra loop iteration per query: each of those cost a hop through the loop's ready queue,
which is most of what forwarding added to the upstream's own latency. What is left between the
client's datagram and the upstream's, and between the upstream's reply and the client's, is the
race itself: opening and closing sockets, caching the answer and the race's book-keeping happen
after the reply is out (`Forwarder._recycle`, `_cache_delivered`), and every race's deadline sits on
one loop timer (deadlines.py). Only a TCP fallback and an
encrypted query run as tasks, because they are rare or slow anyway. `forward` is the awaitable form.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import struct
import time
from time import perf_counter
from typing import TYPE_CHECKING, Callable, Iterable

from dnslib import DNSError

from .cache import (SHAPE_DO, SHAPE_EDNS, Cache, MessageScan, QueryInfo, Rcode, WireError, query_info,
                    question_end, scan_message, strip_opt_options)
from .message import error_reply as _message_error_reply
from .message import opt_record
from .ranges import RESOLVER_V4, RESOLVER_V6
from .rebind import strip_tailnet_addresses, tailnet_address_records
from .race import FAILURE_RCODES as _FAILURE_RCODES
from .race import Health as _Health
from .race import Race, Send, Transport, UpstreamHealth  # noqa: F401  (UpstreamHealth: public API)
from .deadlines import Deadline, Deadlines
from .udppool import DEFAULT_SPARES, UdpSlot, UdpSockets
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
SPIN = 0.00015  # seconds: wait in place for an upstream answering within this (_RaceIO.spin)
_MSG_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


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


_SERVFAIL_COUNTS = (b"\x00\x01\x00\x00\x00\x00\x00\x00", b"\x00\x01\x00\x00\x00\x00\x00\x01")
_OPT_EDE = {(do, ede): opt_record(do, 0, ede) for do in (False, True) for ede in (EDE_OTHER, EDE_NO_REACHABLE_AUTHORITY)}


def servfail_reply(query: bytes, info: QueryInfo, ede: int) -> bytes:
    """Our SERVFAIL for a query already read by `query_info`: byte for byte what `error_reply`
    gives, built from what `info` knows without reading the query again. This is the reply to
    every query shed under overload, so it must cost no more than an authoritative answer."""
    key = info.key
    if key is None or query[2] & 0x80 or ede not in (EDE_OTHER, EDE_NO_REACHABLE_AUTHORITY):
        # A shape query_info does not vouch for (several additional records, EDNS version > 0, a response).
        return error_reply(query, Rcode.SERVFAIL, ede)
    shape = key[3]
    edns = shape & SHAPE_EDNS
    head = query[:2] + bytes((0x80 | (query[2] & 0x79), 0x82 | (query[3] & 0x10))) + _SERVFAIL_COUNTS[1 if edns else 0]
    if edns:
        return head + query[12:info.qend] + _OPT_EDE[(bool(shape & SHAPE_DO), ede)]
    return head + query[12:info.qend]


def read_query(query: bytes) -> QueryInfo | None:
    """`query_info`, or None for a query without one readable question (answered FORMERR)."""
    try:
        return query_info(query)
    except WireError:
        return None


# -- one query's race: asyncio glue around race.Race ----------------------------------------------

class _Ids:
    """Random query IDs, two bytes at a time from a buffer of the kernel's randomness (what
    `secrets` reads), refilled every 512 IDs: one getrandom() call per 512 attempts, not per attempt.
    A forked worker starts with a fresh buffer, never its parent's."""

    __slots__ = ("buf", "pos")

    def __init__(self) -> None:
        self.buf = b""
        self.pos = 0

    def reset(self) -> None:
        self.buf = b""
        self.pos = 0

    def __call__(self) -> bytes:
        pos = self.pos
        if pos >= len(self.buf):
            self.buf = os.urandom(1024)
            pos = 0
        self.pos = pos + 2
        return self.buf[pos:pos + 2]


_new_id = _Ids()
os.register_at_fork(after_in_child=_new_id.reset)


class _RaceIO:
    """Sockets, timer and end callback around one `Race`: read, call the core, do what it says.

    `on_end` is called once, when the core is done (answered, failed, timed out or ended); after
    `close` nothing of this race runs any more."""

    __slots__ = ("fwd", "loop", "core", "socks", "tasks", "timer", "on_end", "ended", "closed", "sent_at")

    def __init__(self, fwd: "Forwarder", query: bytes, qend: int, upstreams: list[Upstream],
                 on_end: Callable[[], None]) -> None:
        self.fwd = fwd
        self.loop = fwd._loop
        self.socks: dict[int, UdpSlot] = {}  # attempt -> its connected UDP socket
        self.tasks: dict[int, asyncio.Task[None]] = {}  # attempt -> its TCP fallback
        self.timer = Deadline(self._on_timer)  # on the forwarder's one timer (deadlines.py)
        self.sent_at = 0.0  # perf_counter() when the first attempt was sent: its fine-grained RTT
        self.on_end = on_end
        self.ended = False
        self.closed = False
        self.core = Race(query, qend, upstreams, [fwd._health_of(u) for u in upstreams], now=self.loop.time(),
                         timeout=fwd.timeout, stagger=fwd.stagger, new_id=_new_id, book=fwd)

    def start(self) -> None:
        """Send the first attempt now, from the caller's callback (may end the race at once)."""
        self._guarded_pump()

    def _guarded_pump(self) -> None:
        try:
            self._pump()
        except Exception:  # a bug must cost this query a SERVFAIL, never the loop's callback
            log.exception("forwarding failed unexpectedly")
            self.core.end()
            self._end()

    def _pump(self) -> None:
        """Carry out what the core asks: sends, closes, the one timer, the end."""
        if self.closed:
            return
        core = self.core
        loop_time = self.loop.time
        while True:
            sends = core.datagrams_to_send(loop_time())
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
            self._end()
            return
        at = core.get_timer()
        if at != self.timer.at:
            self.fwd._deadlines().set(self.timer, at)

    def _end(self) -> None:
        self._cancel_timer()
        if not self.ended:
            self.ended = True
            self.on_end()

    def _cancel_timer(self) -> None:
        self.timer.forget()  # its heap entry is skipped when it comes up

    def _on_timer(self, now: float) -> None:
        if self.closed:
            return
        try:
            self.core.handle_timer(now)
        except Exception:
            log.exception("forwarding failed unexpectedly")
            self.core.end()
        self._guarded_pump()
        self.fwd._recycle()

    def _send_udp(self, send: Send) -> None:
        up = send.upstream
        if up.scheme != "dns":  # DoT/DoH: a query on the upstream's shared connection (upstream_tls.py)
            self._start_encrypted(send)
            return
        try:
            # A socket of its own for this attempt, opened (and registered) ahead of time: udppool.py.
            slot = self.fwd._sockets().take(up.host, up.port, self, send.attempt, self.loop.time())
        except OSError as exc:
            self.core.attempt_failed(send.attempt, f"socket: {exc.strerror or exc}", self.loop.time())
            return
        self.socks[send.attempt] = slot
        try:
            slot.sock.send(send.wire)
            if send.attempt == 0:
                self.sent_at = perf_counter()
        except OSError as exc:
            self.core.attempt_failed(send.attempt, f"send: {exc.strerror or exc}", self.loop.time())

    def slot_readable(self, index: int, slot: UdpSlot) -> None:
        """The socket of attempt `index` has datagrams (udppool.SlotOwner)."""
        core = self.core
        sock = slot.sock
        try:
            while self.socks.get(index) is slot:
                try:
                    data = sock.recv(65535)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:  # ICMP unreachable reported on the connected socket
                    core.attempt_failed(index, f"recv: {exc.strerror or exc}", self.loop.time())
                    break
                if core.receive(index, data, self.loop.time()):
                    if index == 0:
                        self.fwd._note_rtt(core.upstreams[0], perf_counter() - self.sent_at)
                    break
        except Exception:
            log.exception("forwarding failed unexpectedly")
            core.end()
        self._guarded_pump()
        self.fwd._recycle()

    def spin(self, budget: float) -> bool:
        """Wait for the first attempt's reply right here, in the caller's callback, for up to
        `budget` seconds: True when the race ended meanwhile. For an upstream that answers in tens
        of microseconds, letting the loop sleep costs more than this: the process is woken from
        idle for the reply, which on a virtual machine costs about 50 us of latency and as much
        CPU. The forwarder spins only when this is the one query in flight (forward.py, start)."""
        if len(self.socks) != 1:
            return False
        ((index, slot),) = self.socks.items()
        peek = slot.sock.recv
        end = perf_counter() + budget
        while True:
            try:
                peek(1, _MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                if perf_counter() >= end:
                    return False
                continue
            except OSError:
                pass  # an error queued on the socket (ICMP unreachable): slot_readable reports it
            self.slot_readable(index, slot)
            if self.ended or self.socks.get(index) is not slot:
                return self.ended

    def _close_attempt(self, index: int) -> None:
        slot = self.socks.pop(index, None)
        if slot is not None:
            slot.pool.release(slot)  # closed by the forwarder's next _recycle, after the reply is out
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
        self._guarded_pump()
        self.fwd._recycle()

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
        self._guarded_pump()
        self.fwd._recycle()

    def end(self) -> None:
        """End the race now, unanswered (the forwarder is closing)."""
        self.core.end()
        self._guarded_pump()

    def close(self) -> None:
        """Release every socket, timer and task of this race (called once, whatever happened)."""
        self.closed = True
        self.timer.clear()
        self.core.close(self.loop.time())
        for index in self.core.closed_attempts():
            self._close_attempt(index)
        for index in list(self.socks):
            self._close_attempt(index)
        for task in self.tasks.values():
            if not task.done():
                task.cancel()


def _call(done: Callable[[bytes], None], reply: bytes) -> None:
    """Hand a reply to its listener; a failing listener costs that reply, never the forwarder."""
    try:
        done(reply)
    except Exception:
        log.exception("delivering a forwarded reply failed")


class _Pending:
    """One client's forwarded query until its reply is handed over: the leader of a race, or a
    joiner waiting for an identical query's leader (`leader` set)."""

    __slots__ = ("fwd", "query", "info", "done", "allow", "flight_key", "race", "leader", "joiners", "finished")

    def __init__(self, fwd: "Forwarder", query: bytes, info: QueryInfo, done: Callable[[bytes], None],
                 allow: bool, flight_key: tuple[object, ...] | None) -> None:
        self.fwd = fwd
        self.query = query
        self.info = info
        self.done = done
        self.allow = allow
        self.flight_key = flight_key
        self.race: _RaceIO | None = None
        self.leader: _Pending | None = None
        self.joiners: list[_Pending] = []
        self.finished = False

    def race_ended(self) -> None:
        """The race's end callback: release it, then answer this query and its joiners."""
        fwd = self.fwd
        race = self.race
        if self.finished or race is None:
            return
        try:
            reply = fwd._outcome(self, race)
        except Exception:  # a bug must cost one SERVFAIL, not the server (nor leak this query)
            log.exception("forwarding failed unexpectedly")
            reply = error_reply(self.query, Rcode.SERVFAIL, EDE_NO_REACHABLE_AUTHORITY)
        self.finish(reply)
        fwd._cache_delivered()  # after the reply is out: the client does not wait for the cache

    def finish(self, reply: bytes | None) -> None:
        """Answer this query with `reply` (None: cancelled, nobody to answer) and its joiners from
        it, then release its race: the book-keeping waits until the replies are out."""
        if self.finished:
            return
        self.finished = True
        fwd = self.fwd
        fwd._inflight -= 1
        key = self.flight_key
        if key is not None and fwd._flights.get(key) is self:
            del fwd._flights[key]
        if reply is not None:
            _call(self.done, reply)
        for joiner in self.joiners:
            if not joiner.finished:
                joiner.finished = True
                fwd._inflight -= 1
                try:
                    joined = fwd._joined(joiner, reply)
                except Exception:  # a bug: this joiner's SERVFAIL, the others still answered
                    log.exception("forwarding failed unexpectedly")
                    joined = error_reply(joiner.query, Rcode.SERVFAIL)
                _call(joiner.done, joined)
        self.joiners.clear()
        race = self.race
        if race is not None:
            race.close()
            fwd._races.discard(race)

    def cancel(self) -> None:
        """The client no longer waits (its task was cancelled): release everything, answer nobody;
        a leader's joiners get SERVFAIL (or stale) at once."""
        if self.finished:
            return
        leader = self.leader
        if leader is not None:
            self.finished = True
            self.fwd._inflight -= 1
            if self in leader.joiners:
                leader.joiners.remove(self)
            return
        self.finish(None)
        self.fwd._recycle()


# -- the forwarder -------------------------------------------------------------------------------

class Forwarder:
    """Forwards queries to upstream resolvers, with a cache, racing, TCP fallback and bounds."""

    def __init__(self, *, cache: Cache | None = None, timeout: float = 2.5, stagger: float = 0.15,
                 max_inflight: int = 2048, loop: asyncio.AbstractEventLoop | None = None,
                 clock: Callable[[], float] = time.monotonic, spare_sockets: int = DEFAULT_SPARES,
                 spin: float = SPIN) -> None:
        """`clock` is the cache's clock (the `now` the server passes to `answer_from_cache`);
        `spare_sockets`: ready upstream sockets kept per upstream address (udppool.py; 0: none);
        `spin`: the longest wait for an upstream's reply inside the query's own callback, taken
        only when it is the one query in flight and the upstream answers faster (0: never)."""
        if timeout <= 0 or stagger < 0 or max_inflight < 1 or spare_sockets < 0 or not 0 <= spin <= 0.001:
            raise ValueError("timeout must be > 0, stagger >= 0, max_inflight >= 1, spare_sockets >= 0,"
                             " 0 <= spin <= 0.001")
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
        self._udp: UdpSockets | None = None  # plain DNS attempts' sockets, made on first use
        self._timers: Deadlines | None = None  # every race's deadline on one loop timer
        self._to_cache: tuple[bytes, QueryInfo, bytes, MessageScan] | None = None
        self.spin = spin
        # Each upstream's round-trip time to a microsecond (the loop's clock counts milliseconds),
        # for the spin: first attempts only.
        self._near_rtt: dict[Upstream, float] = {}
        self.spare_sockets = spare_sockets
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
        self.spin_answered = 0  # queries whose reply came while waiting in place (_RaceIO.spin)
        self.spin_missed = 0

    def _sockets(self) -> UdpSockets:
        pool = self._udp
        loop = self._loop
        if pool is None or pool.loop is not loop:
            if pool is not None:  # a forwarder moved to another event loop (tests do that)
                pool.abandon()
            pool = self._udp = UdpSockets(loop, self.spare_sockets)
        return pool

    def _deadlines(self) -> Deadlines:
        timers = self._timers
        loop = self._loop
        if timers is None or timers.loop is not loop:
            timers = self._timers = Deadlines(loop)
        return timers

    def _recycle(self) -> None:
        """Close the sockets of ended attempts and refill the spares: called once replies are out."""
        pool = self._udp
        if pool is not None:
            try:
                pool.recycle(self._loop.time())
            except Exception:  # a bug here must not cost the reader callback that called it
                log.exception("recycling upstream sockets failed unexpectedly")

    def encrypted_upstreams(self) -> "EncryptedUpstreams":
        if self.encrypted is None:
            from .upstream_tls import EncryptedUpstreams
            self.encrypted = EncryptedUpstreams()
        return self.encrypted

    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        # Kept once found: asyncio.get_running_loop() makes a getpid() system call every time.
        loop = self._loop_arg
        if loop is None or loop.is_closed():
            loop = self._loop_arg = asyncio.get_running_loop()
        return loop

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

    def answer_from_cache(self, query: bytes, now: float, info: QueryInfo | None = None) -> bytes | None:
        """A fresh cached reply shaped for `query` (client's ID and question case, aged TTLs), or None.
        `info`: the query's `read_query`, when the caller has it already."""
        cache = self.cache
        if cache is None:
            return None
        if info is None:
            info = read_query(query)
            if info is None:
                return None
        reply = cache.get(query, info, now)
        if reply is None and cache.failed_recently(info, now):
            # Every upstream failed for this question a moment ago (RFC 9520): do not ask again yet.
            self.failure_cached += 1
            stale = cache.get_stale(query, info, now)
            if stale is not None:
                self.stale_answers += 1
                return stale
            return servfail_reply(query, info, EDE_NO_REACHABLE_AUTHORITY)
        return reply

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

    def start(self, query: bytes, upstreams: tuple[Upstream, ...], *, allow_tailnet_answers: bool,
              done: Callable[[bytes], None], info: QueryInfo | None = None) -> "_Pending | None":
        """Forward `query`; `done(reply)` is called exactly once with the client's reply, within
        `timeout` plus scheduling slack, possibly before this returns (malformed, over the cap, no
        upstream). Returns the pending query (for `cancel`), or None when it was answered at once.
        See the module docstring for the order of fallbacks."""
        self.queries += 1
        if not isinstance(query, bytes):
            query = bytes(query)
        if info is None:
            info = read_query(query)
            if info is None:
                _call(done, error_reply(query, Rcode.FORMERR))
                return None
        if self._inflight >= self.max_inflight:
            self.overload += 1
            _call(done, self._failed(query, info, None, EDE_OTHER))
            return None
        if not upstreams or self._closed:
            _call(done, self._failed(query, info, None, EDE_NO_REACHABLE_AUTHORITY))
            return None
        flight_key = None if info.key is None else (info.key, upstreams, allow_tailnet_answers)
        pending = _Pending(self, query, info, done, allow_tailnet_answers, flight_key)
        self._inflight += 1
        if flight_key is not None:
            leader = self._flights.get(flight_key)
            if leader is not None:
                # Identical to a query in flight: wait for its answer rather than ask again (bounded
                # by the leader's timeout).
                self.coalesced += 1
                pending.leader = leader
                leader.joiners.append(pending)
                return pending
            self._flights[flight_key] = pending
        ordered = list(upstreams)
        if len(ordered) > 1:
            health = self._health
            ordered.sort(key=lambda u: health[u].srtt if u in health else 0.0)
        try:
            race = _RaceIO(self, query, info.qend, ordered, pending.race_ended)
        except Exception:  # a bug must cost one SERVFAIL, not the server
            log.exception("forwarding failed unexpectedly")
            pending.finish(self._failed(query, info, None, EDE_NO_REACHABLE_AUTHORITY))
            return pending
        pending.race = race
        self._races.add(race)
        race.start()
        if self._inflight == 1 and self.spin and not race.ended:
            # The only query in flight, to an upstream that answers faster than a wake-up: wait for
            # it here (_RaceIO.spin). A wait that sees no reply counts as a very slow answer (four
            # times the bound): that upstream is not waited for again until about seven answers
            # have come back quickly through the loop.
            rtt = self._near_rtt.get(ordered[0])
            if rtt is not None and rtt < self.spin:
                budget = min(2 * rtt, self.spin)
                if race.spin(budget):
                    self.spin_answered += 1
                else:
                    self.spin_missed += 1
                    self._near_rtt[ordered[0]] = 4 * self.spin
        return pending

    def _note_rtt(self, up: Upstream, rtt: float) -> None:
        near = self._near_rtt
        old = near.get(up)
        if old is None and len(near) >= 1024:  # upstreams of views long gone: start over
            near.clear()
        near[up] = rtt if old is None else 0.8 * old + 0.2 * rtt

    async def forward(self, query: bytes, upstreams: tuple[Upstream, ...], *,
                      allow_tailnet_answers: bool) -> bytes:
        """`start` as a coroutine: the client's reply (never raises except on cancellation, which
        releases the query's sockets and timer at once)."""
        result: asyncio.Future[bytes] = self._loop.create_future()

        def done(reply: bytes) -> None:
            if not result.done():
                result.set_result(reply)

        pending = self.start(query, upstreams, allow_tailnet_answers=allow_tailnet_answers, done=done)
        try:
            return await result
        except asyncio.CancelledError:
            if pending is not None:
                pending.cancel()
            raise

    def _outcome(self, pending: "_Pending", race: "_RaceIO") -> bytes:
        """The client's reply once its race has ended: the winner's answer, or the fallbacks."""
        query, info = pending.query, pending.info
        core = race.core
        outcome = core.result
        if outcome is None:
            if core.timed_out:
                self.timeouts += 1
            failure = core.failure
            if self.cache is not None and (failure is None or (failure[3] & 0x0F) in _UNREACHABLE_RCODES):
                # FORMERR/NOTIMP are about the query itself and are not remembered as failures.
                self.cache.note_failure(info, self._clock())
            return self._failed(query, info, failure, EDE_NO_REACHABLE_AUTHORITY)
        data, scan = outcome
        return self._deliver(query, info, data, scan, pending.allow)

    def _joined(self, pending: "_Pending", leader_reply: bytes | None) -> bytes:
        """A coalesced query's reply from its leader's (None: the leader was cancelled)."""
        if leader_reply is None or (leader_reply[3] & 0x0F) in _FAILURE_RCODES:
            return self._failed(pending.query, pending.info, None, EDE_NO_REACHABLE_AUTHORITY)
        return self._reshape(pending.query, pending.info, leader_reply)

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
            self._to_cache = (query, info, reply, scan)  # by _cache_delivered, once it is sent
        return reply

    def _cache_delivered(self) -> None:
        """Cache the reply `_deliver` just made, now that the client has it."""
        entry = self._to_cache
        if entry is None or self.cache is None:
            return
        self._to_cache = None
        query, info, reply, scan = entry
        now = self._clock()
        try:
            self.cache.insert(query, info, reply, now, scan)
            if now - self._last_purge >= _PURGE_INTERVAL:
                # Entries past their stale window would otherwise wait for LRU eviction.
                self._last_purge = now
                self.cache.purge(now)
        except Exception:  # a bug costs this answer its cache entry, never the reader callback
            log.exception("caching a forwarded reply failed unexpectedly")

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
        return servfail_reply(query, info, ede)

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
            "spin_answered": self.spin_answered, "spin_missed": self.spin_missed,
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
        # Each race's end answers its query (and joiners) and closes its sockets, there and then;
        # the TCP fallbacks and encrypted queries it cancelled are awaited below.
        for race in list(self._races):
            race.end()
        tasks = [t for t in self._tcp_tasks if not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        # Finished tasks leave the set from their done callbacks, a loop turn later: drop them now.
        self._tcp_tasks.difference_update([t for t in self._tcp_tasks if t.done()])
        if self._udp is not None:
            self._udp.close()
        if self._timers is not None:
            self._timers.close()
        if self.encrypted is not None:
            await self.encrypted.close()
