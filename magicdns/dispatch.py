"""The one entry point every listener calls: bytes of a query in, bytes of a reply out (now or later).

A listener (batched UDP, asyncio UDP, TCP, and later DoT/DoH) owns its transport: reading, framing,
writing, per-connection limits. What happens to a query once read is the same for all of them and
lives here: the client allow-list, the answer engine of the current snapshot, counters, the query
log, and handing non-local queries to the forwarding path. Listeners import this module, never the
server, so the server can import the listeners without a cycle.

The hot path is `answer`: one call, no allocation beyond the engine's own, bytes back. Only a query
that is not answered locally costs a callback (`forward`).
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

from .engine import Engine, Forward
from .message import truncate
from .querylog import QueryLog

log = logging.getLogger(__name__)

ReplyTo = Callable[[bytes], None]
"""Where a reply that comes later (a forwarded query) is delivered: the listener's writer."""


class LateReply:
    """A `ReplyTo` not made yet. Under a flood most forwarded queries are answered at once (shed, or
    a cache hit), so a batched listener passes this instead of a closure per query, and the
    forwarding path calls `bind()` (while the listener's call is still running) only when a reply
    will really come later. Never kept past that call: use `bound`."""

    __slots__ = ()

    def bind(self) -> ReplyTo:
        raise NotImplementedError


def bound(reply_to: "ReplyTo | LateReply") -> ReplyTo:
    """The `ReplyTo` itself, made now if it was late."""
    return reply_to.bind() if isinstance(reply_to, LateReply) else reply_to


ForwardFn = Callable[[Forward, bytes, "ReplyTo | LateReply", bool], Optional[bytes]]
"""The server's forwarding path: the reply when it is known at once (a cache hit, a query shed under
overload, no route), else None, and the reply goes to the `ReplyTo` later."""

MAX_STREAM_MESSAGE = 65535  # RFC 1035 section 4.2.2: a two-octet length prefix


@dataclass(frozen=True)
class ListenerLimits:
    """The per-transport limits a stream listener enforces (taken from the server's config)."""

    idle_timeout: float = 10.0  # a complete message must arrive within this, else the connection closes
    max_connections: int = 512
    max_per_client: int = 64  # connections one client address may hold (a small share of the slots)
    max_pipeline: int = 64  # forwarded queries outstanding on one connection before it stops reading
    write_high_water: int = 64 * 1024  # replies buffered for a client that is not reading them


def per_client_share(max_connections: int) -> int:
    """The connections one client address may hold: max(4, cap/8), so a single host (or a
    slowloris) can never take every slot."""
    return max(4, max_connections // 8)


class Counters:
    """What the listeners and the forwarding path count; read by `status()`."""

    __slots__ = ("udp", "tcp", "refused_clients", "dropped", "forwarded", "cache_answers",
                 "no_upstream", "looped", "tcp_rejected", "tcp_idle_closed", "tcp_per_client_rejected",
                 "tcp_stalled_closed", "overload", "engine_fast", "engine_slow")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)


Answer = Union[bytes, Forward, None]

# While a batched listener is behind, one new forward per this many datagrams it reads. A forward (a
# socket, a timer, the upstream's reply) costs 10-15 authoritative answers, so forwards then take
# about 5% of the CPU however many unique names arrive, and a loaded listener still starts several
# hundred a second for the names nobody floods.
DATAGRAMS_PER_FORWARD = 256
FORWARD_CREDIT_CAP = 2 * DATAGRAMS_PER_FORWARD  # a pause in a flood does not bank a burst of forwards
BEHIND_FILL = 24  # datagrams a read, smoothed: at or above it the listener is behind (of 64 a read)
# Loaded: over the last window the loop thread was running or waiting for a CPU at least
# LOADED_SHARE of the wall time (schedstat; its CPU time where the kernel has none) while reading at
# least LOADED_RATE datagrams a second; forwards are then rationed as
# when the listener is behind. Reads alone miss a saturated server whose clients cannot refill its
# socket at once (they share CPUs with it or with each other): its reads stay small, every flooding
# name was forwarded, and forwards took a quarter of its CPU (issue 8, bench/dns_overload.sh). The
# rate keeps a loop that is busy with other work (a view being built, the node's tunnel) from
# rationing a trickle of queries: below it, DNS traffic cannot be what fills the CPU.
LOADED_SHARE = 0.8
LOADED_RATE = 20_000
LOAD_WINDOW = 0.02  # seconds of wall time per sample


