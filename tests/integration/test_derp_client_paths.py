"""The DERP client's fast paths for the node's relay traffic, against a relay server written here
with the protocol's own server session (so every byte the client writes is checked, in order):

- `send_many_threadsafe`: device threads write frames to the socket themselves while the loop
  writes its own (pings, `send_many`), through a socket buffer small enough that writes come
  back short and their tails go through the loop: every frame arrives whole, in order, once;
- `on_packets`: each read's packets in one call on the loop, a failing handler costing nothing;
- the liveness watchdog (no task per read any more): a server gone silent is pinged, then left.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

from meshnode.derp.client import DerpClient
from meshnode.derp.frames import Ping, RecvPacket, SendPacket
from meshnode.derp.session import ServerSession, public_key
from tests.support import async_wait_until


class FakeRelay:
    """Accepts DERP clients on 127.0.0.1:0, logs each in, and records what each one sends.
    `silent`: answer nothing after the login (not even pings). `slow`: a pause between reads,
    so the client's small socket buffer fills."""

    def __init__(self, silent: bool = False, slow: float = 0.0, early: bytes = b"") -> None:
        self.silent, self.slow = silent, slow
        self.early = early                        # frames written with the login's answer
        self.reading = asyncio.Event()            # cleared: the server stops reading (after login)
        self.reading.set()
        self.private = os.urandom(32)
        self.sent: list[SendPacket] = []       # every SendPacket of every connection, in order
        self.pings = 0
        self.logins = 0
        self.errors: list[Exception] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.base_events.Server | None = None

    async def __aenter__(self) -> "FakeRelay":
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/derp"

    async def deliver(self, index: int, src: bytes, packet: bytes) -> None:
        """Relay `packet` from `src` to the client of connection `index`."""
        self.writers[index].write(RecvPacket(src, packet).encode())
        await self.writers[index].drain()

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.writers.append(w)
        try:
            await self._serve(r, w)
        except Exception as exc:  # a garbled stream: recorded for the test, and the end of it
            self.errors.append(exc)
            w.close()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await r.read(4096)
            if not chunk:
                return
            head += chunk
        session = ServerSession(self.private)
        w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"
                + session.greeting())
        rest = head.split(b"\r\n\r\n", 1)[1]
        while not session.receive(rest):
            rest = await r.read(4096)
            if not rest:
                return
        info, held = session.accept()
        w.write(info + self.early)
        self.logins += 1
        events = list(held)
        while True:
            for ev in events:
                if isinstance(ev, SendPacket):
                    self.sent.append(ev)
                elif isinstance(ev, Ping):
                    self.pings += 1
            out = session.take_output()
            if out and not self.silent:
                w.write(out)
            if self.slow:
                await asyncio.sleep(self.slow)
            await self.reading.wait()
            data = await r.read(16384)
            if not data:
                return
            events = session.receive(data)


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


async def connected(url: str, **kw: object) -> DerpClient:
    c = DerpClient(os.urandom(32), [url], **kw)  # type: ignore[arg-type]
    await c.start()
    assert await c.wait_connected(3.0)
    return c


def numbered(thread: int, i: int) -> bytes:
    """A packet that says who sent it and its place, padded to a size that varies with `i`."""
    head = b"t%d-%06d:" % (thread, i)
    return head + bytes([i % 251]) * (40 + (i * 37) % 1300)


def test_threads_and_the_loop_write_whole_frames_in_order_through_short_writes() -> None:
    dst = os.urandom(32)
    per_thread, threads = 1000, 2

    async def body() -> None:
        async with FakeRelay(slow=0.0005) as relay:
            c = await connected(relay.url)
            loop = asyncio.get_running_loop()
            try:
                assert c._writer is not None
                sock = c._writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # short writes, soon
                via_loop = [0] * threads
                waiting = [0] * threads               # batches a sender queued on the loop, unwritten
                lock = threading.Condition()
                done = [threading.Event() for _ in range(threads)]

                async def on_loop(t: int, batch: list[tuple[bytes, bytes]]) -> None:
                    assert c.send_many(batch) == len(batch)
                    assert c._writer is not None
                    await c._writer.drain()       # back-pressure, as the device has (a bounded queue)
                    with lock:
                        waiting[t] -= 1
                        lock.notify_all()

                def sender(t: int) -> None:
                    # As the path runner does: straight to the socket while nothing of this
                    # sender waits for the loop; otherwise behind what waits, through the loop.
                    for start in range(0, per_thread, 10):
                        batch = [(dst, numbered(t, i)) for i in range(start, start + 10)]
                        with lock:
                            assert lock.wait_for(lambda: waiting[t] < 8, 10)
                            if not waiting[t] and c.send_many_threadsafe(batch) is not None:
                                continue
                            waiting[t] += 1
                        via_loop[t] += 1
                        asyncio.run_coroutine_threadsafe(on_loop(t, batch), loop)
                    loop.call_soon_threadsafe(done[t].set)

                workers = [threading.Thread(target=sender, args=(t,)) for t in range(threads)]
                for w in workers:
                    w.start()
                # Meanwhile the loop writes its own frames on the same connection.
                mine = 0
                while not all(d.is_set() for d in done):
                    assert c.send(dst, numbered(9, mine))
                    mine += 1
                    await asyncio.sleep(0.001)
                for w in workers:
                    w.join(10)
                total = threads * per_thread + mine
                await async_wait_until(lambda: len(relay.sent) >= total, 20, what="every frame at the relay")
                assert relay.logins == 1                  # never a garbled frame, never a reconnect
                assert c.stats["send_deferred"] > 0       # short writes happened and were finished
                assert sum(via_loop) > 0                  # and the loop's path was taken meanwhile
                assert all(s.dst == dst for s in relay.sent)
                for t, count in ((0, per_thread), (1, per_thread), (9, mine)):
                    got = [s.packet for s in relay.sent if s.packet.startswith(b"t%d-" % t)]
                    assert got == [numbered(t, i) for i in range(count)], f"sender {t}"
                assert len(relay.sent) == total
            finally:
                await c.close()
            assert c.send_many_threadsafe([(dst, b"after close")]) is None
    run(body())


