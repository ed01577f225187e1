"""One event-loop timer for many deadlines: what every forwarded query's race waits on.

A loop timer per query costs a handle, a heap push in the loop and a cancel when the answer comes
first (nearly always): a few microseconds on the forwarding path, twice. Here a deadline is a push
onto our own heap, and forgetting it costs nothing: an entry whose holder has moved its deadline,
or ended, is skipped when it comes up (lazy deletion). Entries hold a `Deadline` (a small handle
the holder clears when it ends), never the holder itself, so ended races are not kept alive until
their deadline passes. One loop timer is armed for the earliest entry.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from typing import Callable

log = logging.getLogger("magicdns.forward")


class Deadline:
    """A holder's place in `Deadlines`: `fire(at)` is called once `at` has come, unless `at` is no
    longer `self.at` (moved or cleared) by then."""

    __slots__ = ("at", "fire")

    def __init__(self, fire: Callable[[float], None]) -> None:
        self.at: float | None = None
        self.fire: Callable[[float], None] | None = fire

    def clear(self) -> None:
        """Never fire again (the holder ended): drops the reference to the holder at once."""
        self.at = None
        self.fire = None


class Deadlines:
    """The heap of deadlines and the one loop timer for its earliest entry."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._heap: list[tuple[float, int, Deadline]] = []
        self._seq = itertools.count()  # ties broken in arrival order, never by comparing handles
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at: float | None = None

    def __len__(self) -> int:
        return len(self._heap)

    def set(self, deadline: Deadline, at: float | None) -> None:
        """Move `deadline` to `at` (None: no deadline)."""
        deadline.at = at
        if at is None:
            return
        heapq.heappush(self._heap, (at, next(self._seq), deadline))
        if self._armed_at is None or at < self._armed_at:
            self._arm(at)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._armed_at = None
        self._heap.clear()

    def _arm(self, at: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_at = at
        self._handle = self.loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._armed_at = None
        heap = self._heap
        # The loop runs a timer up to its clock resolution early: what it fires is due.
        now = self.loop.time() + 0.001
        due: list[tuple[float, Deadline]] = []
        while heap and heap[0][0] <= now:
            at, _, deadline = heapq.heappop(heap)
            if deadline.at == at:
                due.append((at, deadline))
        for at, deadline in due:
            # Fired in order; one that moves its own deadline goes back on the heap for later.
            if deadline.at == at and deadline.fire is not None:
                deadline.at = None
                try:
                    deadline.fire(max(at, self.loop.time()))
                except Exception:  # a holder's bug must not cost the others their deadlines
                    log.exception("a deadline's callback failed")
        while heap and heap[0][2].at != heap[0][0]:
            heapq.heappop(heap)  # forgotten entries at the head: do not wake up for them
        if heap and self._armed_at is None:
            self._arm(heap[0][0])