class Backlog:
    """Whether a batched listener is behind, and how many new forwards its next batch may start.

    Sans-I/O: fed the number of datagrams of each read (0: the socket was empty). Behind means
    reads stay large: the smoothed read size (weight 1/4 to the newest) is at least `BEHIND_FILL`.
    One burst (a full read after a quiet spell) is not overload, and its names are forwarded; a
    closed-loop client that refills the socket while we answer gives full and partial reads in
    turn, and the partial ones are as much a sign of being behind as the full ones (before, each
    partial read forwarded its whole share of a flood). While behind, forwards are paid for in
    datagrams read: one per `DATAGRAMS_PER_FORWARD`, the rest shed (DnsServer._shed). The same
    rationing holds while the loop is loaded (`sample`: its busy share and datagram rate), which
    catches a saturated listener whose reads stay small.
    """

    __slots__ = ("fill", "credit", "loaded", "next_sample", "seen", "_wall", "_busy")

    def __init__(self) -> None:
        self.fill = 0  # datagrams a read, smoothed, times 4
        self.credit = 0  # datagrams read while behind, not yet spent on a forward
        self.loaded = False  # the last window was busy (see `sample`)
        self.next_sample = 0.0  # wall time from which the glue should call `sample` again
        self.seen = 0  # datagrams read since the last sample
        self._wall = -1.0
        self._busy = 0.0

    @property
    def behind(self) -> bool:
        return self.fill >= BEHIND_FILL * 4

    def sample(self, now: float, busy: float) -> None:
        """Note the wall clock `now` and `busy`, the seconds the loop thread has run or waited to
        run (any origin; the glue calls this once `now` reaches `next_sample`): `loaded` says
        whether, since the previous sample, the loop was busy at least LOADED_SHARE of the time
        while reading at least LOADED_RATE datagrams a second. An idle loop is not woken to sample:
        its next sample spans the idle time, so it is not loaded."""
        wall = now - self._wall
        if self._wall >= 0 and wall > 0:
            self.loaded = busy - self._busy >= LOADED_SHARE * wall and self.seen >= LOADED_RATE * wall
        self._wall, self._busy = now, busy
        self.seen = 0
        self.next_sample = now + LOAD_WINDOW

    def read(self, count: int) -> int:
        """Note a read of `count` datagrams; the new forwards this batch may start (-1: no limit)."""
        self.seen += count
        fill = self.fill = self.fill + count - (self.fill >> 2)
        if fill < BEHIND_FILL * 4 and not self.loaded:
            self.credit = 0
            return -1
        credit = self.credit + count
        self.credit = credit if credit < FORWARD_CREDIT_CAP else FORWARD_CREDIT_CAP
        return self.credit // DATAGRAMS_PER_FORWARD

    def spent(self, allowance: int, left: int) -> None:
        """After the batch: `allowance` was given, `left` of it unused."""
        if allowance > 0:
            self.credit -= (allowance - left) * DATAGRAMS_PER_FORWARD


