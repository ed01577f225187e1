"""The race of one forwarded query among its upstreams, as a sans-I/O state machine.

No sockets, no clocks, no event loop: time comes in as `now`, what to send goes out as `Send`
values, and there is one next deadline. The shape is aioquic's `QuicConnection`:

    race = Race(query, qend, upstreams, healths, now=t, timeout=2.5, stagger=0.15, new_id=..., book=...)
    for send in race.datagrams_to_send(now): ...      # new UDP attempts, TCP fallbacks
    race.receive(attempt, data, now)                  # a datagram (or TCP message) from an attempt
    race.attempt_failed(attempt, reason, now)         # a network error on an attempt
    race.get_timer() -> float | None; race.handle_timer(now)
    race.closed_attempts()                            # attempts whose sockets the glue should close
    race.done, race.result, race.failure, race.timed_out; race.close(now)

The rules (forward.py's module docstring has the whole list): the upstream with the lowest smoothed
RTT first, the next after `stagger` seconds without an answer or at once when an attempt fails
(SERVFAIL, REFUSED, FORMERR, NOTIMP, a network error, a malformed reply); replies with the wrong ID,
without QR or for another question are dropped; a truncated UDP reply is retried over TCP to the
same upstream; the first good answer wins; at `timeout` the race ends unanswered.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Callable, Protocol

from .cache import MessageScan, Rcode, WireError, scan_message
from .upstream import Upstream

log = logging.getLogger("magicdns.forward")  # the operator reads upstream health in the forwarder's log

FAILURE_RCODES = frozenset((Rcode.SERVFAIL, Rcode.REFUSED, Rcode.FORMERR, Rcode.NOTIMP))
HEALTH_LOG_INTERVAL = 60.0  # seconds between two "upstream failing" warnings for one upstream


# -- health of an upstream -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class UpstreamHealth:
    """A snapshot of one upstream's counters, for `stats()` and operators."""

    upstream: str
    sent: int
    answered: int
    servfail: int
    timeouts: int
    tcp_fallbacks: int
    srtt_ms: float
    last_error: str | None


class Health:
    """One upstream's running figures, shared by every race that uses it."""

    __slots__ = ("sent", "answered", "servfail", "timeouts", "tcp_fallbacks", "srtt", "last_error", "failing",
                 "warned_at", "announced")

    def __init__(self) -> None:
        self.sent = 0
        self.answered = 0
        self.servfail = 0
        self.timeouts = 0
        self.tcp_fallbacks = 0
        self.srtt = 0.0  # seconds; an unknown upstream is tried first, in configured order
        self.last_error: str | None = None
        self.failing = False  # logged when it starts failing and when it answers again
        self.warned_at = float("-inf")  # a flapping upstream logs at most once a minute
        self.announced = False  # its failure was logged: log its recovery too

    def sample(self, rtt: float) -> None:
        # Weights as BIND's: quick to notice a slow server, slow to forget it.
        self.srtt = rtt if self.srtt == 0.0 else 0.7 * self.srtt + 0.3 * rtt

    def note_down(self, up: Upstream, reason: str, now: float) -> None:
        # One warning when an upstream starts failing, not one per query.
        if not self.failing and now - self.warned_at >= HEALTH_LOG_INTERVAL:
            self.warned_at = now
            self.announced = True
            log.warning("upstream %s failing: %s", up.spec, reason)
        else:
            log.debug("upstream %s: %s", up.spec, reason)
        self.failing = True

    def note_up(self, up: Upstream) -> None:
        if self.failing:
            self.failing = False
            if self.announced:
                self.announced = False
                log.info("upstream %s answers again", up.spec)

    def snapshot(self, name: str) -> UpstreamHealth:
        return UpstreamHealth(name, self.sent, self.answered, self.servfail, self.timeouts,
                              self.tcp_fallbacks, round(self.srtt * 1000, 3), self.last_error)


# -- what the race asks of its surroundings ------------------------------------------------------

class RaceBook(Protocol):
    """The forwarder's shared book-keeping a race writes to (counters and the IDs in flight that
    loop detection reads); plain values, no I/O."""

    sent: int
    tcp_fallbacks: int
    malformed: int
    dropped_mismatch: int

    def track(self, key: bytes) -> None: ...

    def untrack(self, key: bytes) -> None: ...