def test_the_tail_of_a_short_write_goes_before_the_loops_next_frame() -> None:
    """A direct write the socket takes only part of: its tail waits for the loop, and a frame the
    loop writes meanwhile (a ping, a disco packet) must come after it, not inside the frame."""
    dst = os.urandom(32)

    async def body() -> None:
        async with FakeRelay() as relay:
            c = await connected(relay.url)
            try:
                assert c._writer is not None
                c._writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                relay.reading.clear()                  # the server's side fills up, then ours
                big = [(dst, numbered(0, i)) for i in range(400)]  # ~260 KB in one write
                assert c.send_many_threadsafe(big) == 400
                assert c.stats["send_deferred"] == 1   # the socket took only part of it
                assert c.send_many_threadsafe([(dst, b"must wait")]) is None  # behind the tail
                assert c.send(dst, b"from the loop")   # before the tail is written
                relay.reading.set()
                await async_wait_until(lambda: len(relay.sent) == 401 or relay.errors, 10, what="401 frames")
                assert not relay.errors and relay.logins == 1
                assert [s.packet for s in relay.sent] == [p for _, p in big] + [b"from the loop"]
            finally:
                await c.close()
    run(body())


def test_threadsafe_send_is_refused_before_login_and_never_sends_half() -> None:
    dst = os.urandom(32)

    async def body() -> None:
        async with FakeRelay() as relay:
            c = DerpClient(os.urandom(32), [relay.url])
            assert c.send_many_threadsafe([(dst, b"too early")]) is None  # not connected
            await c.start()
            assert await c.wait_connected(3.0)
            try:
                assert c.send_many_threadsafe([(dst, b"one"), (dst, b"two")]) == 2
                await async_wait_until(lambda: len(relay.sent) == 2, 5, what="two frames")
                assert [s.packet for s in relay.sent] == [b"one", b"two"]
                assert c.stats["sent"] == 2
            finally:
                await c.close()
    run(body())


def test_on_packets_gets_each_read_at_once_and_survives_a_failing_handler() -> None:
    async def body() -> None:
        batches: list[list[tuple[bytes, bytes]]] = []
        fail = [True]

        def handler(batch: list[tuple[bytes, bytes]]) -> None:
            batches.append(batch)
            if fail[0]:
                fail[0] = False
                raise RuntimeError("a bug in the consumer")

        async with FakeRelay() as relay:
            c = await connected(relay.url, on_packets=handler)
            try:
                src = os.urandom(32)
                await relay.deliver(0, src, b"first")          # the handler raises on this one
                await async_wait_until(lambda: len(batches) == 1, 5, what="the first batch")
                relay.writers[0].write(b"".join(RecvPacket(src, b"p%d" % i).encode() for i in range(50)))
                await async_wait_until(lambda: sum(map(len, batches)) == 51, 5, what="51 packets")
                got = [p for b in batches for p in b]
                assert got == [(src, b"first")] + [(src, b"p%d" % i) for i in range(50)]
                assert len(batches) < 51                       # batched by read, not one by one
                assert c.connected_url == relay.url and relay.logins == 1
                assert c.stats["received"] == 51 and not c._queue  # nothing left for recv()
            finally:
                await c.close()
    run(body())


def test_packets_in_the_same_read_as_the_login_reach_on_packets() -> None:
    """Frames right behind the server's login answer are read with it, before the client hands
    reading over to its frame protocol: they are delivered too, in order, with what follows."""
    src = os.urandom(32)
    early = b"".join(RecvPacket(src, b"early %d" % i).encode() for i in range(3))

    async def body() -> None:
        got: list[tuple[bytes, bytes]] = []
        async with FakeRelay(early=early) as relay:
            c = await connected(relay.url, on_packets=got.extend)
            try:
                await relay.deliver(0, src, b"later")
                await async_wait_until(lambda: len(got) == 4, 5, what="4 packets")
                assert got == [(src, b"early %d" % i) for i in range(3)] + [(src, b"later")]
            finally:
                await c.close()
    run(body())


def test_a_silent_server_is_pinged_then_left() -> None:
    async def body() -> None:
        async with FakeRelay(silent=True) as relay:
            c = await connected(relay.url, idle_ping=0.2, dead_after=0.6)
            try:
                t0 = time.monotonic()
                await async_wait_until(lambda: c.stats["connects"] >= 2, 5, what="a reconnect")
                assert relay.pings >= 1                    # it asked before giving up
                assert time.monotonic() - t0 >= 0.5        # and not before dead_after
            finally:
                await c.close()
    run(body())


def test_a_busy_connection_is_not_pinged() -> None:
    """Frames arriving keep the connection alive: the watchdog pings only after idle_ping of quiet."""
    async def body() -> None:
        async with FakeRelay() as relay:
            c = await connected(relay.url, idle_ping=0.3, dead_after=1.0, on_packets=lambda b: None)
            try:
                src = os.urandom(32)
                deadline = time.monotonic() + 1.2
                while time.monotonic() < deadline:
                    await relay.deliver(0, src, b"busy")
                    await asyncio.sleep(0.05)
                assert relay.pings == 0 and c.stats["connects"] == 1
                await async_wait_until(lambda: relay.pings >= 1, 3, what="a ping once quiet")
                assert c.stats["connects"] == 1            # the server answered it
            finally:
                await c.close()
    run(body())

