"""The batched UDP listener's memo path: replies served straight from the engine's reply memo carry
each query's own ID and go to each query's own sender, in one batch, beside queries that miss."""

from __future__ import annotations

import select
import socket
import time

import dns.message
import dns.rcode
import pytest

from magicdns.dispatch import Dispatch, ListenerLimits
from magicdns.engine import Engine
from magicdns.server import DEFAULT_ALLOW
from magicdns.udpbatch import BatchUdpListener
from magicdns.zone import Zone

from .test_engine import VIEW

pytestmark = pytest.mark.skipif(not BatchUdpListener.supported(), reason="no recvmmsg here")


def _serve_batch(listener: BatchUdpListener, sock: socket.socket) -> None:
    ready, _, _ = select.select([sock], [], [], 5.0)
    assert ready, "the queries never arrived"
    listener._on_readable()


def _replies(clients: list[socket.socket], want: int) -> list[tuple[int, bytes]]:
    got = []
    while len(got) < want:
        ready, _, _ = select.select(clients, [], [], 5.0)
        assert ready, f"only {len(got)} of {want} replies came"
        for c in ready:
            got.append((clients.index(c), c.recv(4096)))
    return got


def test_memo_hits_carry_their_own_id_and_reach_their_own_client() -> None:
    dispatch = Dispatch(DEFAULT_ALLOW, lambda *a: None, ListenerLimits())
    engine = dispatch.engine = Engine(Zone(VIEW))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    listener = BatchUdpListener(dispatch, sock)
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    try:
        names = ["server.tailnet", "laptop.tailnet", "nothing.tailnet"]
        warm = [dns.message.make_query(n, "A") for n in names]
        for _ in range(2):  # the slow path, then the template path that fills the memo
            for c, q in zip(clients, warm):
                c.sendto(q.to_wire(), sock.getsockname())
            _serve_batch(listener, sock)
            _replies(clients, 3)
        assert all(q.to_wire()[2:] in engine.replies for q in warm)
        hits = engine.fast_hits
        sent = {}
        for k in range(12):  # memo hits from three clients, and a miss in the same batch
            q = dns.message.make_query(names[k % 3] if k != 5 else "db.tailnet", "A")
            q.id = 1000 + k
            clients[k % 3].sendto(q.to_wire(), sock.getsockname())
            sent[q.id] = (k % 3, names[k % 3] if k != 5 else "db.tailnet")
        _serve_batch(listener, sock)
        got = _replies(clients, 12)
        for who, wire in got:
            r = dns.message.from_wire(wire)
            client, name = sent.pop(r.id)
            assert who == client and str(r.question[0].name) == name + "."
            if name == "nothing.tailnet":
                assert r.rcode() == dns.rcode.NXDOMAIN
            else:
                assert r.answer and str(r.answer[0].name) == name + "."
        assert not sent
        assert engine.fast_hits == hits + 11  # counted per batch by the listener
        assert dispatch.counters.udp == 3 + 3 + 12
    finally:
        sock.close()
        for c in clients:
            c.close()


def test_each_readiness_callback_feeds_the_load_sampler_once_a_window() -> None:
    """The listener is the glue of dispatch.Backlog's load core: it samples the loop's CPU time when
    a window has passed (and not on every callback: a CPU clock read is a system call)."""
    dispatch = Dispatch(DEFAULT_ALLOW, lambda *a: None, ListenerLimits())
    dispatch.engine = Engine(Zone(VIEW))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    listener = BatchUdpListener(dispatch, sock)
    try:
        backlog = listener.backlog
        assert backlog.next_sample == 0.0
        listener._on_readable()  # nothing to read: still a sample
        first = backlog.next_sample
        assert first > 0.0
        listener._on_readable()
        if time.monotonic() < first:  # still within the window (a preempted test may not be)
            assert backlog.next_sample == first
        backlog.next_sample = 0.0  # the window has passed
        listener._on_readable()
        assert backlog.next_sample > first
    finally:
        sock.close()


def test_the_busy_clock_counts_at_least_the_loops_cpu_time() -> None:
    """What feeds Backlog.sample: the loop thread's time running or waiting to run (schedstat),
    which must cover its CPU time (the CPU clock itself where the kernel has no schedstats)."""
    from magicdns.udpbatch import _busy_time

    b0, c0 = _busy_time(), time.thread_time()
    deadline = time.thread_time() + 0.05
    while time.thread_time() < deadline:  # 50 ms of this thread's CPU
        pass
    b1, c1 = _busy_time(), time.thread_time()
    assert b1 - b0 >= (c1 - c0) * 0.8  # schedstat may lag the running thread by a tick
