"""The DNS-over-TCP listener (RFC 7766): framing, pipelining, and the limits that keep it unabusable.

A TCP client holds server memory and a connection slot for as long as it likes unless we bound it:
- a connection must deliver a *complete* message within the idle timeout; partial bytes do not
  extend it (a slowloris sending one byte a second is closed after one timeout);
- one client address holds at most `max_per_client` of the slots, so one host cannot take them all;
- a client that does not read its replies stops being read from once its write buffer passes a
  small high-water mark (the kernel's buffers then push back on the client), and a connection whose
  replies have not moved for a whole idle timeout is aborted, its pending writes discarded;
- at most `max_pipeline` forwarded queries are outstanding per connection.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from .dispatch import Dispatch

if TYPE_CHECKING:
    from .dispatch import ListenerLimits


class TcpSlots:
    """The connection slots of all TCP listeners of one server: total and per client address."""

    def __init__(self, limits: "ListenerLimits") -> None:
        self.limits = limits
        self.conns: set[GuardedConnection] = set()
        self.by_host: dict[str, int] = {}

    def take(self, conn: "GuardedConnection", host: str, dispatch: Dispatch) -> bool:
        c = dispatch.counters
        if len(self.conns) >= self.limits.max_connections:
            c.tcp_rejected += 1
            return False
        held = self.by_host.get(host, 0)
        if held >= self.limits.max_per_client:
            c.tcp_rejected += 1
            c.tcp_per_client_rejected += 1
            return False
        self.by_host[host] = held + 1
        self.conns.add(conn)
        return True

    def release(self, conn: "GuardedConnection", host: str) -> None:
        if conn in self.conns:
            self.conns.discard(conn)
            left = self.by_host.get(host, 1) - 1
            if left > 0:
                self.by_host[host] = left
            else:
                self.by_host.pop(host, None)


class GuardedConnection(asyncio.Protocol):
    """A stream client under the TCP listener's limits, for every stream listener (TCP, DoT, DoH):
    the allow-list and connection slots at connect, an idle timer that only complete messages
    (`arm`) and moving replies re-arm, no reading while our replies sit unread, and an abort when
    they have not moved for a whole timeout. Subclasses say when else to stop reading (`held`),
    what to do once connected (`started`) and once replies move again (`writable`)."""

    def __init__(self, dispatch: Dispatch, slots: TcpSlots) -> None:
        self.dispatch = dispatch
        self.slots = slots
        self.limits = slots.limits
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.pending = 0  # forwarded queries not yet answered
        self.write_blocked = False  # our write buffer is above the high-water mark
        self.reading = True
        self.idle: asyncio.TimerHandle | None = None
        self.host = ""
        self.open = False

    def held(self) -> bool:
        """True while the subclass wants no more input (a full pipeline, a request in progress)."""
        return False

    def started(self) -> None:
        """Called once the client is admitted."""

    def stopped(self) -> None:
        """Called when the connection is gone."""

    def writable(self) -> None:
        """Called when the client reads its replies again."""

    # -- lifecycle -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        dispatch = self.dispatch
        peer = transport.get_extra_info("peername") or ("", 0)
        self.host = peer[0]
        if not dispatch.client_allowed(self.host):
            dispatch.counters.refused_clients += 1
            transport.abort()  # type: ignore[attr-defined]
            return
        if not self.slots.take(self, self.host, dispatch):
            transport.abort()  # type: ignore[attr-defined]
            return
        self.open = True
        high = self.limits.write_high_water
        self.transport.set_write_buffer_limits(high=high, low=high // 4)
        self.started()
        self.arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        self.slots.release(self, self.host)
        self.stopped()

    def arm(self) -> None:
        """(Re)start the idle timer: called when a complete message arrives or replies move."""
        if self.idle is not None:
            self.idle.cancel()
        self.idle = asyncio.get_running_loop().call_later(self.limits.idle_timeout, self._on_idle)

    def _on_idle(self) -> None:
        self.idle = None
        c = self.dispatch.counters
        if self.write_blocked or self.transport.get_write_buffer_size():
            # Replies have sat unread for a whole timeout: close() would wait for them forever.
            c.tcp_stalled_closed += 1
            self.transport.abort()
            return
        if self.pending:
            self.arm()  # forwarded answers are on their way (bounded by the forward timeout)
            return
        c.tcp_idle_closed += 1
        self.transport.close()

    # -- flow control ----------------------------------------------------------------------------

    def pause_writing(self) -> None:
        """Our write buffer passed the high-water mark: the client is not reading. Stop reading its
        queries (and stop answering the ones already buffered) until it catches up."""
        self.write_blocked = True
        self.update_reading()

    def resume_writing(self) -> None:
        self.write_blocked = False
        if self.open:
            self.arm()  # the client is reading: it is alive
            self.writable()
            self.update_reading()

    def update_reading(self) -> None:
        want = self.open and not self.write_blocked and not self.held()
        if want != self.reading and not self.transport.is_closing():
            self.reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()


class TcpConnection(GuardedConnection):
    """One TCP client: pipelined queries, replies in completion order, the limits above."""

    def __init__(self, dispatch: Dispatch, slots: TcpSlots) -> None:
        super().__init__(dispatch, slots)
        self.buf = bytearray()
        self.pipeline_full = False

    def held(self) -> bool:
        return self.pipeline_full

    def stopped(self) -> None:
        self.buf.clear()

    def writable(self) -> None:
        self._process()

    # -- messages --------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._process()

    def _process(self) -> None:
        buf = self.buf
        dispatch = self.dispatch
        while len(buf) >= 2 and not self.write_blocked and self.open:
            size = buf[0] << 8 | buf[1]
            if size < 12:  # a message shorter than a header: the stream cannot be trusted any more
                self.transport.close()
                return
            if len(buf) < size + 2:
                break
            msg = bytes(buf[2:size + 2])
            del buf[:size + 2]
            self.arm()  # a complete message: only these keep a connection alive
            dispatch.counters.tcp += 1
            result = dispatch.answer(msg, True)
            if result.__class__ is bytes:
                self._write(result)  # type: ignore[arg-type]
                if dispatch.qlog is not None:
                    dispatch.qlog.write(self.host, msg, result, "local")  # type: ignore[arg-type]
            elif result is not None:
                self.pending += 1
                if self.pending >= self.limits.max_pipeline and not self.pipeline_full:
                    self.pipeline_full = True
                    self.update_reading()
                dispatch.forward(result, msg, self.host, self._forwarded, True)  # type: ignore[arg-type]

    def _forwarded(self, reply: bytes) -> None:
        self.pending -= 1
        if self.pipeline_full and self.pending < self.limits.max_pipeline:
            self.pipeline_full = False
            self.update_reading()
        self._write(reply)

    def _write(self, reply: bytes) -> None:
        if self.open and not self.transport.is_closing():
            self.transport.write(len(reply).to_bytes(2, "big") + reply)
