"""One event-loop timer for many deadlines: what every forwarded query's race waits on.

A loop timer per query costs a handle, a heap push in the loop and a cancel when the answer comes
first (nearly always): a few microseconds on the forwarding path, twice. Here a deadline is a push
onto our own heap, and forgetting it costs nothing: an entry whose holder has moved its deadline,
or ended, is skipped when it comes up (lazy deletion). Entries hold a `Deadline` (a small handle
the holder clears when it ends), never the holder itself, so ended races are not kept alive until
their deadline passes. One loop timer is armed for the earliest entry, rounded up to a few
milliseconds so that a burst of deadlines costs one wake-up, and it is cancelled (and the heap
emptied) whenever no deadline is live: a forgotten entry never wakes the loop up on an idle server,
and a wake-up costs tens of microseconds of CPU on a virtual machine.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from typing import Callable

log = logging.getLogger("magicdns.forward")

GRANULARITY = 0.004  # seconds a deadline may fire late so that close ones share a wake-up


class Deadline:
    """A holder's place in `Deadlines`: `fire(at)` is called once `at` has come, unless `at` is no
    longer `self.at` (moved or cleared) by then."""

    __slots__ = ("at", "fire", "owner")

    def __init__(self, fire: Callable[[float], None]) -> None:
        self.at: float | None = None
        self.fire: Callable[[float], None] | None = fire
        self.owner: Deadlines | None = None  # set while `at` is live on it

    def forget(self) -> None:
        """No deadline for now (the holder got its answer); `Deadlines.set` may give it a new one."""
        if self.at is not None:
            self.at = None
            owner = self.owner
            if owner is not None:
                owner._forgotten()

    def clear(self) -> None:
        """Never fire again (the holder ended): drops the reference to the holder at once."""
        self.forget()
        self.fire = None


class Deadlines:
    """The heap of deadlines and the one loop timer for its earliest entry."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._heap: list[tuple[float, int, Deadline]] = []
        self._seq = itertools.count()  # ties broken in arrival order, never by comparing handles
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at: float | None = None
        self.live = 0  # deadlines set and not yet fired or forgotten

    def __len__(self) -> int:
        return len(self._heap)

    def set(self, deadline: Deadline, at: float | None) -> None:
        """Move `deadline` to `at` (None: no deadline)."""
        if at is None:
            deadline.forget()
            return
        if deadline.at is None:
            self.live += 1
        deadline.at = at
        deadline.owner = self
        heapq.heappush(self._heap, (at, next(self._seq), deadline))
        if self._armed_at is None or at < self._armed_at - GRANULARITY:
            self._arm(at)

    def close(self) -> None:
        self._disarm()
        self._heap.clear()
        self.live = 0

    def _forgotten(self) -> None:
        self.live -= 1
        if self.live <= 0:
            # Nothing left to wait for: every entry is forgotten, so none may wake the loop.
            self.live = 0
            self._disarm()
            self._heap.clear()

    def _disarm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._armed_at = None

    def _arm(self, at: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        at += GRANULARITY  # deadlines due a little later share this wake-up
        self._armed_at = at
        self._handle = self.loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._armed_at = None
        heap = self._heap
        # The loop runs a timer up to its clock resolution (1 ms) early: what it fires is due.
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
                self.live -= 1
                try:
                    deadline.fire(max(at, self.loop.time()))
                except Exception:  # a holder's bug must not cost the others their deadlines
                    log.exception("a deadline's callback failed")
        if self.live <= 0:
            self.live = 0
            heap.clear()
            return
        while heap and heap[0][2].at != heap[0][0]:
            heapq.heappop(heap)  # forgotten entries at the head: do not wake up for them
        if heap and self._armed_at is None:
            self._arm(heap[0][0])
