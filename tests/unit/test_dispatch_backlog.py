"""dispatch.Backlog, the sans-I/O core that tells a batched listener when it is behind and how many
new forwards a batch may start (issue 8, forwarding overload)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from magicdns.dispatch import BEHIND_FILL, DATAGRAMS_PER_FORWARD, FORWARD_CREDIT_CAP, Backlog

BATCH = 64


def test_small_reads_never_limit_forwarding() -> None:
    b = Backlog(BATCH)
    for count in [1, 3, 7, 12, 1, 20] * 50:
        assert b.read(count) == -1


def test_a_full_read_is_behind_at_once_and_pays_one_forward_per_64_datagrams() -> None:
    b = Backlog(BATCH)
    assert b.read(BATCH) == 1
    b.spent(1, 0)  # the forward was started
    assert b.read(BATCH) == 1
    b.spent(1, 1)  # not used: the credit stays
    assert b.read(BATCH) == FORWARD_CREDIT_CAP // DATAGRAMS_PER_FORWARD  # capped, never a burst


def test_the_partial_read_after_full_ones_is_still_behind() -> None:
    """A closed-loop client refills the socket while we answer: full, partial, full, partial... is a
    saturated listener, and its partial batches must not forward their whole flood share (before,
    every one did)."""
    b = Backlog(BATCH)
    allowed = 0
    read = 0
    for count in [BATCH, 36] * 100:
        a = b.read(count)
        assert a >= 0, f"partial read of {count} not limited after {read} datagrams"
        read += count
        allowed += a
        b.spent(a, 0)
    assert read // DATAGRAMS_PER_FORWARD - 1 <= allowed <= read // DATAGRAMS_PER_FORWARD + 1


def test_catching_up_lifts_the_limit() -> None:
    for small in (0, 2):  # an empty socket (EAGAIN), or a trickle
        b = Backlog(BATCH)
        for _ in range(20):
            b.read(BATCH)
        reads = 0
        while b.read(small) != -1:
            reads += 1
            assert reads < 20, "still behind after twenty small reads"
        assert reads >= 1  # one small read is not proof of having caught up
        assert b.credit == 0  # and nothing banked for the next time we fall behind


@given(st.lists(st.integers(min_value=0, max_value=BATCH), max_size=300), st.data())
def test_forwards_while_behind_never_exceed_the_datagrams_paid(reads: list[int], data: st.DataObject) -> None:
    b = Backlog(BATCH)
    paid = 0  # datagrams read while behind since the last time we caught up
    forwards = 0
    for count in reads:
        a = b.read(count)
        if a == -1:
            paid, forwards = 0, 0
            continue
        assert count == BATCH or b.fill >= BEHIND_FILL * 2
        paid += count
        used = data.draw(st.integers(min_value=0, max_value=a))
        b.spent(a, a - used)
        forwards += used
        assert forwards <= paid // DATAGRAMS_PER_FORWARD
        assert 0 <= b.credit <= FORWARD_CREDIT_CAP
