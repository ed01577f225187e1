"""Pre-opened upstream UDP sockets: the cost of a fresh socket paid before the query, not during it.

Every forwarded attempt still gets a socket of its own, used for that one attempt and closed when
the attempt ends (DESIGN.md section 3, RFC 5452 section 9.2): a fresh kernel-chosen random source
port per query, connected to the upstream so the kernel drops datagrams from any other address or
port, and no late reply to an earlier query can ever reach a later one, because no socket is
reused. What the pool changes is *when* that socket is made: creating, connecting and registering
a socket with the event loop costs ~20-30 us, which used to sit between the client's query and the
upstream send, and closing it sat between the upstream's reply and the client's. Now a few spares
per upstream are made ahead of time and refilled, and used sockets are closed, in `recycle`, which
the forwarder calls after the reply has gone out.

Each socket is registered with the loop once, when it is made, with a reader that hands datagrams
to whoever holds it (`UdpSlot.owner`); a spare that nobody holds drains and drops whatever arrives
(nothing should: nobody knows its port).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import _socket
from typing import Protocol

log = logging.getLogger("magicdns.forward")

_UDP_NONBLOCK = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK  # Linux: non-blocking from creation
DEFAULT_SPARES = 8  # at most this many ready sockets per upstream address
IDLE_AFTER = 120.0  # seconds: an upstream not asked for this long gives its spares back


class SlotOwner(Protocol):
    """Who holds a slot: told when its socket is readable."""

    def slot_readable(self, index: int, slot: "UdpSlot") -> None: ...


class UdpSlot:
    """One connected, registered UDP socket, held by at most one attempt in its whole life."""

    __slots__ = ("pool", "sock", "fd", "owner", "index")

    def __init__(self, pool: "UdpSockets", sock: _socket.socket) -> None:
        self.pool = pool
        self.sock = sock
        self.fd = sock.fileno()
        self.owner: SlotOwner | None = None
        self.index = -1

    def readable(self) -> None:
        owner = self.owner
        if owner is not None:
            owner.slot_readable(self.index, self)
            return
        # A spare (or a slot whose attempt just ended and awaits closing): nothing is expected.
        try:
            while True:
                self.sock.recv(65535)
                self.pool.stray += 1
        except OSError:  # BlockingIOError once drained; an error queued by the kernel likewise
            pass


class _Spares:
    __slots__ = ("ready", "want", "taken_at")

    def __init__(self) -> None:
        self.ready: list[UdpSlot] = []
        self.want = 1  # grows by one each time a query found no spare, up to the pool's cap
        self.taken_at = 0.0


class UdpSockets:
    """Spare sockets per upstream address (host, port), made ahead and used once each."""

    def __init__(self, loop: asyncio.AbstractEventLoop, spares: int = DEFAULT_SPARES) -> None:
        if spares < 0:
            raise ValueError("spares must be >= 0")
        self.loop = loop
        self.cap = spares
        self._by_addr: dict[tuple[str, int], _Spares] = {}
        self._low: set[tuple[str, int]] = set()  # addresses drawn from since the last refill
        self._dead: list[UdpSlot] = []
        self._next_sweep = 0.0
        self.closed = False
        self.made = 0  # sockets opened
        self.from_spares = 0  # attempts that found a spare ready
        self.stray = 0  # datagrams that arrived on a socket nobody held

    def take(self, host: str, port: int, owner: SlotOwner, index: int, now: float) -> UdpSlot:
        """A connected socket to (host, port) held by `owner` for attempt `index`: a spare when one
        is ready, else made now. Raises OSError (socket, connect) when none can be had."""
        if self.closed:
            raise OSError(errno.EBADF, "the forwarder is closed")
        addr = (host, port)
        spares = self._by_addr.get(addr)
        if spares is None:
            spares = self._by_addr[addr] = _Spares()
        spares.taken_at = now
        if spares.ready:
            slot = spares.ready.pop()
            self.from_spares += 1
        else:
            if spares.want < self.cap:
                spares.want += 1  # this upstream needs more in flight than it had ready
            slot = self._make(host, port)
        if self.cap:
            self._low.add(addr)
        slot.owner = owner
        slot.index = index
        return slot

    def release(self, slot: UdpSlot) -> None:
        """The attempt holding `slot` has ended: nobody reads it any more; it is closed at the next
        `recycle` (after the reply has gone out), never handed out again."""
        slot.owner = None
        self._dead.append(slot)

    def recycle(self, now: float) -> None:
        """Close released sockets and refill the spares drawn from: work kept off the latency path,
        so call it after the replies in hand have been sent."""
        dead = self._dead
        if dead:
            self._dead = []
            for slot in dead:
                self._close(slot)
        if self._low and not self.closed:
            low, self._low = self._low, set()
            for addr in low:
                spares = self._by_addr.get(addr)
                if spares is None:
                    continue
                try:
                    while len(spares.ready) < spares.want:
                        spares.ready.append(self._make(*addr))
                except OSError as exc:  # out of descriptors: the next query makes its own (and fails there)
                    log.debug("could not open a spare socket to %s:%d: %s", addr[0], addr[1], exc)
        if now >= self._next_sweep:
            self._next_sweep = now + IDLE_AFTER / 4
            self._drop_idle(now)

    def _drop_idle(self, now: float) -> None:
        for addr, spares in list(self._by_addr.items()):
            if now - spares.taken_at >= IDLE_AFTER:
                for slot in spares.ready:
                    self._close(slot)
                del self._by_addr[addr]

    def spare_count(self, host: str, port: int) -> int:
        spares = self._by_addr.get((host, port))
        return 0 if spares is None else len(spares.ready)

    def close(self) -> None:
        """Close every spare and released socket (the forwarder is closing)."""
        self.closed = True
        self.recycle(0.0)
        for spares in self._by_addr.values():
            for slot in spares.ready:
                self._close(slot)
        self._by_addr.clear()

    def abandon(self) -> None:
        """Close every socket without the loop (it is closed): the forwarder moved to another."""
        self.closed = True
        for slot in self._dead + [s for spares in self._by_addr.values() for s in spares.ready]:
            slot.sock.close()
            slot.fd = -1
        self._dead = []
        self._by_addr.clear()

    def _make(self, host: str, port: int) -> UdpSlot:
        # The C socket type without socket.socket's Python wrapper, non-blocking from creation.
        sock = _socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, _UDP_NONBLOCK)
        try:
            sock.connect((host, port))
            slot = UdpSlot(self, sock)
            self.loop.add_reader(slot.fd, slot.readable)
        except BaseException:
            sock.close()
            raise
        self.made += 1
        return slot

    def _close(self, slot: UdpSlot) -> None:
        if slot.fd >= 0:
            self.loop.remove_reader(slot.fd)
            slot.sock.close()
            slot.fd = -1
