"""dispatch.Backlog, the sans-I/O core that tells a batched listener when it is behind and how many
new forwards a batch may start (issue 8, forwarding overload)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from magicdns.dispatch import (DATAGRAMS_PER_FORWARD, FORWARD_CREDIT_CAP, LOAD_WINDOW, LOADED_RATE, LOADED_SHARE,
                              Backlog)

BATCH = 64  # udpbatch.BATCH


def test_small_reads_never_limit_forwarding() -> None:
    b = Backlog()
    for count in [1, 3, 7, 12, 1, 20, 0] * 50:
        assert b.read(count) == -1


def test_one_burst_is_not_overload() -> None:
    """A full read after a quiet spell (a node starting its apps) forwards every name in it."""
    b = Backlog()
    for _ in range(10):
        b.read(1)
    assert b.read(BATCH) == -1
    for _ in range(10):
        b.read(0)
    assert b.read(BATCH) == -1


def test_sustained_full_reads_pay_one_forward_per_datagrams_read() -> None:
    b = Backlog()
    allowed, read = 0, 0
    for _ in range(200):
        a = b.read(BATCH)
        if a >= 0:
            read += BATCH
            allowed += a
            b.spent(a, 0)  # every one used
    assert read >= 190 * BATCH  # behind from the second or third full read on
    assert read // DATAGRAMS_PER_FORWARD - 1 <= allowed <= read // DATAGRAMS_PER_FORWARD


def test_the_partial_reads_of_a_saturated_listener_are_behind_too() -> None:
    """A closed-loop client refills the socket while we answer: full, partial, full, partial... is a
    saturated listener, and its partial reads must not forward their whole flood share (before,
    each one did)."""
    b = Backlog()
    for count in [BATCH, 36] * 3:
        b.read(count)
    for count in [BATCH, 36] * 100:
        assert b.read(count) >= 0, "a partial read of a saturated listener was not limited"


def test_unused_allowance_is_kept_but_never_banks_a_burst() -> None:
    b = Backlog()
    for _ in range(100):
        a = b.read(BATCH)
        b.spent(a, a)  # nothing forwarded: the credit grows only to its cap
    assert b.credit == FORWARD_CREDIT_CAP
    assert b.read(BATCH) == FORWARD_CREDIT_CAP // DATAGRAMS_PER_FORWARD


def test_catching_up_lifts_the_limit() -> None:
    for small in (0, 2):  # an empty socket (EAGAIN), or a trickle
        b = Backlog()
        for _ in range(20):
            b.read(BATCH)
        assert b.behind
        reads = 0
        while b.read(small) != -1:
            reads += 1
            assert reads < 20, "still behind after twenty small reads"
        assert reads >= 1  # one small read is not proof of having caught up
        assert b.credit == 0  # and nothing banked for the next time we fall behind


@given(st.lists(st.integers(min_value=0, max_value=BATCH), max_size=300), st.data())
def test_forwards_while_behind_never_exceed_the_datagrams_paid(reads: list[int], data: st.DataObject) -> None:
    b = Backlog()
    paid = 0  # datagrams read while behind since the last time we caught up
    forwards = 0
    for count in reads:
        a = b.read(count)
        if a == -1:
            assert not b.behind
            paid, forwards = 0, 0
            continue
        assert b.behind
        paid += count
        used = data.draw(st.integers(min_value=0, max_value=a))
        b.spent(a, a - used)
        forwards += used
        assert forwards <= paid // DATAGRAMS_PER_FORWARD
        assert 0 <= b.credit <= FORWARD_CREDIT_CAP


def _loaded_window(b: Backlog, now: float, cpu: float, share: float, datagrams: int, count: int = 8) -> tuple[float, float]:
    """One LOAD_WINDOW of small reads (`datagrams` in all) at a busy share of `share` (running or waiting for a CPU), then a sample."""
    for _ in range(datagrams // count):
        b.read(count)
    now += LOAD_WINDOW
    cpu += share * LOAD_WINDOW
    b.sample(now, cpu)
    return now, cpu


def test_a_saturated_loop_with_small_reads_is_rationed() -> None:
    """The bench's case: the clients share a core and cannot refill the socket, so reads stay small
    (never behind) while the server's CPU is full of DNS traffic. Before, every flooding name was
    forwarded then (a forward costs 10-15 answers); now forwards are paid for in datagrams read."""
    b = Backlog()
    b.sample(0.0, 0.0)
    rate = int(LOADED_RATE * LOAD_WINDOW) * 3  # three times the rate that can fill a CPU
    now, cpu = _loaded_window(b, 0.0, 0.0, 0.95, rate)
    assert b.loaded and not b.behind
    allowed, read = 0, 0
    for _ in range(100):
        a = b.read(8)
        assert a >= 0, "a small read of a loaded loop was not rationed"
        b.spent(a, 0)
        allowed += a
        read += 8
    assert allowed <= read // DATAGRAMS_PER_FORWARD


def test_a_loop_busy_with_other_work_forwards_a_trickle_freely() -> None:
    """A loop at full CPU for something else (a view being built, the node's tunnel) with a few
    hundred queries a second is not loaded by DNS: its forwards are not rationed."""
    b = Backlog()
    b.sample(0.0, 0.0)
    now, cpu = 0.0, 0.0
    for _ in range(10):
        now, cpu = _loaded_window(b, now, cpu, 1.0, 8)  # 400 datagrams a second
        assert not b.loaded
        assert b.read(1) == -1


def test_a_fast_but_idle_loop_is_not_loaded() -> None:
    """Many datagrams at little CPU (cheap answers on a fast machine): nothing to ration."""
    b = Backlog()
    b.sample(0.0, 0.0)
    _loaded_window(b, 0.0, 0.0, LOADED_SHARE - 0.05, int(LOADED_RATE * LOAD_WINDOW) * 3)
    assert not b.loaded
    assert b.read(8) == -1


def test_load_ends_with_the_next_sample_after_an_idle_spell() -> None:
    b = Backlog()
    b.sample(0.0, 0.0)
    now, cpu = _loaded_window(b, 0.0, 0.0, 1.0, int(LOADED_RATE * LOAD_WINDOW) * 2)
    assert b.loaded and b.read(8) >= 0
    # The loop sleeps for a second (nothing to read), then one datagram wakes it: the sample spans the
    # idle second, so the first read after it is not rationed and nothing was banked.
    b.sample(now + 1.0, cpu + 0.001)
    assert not b.loaded
    assert b.read(1) == -1 and b.credit == 0
    assert b.next_sample == now + 1.0 + LOAD_WINDOW


def test_the_first_sample_only_sets_the_origin() -> None:
    b = Backlog()
    b.sample(100.0, 50.0)  # busy time since the thread started: no window yet
    assert not b.loaded
