"""The forwarder's upstream sockets opened ahead (magicdns/udppool.py) against fake upstreams on
loopback: every attempt still has a socket of its own, used once; replies from another address or
port, with another ID or question, or arriving late for an earlier query never become an answer."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

import pytest
from dnslib import RR, DNSRecord

from magicdns.forward import Forwarder
from magicdns.upstream import Upstream
from tests.integration.test_forward import _RESPONDER, addresses, query, run, up, within_guard
from tests.integration.upstreams import Behavior, FakeUpstream
from tests.support import async_wait_until

FORGED = "www.example.test. 300 IN A 203.0.113.66"


def _forged_reply(q: bytes, qid: int | None = None) -> bytes:
    r = DNSRecord.parse(q).reply()
    if qid is not None:
        r.header.id = qid
    r.add_answer(*RR.fromZone(FORGED))
    return bytes(r.pack())


def _transport(fake: FakeUpstream) -> asyncio.DatagramTransport:
    """The fake upstream's own UDP socket: datagrams from it come from the upstream's address."""
    assert fake._udp is not None
    return fake._udp


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_each_attempt_has_its_own_socket_from_the_spares_and_it_is_closed_after() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2") as a:
            fwd = Forwarder(spare_sockets=4)
            wire = query("www.example.test")
            await within_guard(fwd.forward(wire, (up(a),), allow_tailnet_answers=False))
            pool = fwd._udp
            assert pool is not None and pool.spare_count(a.host, a.port) >= 1  # refilled after the reply
            fds = _open_fds()
            for _ in range(30):
                reply = await within_guard(fwd.forward(wire, (up(a),), allow_tailnet_answers=False))
                assert addresses(reply) == ["192.0.2.10"]
            # Sequential queries find a spare ready every time, and no socket is used twice: 31 queries,
            # (nearly) 31 source ports (kernel-chosen random ports may repeat after a close, rarely).
            assert pool.from_spares == 30
            assert len({src[1] for src in a.sources}) >= 28
            # Used sockets are closed, not kept: the process holds no more descriptors than before.
            assert _open_fds() <= fds
            assert 1 <= pool.spare_count(a.host, a.port) <= 4
            await fwd.close()
            assert pool.spare_count(a.host, a.port) == 0
    run(main)


def test_spoofed_replies_from_elsewhere_or_for_another_id_or_question_are_ignored() -> None:
    async def main() -> None:
        forger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        forger.bind(("127.0.0.3", 0))
        forger_same_host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        forger_same_host.bind(("127.0.0.2", 0))
        right_socket: list[asyncio.DatagramTransport] = []

        def forge(q: bytes, src: tuple[str, int] | None) -> None:
            assert src is not None
            qid = int.from_bytes(q[:2], "big")
            forger.sendto(_forged_reply(q), src)  # right ID and question, another address
            forger_same_host.sendto(_forged_reply(q), src)  # the upstream's address, another port
            other = DNSRecord.parse(_forged_reply(q, (qid + 1) & 0xFFFF))
            right_socket[0].sendto(bytes(other.pack()), src)  # right peer, wrong ID
            wrong_q = DNSRecord.question("xxx.example.test", "A").reply()
            wrong_q.header.id = qid
            wrong_q.add_answer(*RR.fromZone("xxx.example.test. 300 IN A 203.0.113.67"))
            right_socket[0].sendto(bytes(wrong_q.pack()), src)  # right peer and ID, another question
            return None  # then the real answer, `delay` later

        try:
            async with FakeUpstream.start("127.0.0.2", behavior=Behavior.SLOW, delay=0.2, hook=forge) as a:
                right_socket.append(_transport(a))
                fwd = Forwarder(spare_sockets=2)
                for _ in range(3):  # the first from a new socket, the others from spares
                    reply = await within_guard(fwd.forward(query("www.example.test"), (up(a),),
                                                           allow_tailnet_answers=False))
                    assert addresses(reply) == ["192.0.2.10"]
                assert fwd.stats()["dropped_mismatch"] == 6  # two per query; the kernel dropped the rest
                assert fwd._udp is not None and fwd._udp.from_spares == 2
                await fwd.close()
        finally:
            forger.close()
            forger_same_host.close()
    run(main)


def test_a_late_reply_to_a_timed_out_query_never_answers_a_later_one() -> None:
    async def main() -> None:
        sent: list[tuple[bytes, tuple[str, int]]] = []
        late: list[bytes] = []

        def hook(q: bytes, src: tuple[str, int] | None) -> bytes | list[bytes] | None:
            assert src is not None
            sent.append((q, src))
            if len(sent) == 1:
                return []  # the first query is never answered in time
            # The second: first the first query's answer, late, to both its own (old) port and the
            # new one; then the right answer.
            first_q, first_src = sent[0]
            stale = _forged_reply(first_q)
            late.append(stale)
            transport.sendto(stale, first_src)
            transport.sendto(stale, src)
            return None

        async with FakeUpstream.start("127.0.0.2", hook=hook) as a:
            transport = _transport(a)
            fwd = Forwarder(timeout=0.3, spare_sockets=1)
            wire = query("www.example.test")
            first = await within_guard(fwd.forward(wire, (up(a),), allow_tailnet_answers=False))
            assert DNSRecord.parse(first).header.rcode == 2  # SERVFAIL at the timeout
            second = await within_guard(fwd.forward(wire, (up(a),), allow_tailnet_answers=False))
            assert addresses(second) == ["192.0.2.10"]
            # The timed-out attempt's socket was not reused: the second query left from another port
            # with another ID, and the late answer (same question, old ID) was dropped by ID.
            (q1, src1), (q2, src2) = sent
            assert src1[1] != src2[1] and q1[:2] != q2[:2]
            assert late and fwd.stats()["dropped_mismatch"] == 1
            await fwd.close()
    run(main)


def test_datagrams_to_a_spare_socket_are_drained_and_never_become_an_answer() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2") as a:
            transport = _transport(a)
            fwd = Forwarder(spare_sockets=2)
            wire = query("www.example.test")
            await within_guard(fwd.forward(wire, (up(a),), allow_tailnet_answers=False))
            pool = fwd._udp
            assert pool is not None
            spare_ports = [slot.sock.getsockname() for slot in pool._by_addr[(a.host, a.port)].ready]
            # A spoofer who somehow learned a spare's port, sending before any query uses it, from the
            # upstream's own address: every ID it could not know, a few of them.
            for qid in range(8):
                for port in spare_ports:
                    transport.sendto(_forged_reply(wire, qid), port)
            await async_wait_until(lambda: pool.stray == 8 * len(spare_ports), what="strays drained")
            for _ in range(3):
                reply = await within_guard(fwd.forward(wire, (up(a),), allow_tailnet_answers=False))
                assert addresses(reply) == ["192.0.2.10"]
            await fwd.close()
    run(main)


def test_no_spares_means_a_fresh_socket_per_attempt_as_before() -> None:
    async def main() -> None:
        async with FakeUpstream.start("127.0.0.2") as a:
            fwd = Forwarder(spare_sockets=0)
            wire = query("www.example.test")
            for _ in range(5):
                reply = await within_guard(fwd.forward(wire, (up(a),), allow_tailnet_answers=False))
                assert addresses(reply) == ["192.0.2.10"]
            assert fwd._udp is not None and fwd._udp.from_spares == 0 and fwd._udp.made == 5
            assert fwd._udp.spare_count(a.host, a.port) == 0
            await fwd.close()
    run(main)


# -- waiting in place for a fast upstream (_RaceIO.spin) -------------------------------------------

def _responder() -> tuple[subprocess.Popen[str], Upstream]:
    """test_forward's minimal responder in its own process: it answers while our loop is busy."""
    proc = subprocess.Popen([sys.executable, "-c", _RESPONDER], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, Upstream("127.0.0.8", int(proc.stdout.readline()))


def _stop(proc: subprocess.Popen[str], target: Upstream) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"quit", (target.host, target.port))
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()