class Dispatch:
    """Transport-neutral query handling shared by every listener (see the module docstring).

    `engine` is swapped whole by the server when a new view arrives; `forward_fn` is the server's
    forwarding path (cache, in-flight cap, upstream race).
    """

    def __init__(self, allow: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network], forward_fn: ForwardFn,
                 limits: ListenerLimits, qlog: QueryLog | None = None) -> None:
        self.allow = tuple(allow)
        self.engine: Engine | None = None
        self.forward_fn = forward_fn
        self.limits = limits
        self.qlog = qlog
        self.counters = Counters()
        self._allowed: dict[str, bool] = {}
        # New forwards the current batch may still start; -1: no limit. A batched listener that is
        # behind (its socket backlogged, `Backlog`) sets a small allowance per batch: a forward
        # costs ~10x an authoritative answer, so under overload a flood of unique names is answered
        # SERVFAIL at once and the tailnet's own names keep their share of the CPU.
        self.forward_allowance = -1

    def client_allowed(self, host: str) -> bool:
        """True when `host` (text form, as a socket gives it) may query us: we are no open resolver."""
        ok = self._allowed.get(host)
        if ok is None:
            try:
                addr = ipaddress.ip_address(host.split("%", 1)[0])
            except ValueError:
                return False
            if addr.version == 6 and addr.ipv4_mapped:
                addr = addr.ipv4_mapped
            ok = any(addr in net for net in self.allow)
            if len(self._allowed) > 65536:
                self._allowed.clear()
            self._allowed[host] = ok
        return ok

    def answer(self, data: bytes, stream: bool = False) -> Answer:
        """The local reply (bytes), a `Forward` to pass to `forward`, or None (dropped and counted).
        `stream` says the transport has no size limit below 64 KiB (TCP, DoT, DoH)."""
        try:
            result = self.engine.handle(data, tcp=stream)  # type: ignore[union-attr]
        except Exception:  # a bug must cost one query, never the listener (try is free in 3.11)
            self.engine_error(data)
            return None
        if result is None:
            self.counters.dropped += 1
        elif stream and result.__class__ is bytes and len(result) > MAX_STREAM_MESSAGE:  # type: ignore[arg-type]
            return truncate(result, MAX_STREAM_MESSAGE)  # type: ignore[arg-type]
        return result

    def forward_or_reply(self, fwd: Forward, data: bytes, client: str, reply_to: ReplyTo,
                         stream: bool) -> bytes | None:
        """Send a non-local query on its way. A reply known at once (cache hit, shed under overload)
        is returned, for the listener to send with its other replies (a batched listener: in the
        same sendmmsg, so a shed query costs what an authoritative answer costs); otherwise None,
        and the reply (fitted to the transport) goes to `reply_to` later."""
        qlog = self.qlog
        if qlog is None:
            return self.forward_fn(fwd, data, reply_to, stream)

        def logged(reply: bytes) -> None:
            reply_to(reply)
            qlog.write(client, data, reply, "forward")
        now = self.forward_fn(fwd, data, logged, stream)
        if now is not None:
            qlog.write(client, data, now, "forward")
        return now

    def forward(self, fwd: Forward, data: bytes, client: str, reply_to: ReplyTo, stream: bool) -> None:
        """Send a non-local query on its way; its reply (fitted to the transport) goes to `reply_to`,
        now or later."""
        now = self.forward_or_reply(fwd, data, client, reply_to, stream)
        if now is not None:
            reply_to(now)

    def handle(self, data: bytes, client: str, reply_to: ReplyTo, stream: bool) -> bytes | None:
        """`answer` and `forward` in one call, for listeners off the hot path (TCP, DoT, DoH): the
        local reply now, or None (dropped, or `reply_to` is called later)."""
        result = self.answer(data, stream)
        if result.__class__ is bytes:
            if self.qlog is not None:
                self.qlog.write(client, data, result, "local")  # type: ignore[arg-type]
            return result  # type: ignore[return-value]
        if result is not None:
            self.forward(result, data, client, reply_to, stream)  # type: ignore[arg-type]
        return None

    def engine_error(self, data: bytes) -> None:
        """Count and report a query that made the engine raise (a bug): it is dropped."""
        self.counters.dropped += 1
        log.exception("answer engine failed on a query (%d bytes, first 64: %s); dropped",
                      len(data), data[:64].hex())
