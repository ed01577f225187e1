"""The forwarder's race (race.py) driven by hand: no sockets, no clocks, time passed in."""

from __future__ import annotations

import itertools

from dnslib import RCODE, RR, DNSRecord
from hypothesis import given, settings, strategies as st

from magicdns.race import Health, Race, Send, Transport
from magicdns.upstream import Upstream

UPS = [Upstream("192.0.2.1"), Upstream("192.0.2.2"), Upstream("192.0.2.3")]


class Book:
    def __init__(self) -> None:
        self.sent = self.tcp_fallbacks = self.malformed = self.dropped_mismatch = 0
        self.inflight: dict[bytes, int] = {}

    def track(self, key: bytes) -> None:
        self.inflight[key] = self.inflight.get(key, 0) + 1

    def untrack(self, key: bytes) -> None:
        self.inflight[key] -= 1
        if not self.inflight[key]:
            del self.inflight[key]


def query(name: str = "www.example.test") -> bytes:
    q = DNSRecord.question(name, "A")
    q.header.id = 0x1234
    return bytes(q.pack())


QUERY = query()
QEND = len(QUERY)


def make(n: int = 3, timeout: float = 2.0, stagger: float = 0.15) -> tuple[Race, Book, list[Health]]:
    ids = (i.to_bytes(2, "big") for i in itertools.count(1))
    book = Book()
    healths = [Health() for _ in range(n)]
    race = Race(QUERY, QEND, UPS[:n], healths, now=100.0, timeout=timeout, stagger=stagger,
                new_id=lambda: next(ids), book=book)
    return race, book, healths


def reply(send: Send, rcode: int = 0, tc: bool = False, answer: str | None = "192.0.2.10") -> bytes:
    r = DNSRecord.parse(send.wire).reply()
    r.header.rcode = rcode
    r.header.tc = int(tc)
    if answer and not rcode and not tc:
        r.add_answer(*RR.fromZone(f"www.example.test. 60 IN A {answer}"))
    return bytes(r.pack())


def test_first_upstream_at_once_next_after_stagger_first_answer_wins() -> None:
    race, book, healths = make()
    (first,) = race.datagrams_to_send(100.0)
    assert first.upstream == UPS[0] and first.transport is Transport.UDP and first.wire[2:] == QUERY[2:]
    assert first.wire[:2] != QUERY[:2]  # a fresh ID, never the client's
    assert race.get_timer() == 100.15
    race.handle_timer(100.15)
    (second,) = race.datagrams_to_send(100.15)
    assert second.upstream == UPS[1] and abs(race.get_timer() - 100.30) < 1e-9  # type: ignore[operator]
    assert race.receive(second.attempt, reply(second), 100.2)
    assert race.done and race.result is not None and race.get_timer() is None
    assert healths[1].answered == 1 and abs(healths[1].srtt - 0.05) < 1e-9
    race.close(100.2)
    assert sorted(race.closed_attempts()) == [0, 1] and book.inflight == {}
    assert healths[0].srtt >= 0.2  # unanswered for 0.2 s: its RTT is at least that
    assert healths[2].sent == 0


def test_failure_starts_the_next_at_once_and_the_last_failure_is_passed_on() -> None:
    race, book, healths = make(2)
    (first,) = race.datagrams_to_send(100.0)
    assert race.receive(first.attempt, reply(first, RCODE.SERVFAIL), 100.01)
    (second,) = race.datagrams_to_send(100.01)  # not waiting for the stagger
    assert second.upstream == UPS[1]
    assert race.closed_attempts() == [0]
    race.attempt_failed(second.attempt, "recv: Connection refused", 100.02)
    assert race.done and race.result is None and not race.timed_out
    assert race.failure is not None and race.failure[3] & 0x0F == RCODE.SERVFAIL
    assert healths[0].servfail == 1 and healths[1].last_error == "recv: Connection refused"