def test_a_fast_upstream_is_waited_for_in_place_and_the_reply_is_the_same() -> None:
    proc, target = _responder()
    try:
        async def main() -> None:
            fwd = Forwarder(spin=0.001)  # generous: a busy test machine is slow to schedule the responder
            for i in range(200):
                wire = query(f"n{i}.example.test")
                reply = await within_guard(fwd.forward(wire, (target,), allow_tailnet_answers=False))
                assert reply[:2] == wire[:2] and reply[2] & 0x80 and reply[12:] == wire[12:]
            s = fwd.stats()
            assert s["spin_answered"] > 0  # the first query has no RTT yet: never spun for
            assert s["answered"] == 200 and s["inflight"] == 0 and not fwd._outgoing
            await fwd.close()
        run(main)
    finally:
        _stop(proc, target)


def test_an_upstream_that_cannot_answer_during_the_wait_stops_being_waited_for() -> None:
    async def main() -> None:
        # The fake upstream runs on our own loop: it can never answer while we wait in place.
        async with FakeUpstream.start("127.0.0.2") as a:
            fwd = Forwarder(spin=0.001)
            fwd._note_rtt(up(a), 0.00001)  # as if it had answered in 10 us before
            for _ in range(30):
                reply = await within_guard(fwd.forward(query("www.example.test"), (up(a),),
                                                       allow_tailnet_answers=False))
                assert addresses(reply) == ["192.0.2.10"]
            s = fwd.stats()
            # Each missed wait counts as a slow answer: after a few, no more waiting.
            assert 1 <= s["spin_missed"] <= 10 and s["spin_answered"] == 0
            await fwd.close()
    run(main)


def test_no_waiting_in_place_when_turned_off_or_with_another_query_in_flight() -> None:
    proc, target = _responder()
    try:
        async def main() -> None:
            off = Forwarder(spin=0)
            for i in range(20):
                await within_guard(off.forward(query(f"n{i}.example.test"), (target,), allow_tailnet_answers=False))
            assert off.stats()["spin_answered"] == off.stats()["spin_missed"] == 0
            await off.close()
            async with FakeUpstream.start("127.0.0.2", behavior=Behavior.SILENT) as slow:
                fwd = Forwarder(spin=0.001, timeout=5.0)
                fwd._note_rtt(target, 0.00001)
                waiting = asyncio.create_task(fwd.forward(query("www.example.test"), (up(slow),),
                                                          allow_tailnet_answers=False))
                await async_wait_until(lambda: fwd.inflight == 1, what="a query in flight")
                for i in range(10):  # never alone in flight: answered through the loop
                    await within_guard(fwd.forward(query(f"m{i}.example.test"), (target,),
                                                   allow_tailnet_answers=False))
                assert fwd.stats()["spin_answered"] == fwd.stats()["spin_missed"] == 0
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)
                await fwd.close()
        run(main)
    finally:
        _stop(proc, target)


def test_spin_is_bounded() -> None:
    for bad in (-0.001, 0.002):
        with pytest.raises(ValueError):
            Forwarder(spin=bad)