class Transport(enum.Enum):
    UDP = "udp"
    TCP = "tcp"


@dataclass(frozen=True, slots=True)
class Send:
    """Send `wire` to `upstream` for attempt number `attempt`: a new UDP attempt (fresh socket) or
    the TCP fallback of an attempt whose UDP reply was truncated."""

    attempt: int
    upstream: Upstream
    wire: bytes
    transport: Transport


class AttemptState(enum.IntEnum):
    UDP = 1
    TCP = 2
    DONE = 3


class _Attempt:
    __slots__ = ("upstream", "health", "sent_id", "started", "state")

    def __init__(self, upstream: Upstream, health: Health, now: float) -> None:
        self.upstream = upstream
        self.health = health
        self.sent_id = b""
        self.started = now
        self.state = AttemptState.UDP


# -- the race ------------------------------------------------------------------------------------

class Race:
    """One forwarded query's race (see the module docstring)."""

    def __init__(self, query: bytes, qend: int, upstreams: list[Upstream], healths: list[Health], *, now: float,
                 timeout: float, stagger: float, new_id: Callable[[], bytes], book: RaceBook) -> None:
        self.query = query
        self.qbytes = query[12:qend]
        self.upstreams = upstreams
        self.healths = healths
        self.timeout = timeout
        self.stagger = stagger
        self.new_id = new_id
        self.book = book
        self.attempts: list[_Attempt] = []
        self.next_index = 0
        self.deadline = now + timeout
        self.stagger_at: float | None = None
        self.done = False
        self.result: tuple[bytes, MessageScan] | None = None
        self.failure: bytes | None = None  # the latest SERVFAIL/REFUSED/... reply, passed on if all fail
        self.timed_out = False
        self._tracked: list[bytes] = []
        self._sends: list[Send] = []
        self._to_close: list[int] = []
        self._start_next(now)

    # -- the glue's calls ----------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[Send]:
        """What to send now (and forget: each is returned once)."""
        sends, self._sends = self._sends, []
        return sends

    def closed_attempts(self) -> list[int]:
        """Attempts that ended since the last call: their sockets (or TCP tasks) can go."""
        closed, self._to_close = self._to_close, []
        return closed

    def get_timer(self) -> float | None:
        """The next moment `handle_timer` must be called at, or None when the race is over."""
        if self.done:
            return None
        if self.stagger_at is not None and self.stagger_at < self.deadline:
            return self.stagger_at
        return self.deadline

    def handle_timer(self, now: float) -> None:
        if self.done:
            return
        if now >= self.deadline:
            self.timed_out = True
            self._finish(None)
            return
        if self.stagger_at is not None and now >= self.stagger_at:
            self._start_next(now)

    def receive(self, index: int, data: bytes, now: float) -> bool:
        """A datagram (UDP) or message (TCP) from attempt `index`. Returns False when it was not a
        reply to this attempt (wrong ID or question, not a response, a late one): the glue keeps
        listening."""
        attempt = self.attempts[index]
        if attempt.state is AttemptState.DONE or self.done:
            return False
        if not self._matches(attempt, data):
            return False
        if attempt.state is AttemptState.UDP and data[2] & 0x02:
            self._tcp_fallback(index, attempt)
            return True
        self._on_reply(index, attempt, data, now)
        return True

    def attempt_failed(self, index: int, reason: str, now: float) -> None:
        """A network error on attempt `index` (socket, send, ICMP unreachable, TCP closed)."""
        attempt = self.attempts[index]
        if attempt.state is AttemptState.DONE or self.done:
            return
        self._fail(index, attempt, reason, now)
        self._next_or_end(now)

    def end(self) -> None:
        """End the race unanswered now (the forwarder is closing)."""
        if not self.done:
            self._finish(None)

    def close(self, now: float) -> None:
        """Book-keeping when the race is over, whatever happened: RTTs of unanswered attempts,
        timeouts, IDs no longer in flight. Call once."""
        self.done = True
        for index, attempt in enumerate(self.attempts):
            if attempt.state is not AttemptState.DONE:
                # Unanswered when the race ended: its RTT is at least this long.
                waited = now - attempt.started
                if waited > attempt.health.srtt:
                    attempt.health.sample(waited)
                if self.timed_out:
                    attempt.health.timeouts += 1
                    attempt.health.last_error = "timeout"
                    attempt.health.note_down(attempt.upstream, "timeout", now)
                attempt.state = AttemptState.DONE
                self._to_close.append(index)
        for key in self._tracked:
            self.book.untrack(key)
        self._tracked.clear()
        # Upstreams skipped this time drift back towards the front, so a server that failed once
        # is probed again now and then rather than never.
        for health in self.healths[self.next_index:]:
            health.srtt *= 0.98

    # -- the rules -----------------------------------------------------------------------------

    def _start_next(self, now: float) -> None:
        self.stagger_at = None
        if self.next_index < len(self.upstreams) and not self.done:
            up = self.upstreams[self.next_index]
            health = self.healths[self.next_index]
            self.next_index += 1
            attempt = _Attempt(up, health, now)
            self.attempts.append(attempt)
            health.sent += 1
            self.book.sent += 1
            self._sends.append(Send(len(self.attempts) - 1, up, self._new_wire(attempt), Transport.UDP))
            if self.next_index < len(self.upstreams):
                self.stagger_at = now + self.stagger
            return
        self._check_all_failed()

    def _new_wire(self, attempt: _Attempt) -> bytes:
        sent_id = self.new_id()
        attempt.sent_id = sent_id
        key = sent_id + self.qbytes
        self._tracked.append(key)
        self.book.track(key)
        return sent_id + self.query[2:]

    def _matches(self, attempt: _Attempt, data: bytes) -> bool:
        qb = self.qbytes
        if (len(data) >= 12 + len(qb) and data[0:2] == attempt.sent_id and data[2] & 0x80
                and data[4] == 0 and data[5] == 1 and data[12:12 + len(qb)] == qb):
            return True
        # A bare failure header (FORMERR/NOTIMP/... without the question) from the right peer and ID.
        if (len(data) >= 12 and data[0:2] == attempt.sent_id and data[2] & 0x80
                and data[4] == 0 and data[5] == 0 and (data[3] & 0x0F) in FAILURE_RCODES):
            return True
        self.book.dropped_mismatch += 1
        return False

    def _tcp_fallback(self, index: int, attempt: _Attempt) -> None:
        self._to_close.append(index)  # the UDP socket
        attempt.state = AttemptState.TCP
        attempt.health.tcp_fallbacks += 1
        self.book.tcp_fallbacks += 1
        self._sends.append(Send(index, attempt.upstream, self._new_wire(attempt), Transport.TCP))

    def _on_reply(self, index: int, attempt: _Attempt, data: bytes, now: float) -> None:
        health = attempt.health
        health.answered += 1
        health.sample(now - attempt.started)
        if (data[3] & 0x0F) in FAILURE_RCODES:
            health.servfail += 1
            health.last_error = Rcode(data[3] & 0x0F).name
            self.failure = data
            self._end_attempt(index, attempt)
            self._next_or_end(now)
            return
        try:
            scan = scan_message(data)
        except WireError as exc:
            # Checked here, not passed on: a garbled answer is this upstream's failure, and the
            # next upstream may do better.
            self.book.malformed += 1
            self._fail(index, attempt, f"malformed reply: {exc}", now)
            self._next_or_end(now)
            return
        self._end_attempt(index, attempt)
        health.note_up(attempt.upstream)
        self._finish((data, scan))

    def _fail(self, index: int, attempt: _Attempt, reason: str, now: float) -> None:
        health = attempt.health
        health.last_error = reason
        health.note_down(attempt.upstream, reason, now)
        # A failed attempt says the upstream is unusable right now: rank it behind the others.
        health.sample(max(self.timeout, health.srtt))
        self._end_attempt(index, attempt)

    def _end_attempt(self, index: int, attempt: _Attempt) -> None:
        attempt.state = AttemptState.DONE
        self._to_close.append(index)

    def _next_or_end(self, now: float) -> None:
        if self.next_index < len(self.upstreams):
            self._start_next(now)
        else:
            self._check_all_failed()

    def _check_all_failed(self) -> None:
        if self.done or self.next_index < len(self.upstreams):
            return
        if all(a.state is AttemptState.DONE for a in self.attempts):
            self._finish(None)

    def _finish(self, result: tuple[bytes, MessageScan] | None) -> None:
        self.done = True
        self.result = result
        self.stagger_at = None
