"""deadlines.py: many deadlines on one event-loop timer, on the loop the server runs (uvloop)."""

from __future__ import annotations

import asyncio
import gc
import weakref

import uvloop

from magicdns.deadlines import Deadline, Deadlines
from tests.support import async_wait_until


class Holder:
    def __init__(self, name: str, fired: list[tuple[str, float]]) -> None:
        self.name = name
        self.fired = fired
        self.deadline = Deadline(self.fire)

    def fire(self, now: float) -> None:
        self.fired.append((self.name, now))


def test_deadlines_fire_in_order_and_moved_or_cleared_ones_do_not() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        timers = Deadlines(loop)
        fired: list[tuple[str, float]] = []
        a, b, c, d = (Holder(n, fired) for n in "abcd")
        t0 = loop.time()
        timers.set(c.deadline, t0 + 0.09)
        timers.set(a.deadline, t0 + 0.03)  # earlier than the armed one: re-armed
        timers.set(b.deadline, t0 + 0.06)
        timers.set(d.deadline, t0 + 0.04)
        d.deadline.clear()  # ended: never fires
        timers.set(b.deadline, t0 + 0.12)  # moved: fires once, at the new time
        await async_wait_until(lambda: len(fired) >= 3, what="three deadlines")
        assert [name for name, _ in fired] == ["a", "c", "b"]
        for (name, now), due in zip(fired, (0.03, 0.09, 0.12)):
            assert now >= t0 + due  # never handed a `now` before its deadline
        # d's entry (due before b's) has left the heap without firing; nothing is left to fire.
        assert len(fired) == 3 and len(timers) == 0
        timers.close()
    uvloop.run(main())


def test_a_cleared_deadline_does_not_keep_its_holder_alive() -> None:
    async def main() -> None:
        timers = Deadlines(asyncio.get_running_loop())
        fired: list[tuple[str, float]] = []
        holder = Holder("x", fired)
        other = Holder("y", fired)
        timers.set(holder.deadline, asyncio.get_running_loop().time() + 60)
        timers.set(other.deadline, asyncio.get_running_loop().time() + 60)
        holder.deadline.clear()
        ref = weakref.ref(holder)
        del holder
        gc.collect()
        assert ref() is None and len(timers) == 2  # the heap keeps only the emptied handle
        assert timers.live == 1
        timers.close()
    uvloop.run(main())


def test_no_live_deadline_means_no_loop_timer() -> None:
    async def main() -> None:
        # An answered query forgets its deadline; once none is live, nothing may wake the loop up
        # for the forgotten entries (a wake-up costs real CPU on a virtual machine).
        loop = asyncio.get_running_loop()
        timers = Deadlines(loop)
        holders = [Holder(str(i), []) for i in range(5)]
        for i, h in enumerate(holders):
            timers.set(h.deadline, loop.time() + 1 + i)
        assert timers._handle is not None and timers.live == 5
        for h in holders[:4]:
            h.deadline.forget()
        assert timers._handle is not None and timers.live == 1
        holders[4].deadline.forget()
        assert timers._handle is None and timers.live == 0 and len(timers) == 0
        timers.set(holders[0].deadline, loop.time() + 0.01)  # and it works again afterwards
        await async_wait_until(lambda: holders[0].fired, what="the deadline set again")
        timers.close()
    uvloop.run(main())


def test_a_failing_callback_costs_only_itself() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        timers = Deadlines(loop)
        fired: list[tuple[str, float]] = []

        def boom(now: float) -> None:
            raise RuntimeError("bug")

        bad = Deadline(boom)
        good = Holder("good", fired)
        timers.set(bad, loop.time() + 0.01)
        timers.set(good.deadline, loop.time() + 0.01)
        await async_wait_until(lambda: fired, what="the good deadline")
        timers.close()
    uvloop.run(main())


def test_a_holder_may_set_its_next_deadline_from_its_callback() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        timers = Deadlines(loop)
        times: list[float] = []
        deadline: Deadline

        def again(now: float) -> None:
            times.append(now)
            if len(times) < 3:
                timers.set(deadline, now + 0.01)

        deadline = Deadline(again)
        timers.set(deadline, loop.time() + 0.01)
        await async_wait_until(lambda: len(times) == 3, what="three rounds")
        assert times == sorted(times)
        timers.close()
    uvloop.run(main())