def test_spoofed_and_mismatched_replies_are_dropped() -> None:
    race, book, _ = make(1)
    (send,) = race.datagrams_to_send(100.0)
    good = reply(send)
    wrong_id = bytes([good[0] ^ 0xFF]) + good[1:]
    other_q = DNSRecord.parse(reply(send))
    other_q.q.qname = "evil.example.test"
    not_response = send.wire
    for bad in (wrong_id, bytes(other_q.pack()), not_response, b"\x00"):
        assert not race.receive(send.attempt, bad, 100.01)
    assert book.dropped_mismatch == 4 and not race.done
    assert race.receive(send.attempt, good, 100.02) and race.done


def test_truncated_udp_reply_falls_back_to_tcp_with_a_new_id() -> None:
    race, book, healths = make(1)
    (udp,) = race.datagrams_to_send(100.0)
    assert race.receive(udp.attempt, reply(udp, tc=True), 100.01)
    (tcp,) = race.datagrams_to_send(100.01)
    assert tcp.transport is Transport.TCP and tcp.upstream == UPS[0] and tcp.wire[:2] != udp.wire[:2]
    assert race.closed_attempts() == [0]  # the UDP socket goes
    assert not race.receive(tcp.attempt, reply(udp), 100.02)  # the UDP ID over TCP: not ours
    assert race.receive(tcp.attempt, reply(tcp), 100.03) and race.result is not None
    assert book.tcp_fallbacks == 1 and healths[0].tcp_fallbacks == 1
    race.close(100.03)
    assert book.inflight == {}


def test_deadline_ends_the_race_and_counts_timeouts() -> None:
    race, book, healths = make(2, timeout=1.0, stagger=0.5)
    race.datagrams_to_send(100.0)
    race.handle_timer(race.get_timer())  # type: ignore[arg-type]
    race.datagrams_to_send(100.5)
    assert race.get_timer() == 101.0  # no more upstreams to stagger to: the deadline
    race.handle_timer(101.0)
    assert race.done and race.timed_out and race.result is None
    race.close(101.0)
    assert [h.timeouts for h in healths] == [1, 1] and book.inflight == {}


def test_malformed_answer_is_that_upstreams_failure() -> None:
    race, book, _ = make(2)
    (first,) = race.datagrams_to_send(100.0)
    garbled = reply(first)[:-3]
    assert race.receive(first.attempt, garbled, 100.01)
    assert book.malformed == 1 and not race.done
    (second,) = race.datagrams_to_send(100.01)
    assert second.upstream == UPS[1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["ok", "servfail", "tc", "neterr", "junk", "timer"]),
                          st.integers(0, 5)), max_size=12))
def test_any_sequence_ends_cleanly(events: list[tuple[str, int]]) -> None:
    """Whatever happens, in whatever order: the timer never goes back in time, the race ends by
    its deadline, and closing it leaves no ID in flight."""
    race, book, _ = make(3)
    now = 100.0
    sends: list[Send] = list(race.datagrams_to_send(now))
    for kind, pick in events:
        if race.done:
            break
        timer = race.get_timer()
        assert timer is not None and timer <= 102.0
        if kind == "timer":
            now = max(now, timer)
            race.handle_timer(now)
        elif sends:
            send = sends[pick % len(sends)]
            now += 0.01
            if kind == "neterr":
                race.attempt_failed(send.attempt, "boom", now)
            elif kind == "junk":
                race.receive(send.attempt, b"\xff" * 12, now)
            else:
                race.receive(send.attempt, reply(send, RCODE.SERVFAIL if kind == "servfail" else 0,
                                                 tc=kind == "tc"), now)
        sends += race.datagrams_to_send(now)
    while not race.done:
        now = race.get_timer()  # type: ignore[assignment]
        race.handle_timer(now)
        sends += race.datagrams_to_send(now)
    race.close(now)
    assert book.inflight == {}
