"""The anti-replay window against a set-based model of what it must accept."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.wg.replay import REJECT_AFTER_MESSAGES, WINDOW_SIZE, ReplayWindow


class Model:
    """Accept a counter iff never seen and not older than the window below the highest seen."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.top = -1

    def accept(self, c: int) -> bool:
        if c >= REJECT_AFTER_MESSAGES or c in self.seen or c <= self.top - WINDOW_SIZE:
            return False
        self.seen.add(c)
        self.top = max(self.top, c)
        return True


counters = st.one_of(
    st.integers(0, 5000),
    st.integers(0, 3 * WINDOW_SIZE),
    st.just(REJECT_AFTER_MESSAGES),
    st.integers(REJECT_AFTER_MESSAGES - 3, REJECT_AFTER_MESSAGES + 3),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(counters, max_size=200))
def test_window_matches_model(seq: list[int]) -> None:
    w, m = ReplayWindow(), Model()
    for c in seq:
        pre = w.might_accept(c)
        got = w.accept(c)
        assert got == m.accept(c), c
        assert pre or not got  # the pre-check never refuses what accept takes


@settings(max_examples=100, deadline=None)
@given(st.permutations(list(range(300))))
def test_any_reordering_inside_the_window_is_accepted_once(order: list[int]) -> None:
    w = ReplayWindow()
    assert all(w.accept(c) for c in order)
    assert not any(w.accept(c) for c in order)


def test_in_order_stream_and_edges() -> None:
    w = ReplayWindow()
    for c in range(10000):
        assert w.accept(c)
    assert not w.accept(9999)
    assert w.accept(20000)
    assert not w.accept(20000 - WINDOW_SIZE)  # fell out of the window
    assert w.accept(20000 - WINDOW_SIZE + 1)
    assert not w.accept(REJECT_AFTER_MESSAGES)
