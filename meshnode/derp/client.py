"""A DERP client for one relay region: what a node uses to reach peers through the relay.

API (asyncio; keys are raw 32-byte Curve25519 public keys, i.e. the node's WireGuard key)::

    client = DerpClient(node_private_key, ["https://relay-a.example/derp", "https://relay-b.example/derp"])
    await client.start()                  # connects in the background; returns at once
    await client.wait_connected(5.0)      # optional: until logged in to one server (False on timeout)
    client.send(dst_key, packet)          # never blocks; waits (bounded) for a connection; False if backed up
    client.send_many([(dst_key, packet), ...])  # the same in one write; the number accepted
    src_key, packet = await client.recv() # the next packet relayed to us (recv_many: all waiting)
    DerpClient(..., on_packets=fn)        # or: fn([(src_key, packet), ...]) per read, on the loop
    ev = await client.next_event()        # PeerGone(key, reason) / Health(problem) / Restarting(...)
    rtt = await client.ping(timeout=2.0)  # seconds, through the current server
    client.connected_url                  # the server in use, or None
    await client.close()

The URLs are the servers of ONE region, preferred first (`RelayMap.region(id).urls(control_url)` gives
them from the network map's `derp_map`). The client keeps one connection; when it
breaks (server killed, connection reset, or silent for `dead_after` seconds despite pings) it moves to
the next URL at once and keeps cycling, so a dead server is replaced within about a second.
Received packets wait in a bounded queue (`recv_queue` packets); when the reader falls behind, the
oldest are dropped and counted in `stats["recv_dropped"]`.

URL forms: `http(s)://host[:port][/derp]`; the path defaults to `/derp`. `ssl` may be an
`ssl.SSLContext` (for a private CA); https uses the default verification otherwise.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import ssl as ssl_module
import struct
import threading
import time
import urllib.parse
from typing import Callable, Sequence

from ..hostresolve import HostResolver
from .frames import (MAX_PACKET_SIZE, ForwardPacket, FrameError, FrameType, Health, KeepAlive, NotePreferred,
                     PeerGone, PeerPresent, Ping, Pong, RecvPacket, Restarting, WatchConns)
from .session import ClientInfo, ClientSession, LoggedIn

log = logging.getLogger("meshnode.derp.client")

_SEND_HEADER = struct.Struct(">BI")
MAX_HTTP_HEADER = 16 << 10
WRITE_BUFFER_LIMIT = 1 << 20        # bytes queued in the socket before send() starts dropping
# Packets sent while (re)connecting wait for the login, as Tailscale's per-region write channel
# holds them: a WireGuard handshake or disco ping sent the moment the relay is chosen (before its
# connection is up) or during a failover is then not lost to a 5 s retry. Bounded in count and age:
# after a long outage the oldest are stale and dropped.
PENDING_MAX = 64
PENDING_TTL = 2.0                   # seconds a packet may wait for the connection


class DerpConnectError(Exception):
    """Connecting or logging in to one relay server failed (the message says where and why)."""


def parse_relay_url(url: str) -> tuple[str, str, int, str, bool]:
    """(scheme, host, port, path, tls) of a relay URL; raises ValueError when it is not one."""
    u = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"not a relay URL: {url!r} (want http(s)://host[:port][/derp])")
    tls = u.scheme == "https"
    port = u.port or (443 if tls else 80)
    path = u.path if u.path not in ("", "/") else "/derp"
    return u.scheme, u.hostname, port, path, tls


class DerpClient:
    """One node's connection to one relay region (see the module docstring)."""

    def __init__(self, private_key: bytes, urls: Sequence[str], *, mesh_key: bytes | None = None,
                 ssl: ssl_module.SSLContext | None = None, connect_timeout: float = 2.0,
                 idle_ping: float = 2.0, dead_after: float = 4.5, recv_queue: int = 1024,
                 preferred: bool = True, watch_conns: bool = False,
                 on_frame: Callable[[object], None] | None = None,
                 on_connection: Callable[[bool], None] | None = None,
                 resolver: HostResolver | None = None,
                 on_packets: Callable[[list[tuple[bytes, bytes]]], None] | None = None) -> None:
        if not urls:
            raise ValueError("a relay region needs at least one server URL")
        for url in urls:
            parse_relay_url(url)
        self.private_key = private_key
        self.urls = list(urls)
        # Relay names through the system's original resolvers, never through our own DNS.
        self.resolver = resolver if resolver is not None else HostResolver()
        self.info = ClientInfo(mesh_key=mesh_key, app_name="meshnode")
        self.ssl = ssl
        self.connect_timeout = connect_timeout
        self.idle_ping = idle_ping
        self.dead_after = dead_after
        self.preferred = preferred
        self.watch_conns = watch_conns
        self.on_frame = on_frame                  # mesh links: PeerPresent / PeerGone of the server
        self.on_connection = on_connection        # called with True after login, False when it ends
        # When set, the packets of each read go to on_packets([(src, packet), ...]) at once, on the
        # loop, instead of the recv() queue: no task wake-up between the socket and the consumer.
        self.on_packets = on_packets
        self._batch: list[tuple[bytes, bytes]] | None = None  # on_packets' batch, during one read
        self._last_rx = 0.0
        self._silent: str | None = None           # why the watchdog aborted the connection
        # Writes from other threads (send_many_threadsafe) go straight to the socket's fd, when
        # the connection is plain TCP; `_wlock` orders them with the loop's writes.
        self._wlock = threading.Lock()
        self._direct_fd: int | None = None
        self._tails: list[bytes] = []             # direct writes' tails, for the loop to write
        self._loop: asyncio.AbstractEventLoop | None = None
        self.connected_url: str | None = None
        self.server_key: bytes | None = None
        self.stats: collections.Counter[str] = collections.Counter()
        # Counted by other threads as well (send_many_threadsafe): present from the start, so a
        # first count there never resizes the dict while /metrics copies it on another thread.
        self.stats.update(sent=0, send_deferred=0)
        self._queue: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._queue_max = recv_queue
        self._recv_wake = asyncio.Event()
        self._events: asyncio.Queue[object] = asyncio.Queue(maxsize=1024)
        self._writer: asyncio.StreamWriter | None = None
        self._connected = asyncio.Event()
        self._pings: dict[bytes, asyncio.Future[float]] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._index = 0
        self._since: float | None = None          # when the current connection logged in
        self._pending: collections.deque[tuple[float, bytes]] = collections.deque()  # (queued at, frame)

    # -- public API ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def wait_connected(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def send(self, dst: bytes, packet: bytes) -> bool:
        """Queue `packet` for the node with key `dst`. Never blocks. While (re)connecting, up to
        PENDING_MAX packets wait (PENDING_TTL at most) for the login; returns False (and counts the
        drop) when the client is closed or the connection is backed up."""
        if len(dst) != 32:
            raise ValueError("destination key must be 32 bytes")
        if len(packet) > MAX_PACKET_SIZE:
            raise ValueError(f"packet of {len(packet)} bytes exceeds {MAX_PACKET_SIZE}")
        w = self._writer
        if w is None or w.transport.is_closing():
            if self._closed:
                self.stats["send_dropped_disconnected"] += 1
                return False
            if len(self._pending) >= PENDING_MAX:
                self._pending.popleft()
                self.stats["send_dropped_disconnected"] += 1
            self._pending.append((time.monotonic(), _SEND_HEADER.pack(FrameType.SEND_PACKET, 32 + len(packet))
                                  + dst + packet))
            self.stats["send_pending"] += 1
            return True
        if w.transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            self.stats["send_dropped_backlog"] += 1
            return False
        self._write(w, _SEND_HEADER.pack(FrameType.SEND_PACKET, 32 + len(packet)) + dst + packet, 1)
        return True

    def send_many(self, items: Sequence[tuple[bytes, bytes]]) -> int:
        """`send` for each (dst, packet), in one write to the connection (one syscall for a
        batch, not one per packet); the number accepted. Raises ValueError, sending nothing, if
        any item is malformed."""
        for dst, packet in items:
            if len(dst) != 32 or len(packet) > MAX_PACKET_SIZE:
                raise ValueError("destination key must be 32 bytes and the packet at most "
                                 f"{MAX_PACKET_SIZE} bytes")
        w = self._writer
        if w is None or w.transport.is_closing() or w.transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            return sum(self.send(dst, packet) for dst, packet in items)  # wait for login, or drop
        pack, kind, frames = _SEND_HEADER.pack, FrameType.SEND_PACKET, []
        for dst, packet in items:
            frames += (pack(kind, 32 + len(packet)), dst, packet)
        self._write(w, b"".join(frames), len(items))
        return len(items)

    def send_many_threadsafe(self, items: Sequence[tuple[bytes, bytes]]) -> int | None:
        """`send_many` from any thread, written to the socket on the caller's thread: the relay
        path's sends then wake no event loop (a thread hand-off per batch was most of what the
        relay added to a round trip). Only on a plain TCP connection with nothing queued in the
        transport; otherwise None, and nothing is sent: use `send_many` on the loop. What the
        socket does not take at once goes to the loop, in order, before any later write.
        Items must be well-formed (as `send_many` checks)."""
        with self._wlock:
            fd, w, loop = self._direct_fd, self._writer, self._loop
            # A closing transport closes its socket on the loop's next turn: not ours to write to.
            if (fd is None or w is None or loop is None or self._tails
                    or w.transport.is_closing() or w.transport.get_write_buffer_size()):
                return None
            pack, kind, frames = _SEND_HEADER.pack, FrameType.SEND_PACKET, []
            for dst, packet in items:
                frames += (pack(kind, 32 + len(packet)), dst, packet)
            data = b"".join(frames)
            try:
                n = os.write(fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                return None  # the connection is failing: the loop finds out and reconnects
            if n < len(data):
                # The tail goes first of all the loop writes next (see _write), so no frame of the
                # loop's can land inside it.
                self._tails.append(data[n:])
                self.stats["send_deferred"] += 1
                loop.call_soon_threadsafe(self._write_tails, w)
            self.stats["sent"] += len(items)
            return len(items)

    def _write_tails(self, w: asyncio.StreamWriter) -> None:
        """On the loop: the tails of `send_many_threadsafe` writes the socket did not take."""
        with self._wlock:
            if self._writer is w and self._tails:
                w.write(b"".join(self._tails))
                self._tails.clear()

    def _write(self, w: asyncio.StreamWriter, data: bytes, packets: int = 0) -> None:
        """Every write on a logged-in connection, on the loop, serialised with the threads'
        direct writes (`send_many_threadsafe`) so frames never interleave."""
        with self._wlock:
            if self._tails:  # a thread's short write: its frame's end goes before ours
                w.write(b"".join(self._tails))
                self._tails.clear()
            w.write(data)
            if packets:
                self.stats["sent"] += packets

    def forward(self, src: bytes, dst: bytes, packet: bytes) -> bool:
        """Mesh only: hand a packet from `src` to the server for its local client `dst`."""
        w = self._writer
        if w is None or w.transport.is_closing() or w.transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            self.stats["forward_dropped"] += 1
            return False
        self._write(w, ForwardPacket(src, dst, packet).encode())
        return True

    async def recv(self) -> tuple[bytes, bytes]:
        """The next (source key, packet) relayed to us."""
        while not self._queue:
            if self._closed:
                raise ConnectionError("relay client closed")
            self._recv_wake.clear()
            await self._recv_wake.wait()
        return self._queue.popleft()

    async def recv_many(self, limit: int = 256) -> list[tuple[bytes, bytes]]:
        """Every (source key, packet) waiting, up to `limit`, at least one (waits for it)."""
        while not self._queue:
            if self._closed:
                raise ConnectionError("relay client closed")
            self._recv_wake.clear()
            await self._recv_wake.wait()
        q = self._queue
        return [q.popleft() for _ in range(min(limit, len(q)))]

    async def next_event(self) -> object:
        """The next PeerGone / Health / Restarting frame from the server."""
        return await self._events.get()

    async def ping(self, timeout: float = 2.0) -> float:
        """Round-trip time to the current server, in seconds (raises TimeoutError / ConnectionError)."""
        w = self._writer
        if w is None:
            raise ConnectionError("not connected to a relay")
        data = os.urandom(8)
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pings[data] = fut
        t0 = time.monotonic()
        self._write(w, Ping(data).encode())
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            self._pings.pop(data, None)
        return time.monotonic() - t0

    async def close(self) -> None:
        self._closed = True
        self.stats["send_dropped_disconnected"] += len(self._pending)
        self._pending.clear()
        self._recv_wake.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        self._drop_writer()
        await self.resolver.close()

    # -- connection loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while not self._closed:
            url = self.urls[self._index % len(self.urls)]
            self._since = None
            try:
                await self._session(url)
            except (OSError, asyncio.TimeoutError, DerpConnectError, FrameError, EOFError) as exc:
                log.info("relay %s: %s", url, exc)
                if self._since is None:
                    self.stats["connect_failures"] += 1
            finally:
                was = self.connected_url is not None
                self._drop_writer()
                if was and self.on_connection is not None:
                    self.on_connection(False)
            if self._closed:
                return
            # A connection that lasted resets the back-off; one dropped right after login does not,
            # so a server that accepts and closes at once is not hammered.
            lasted = self._since is not None and time.monotonic() - self._since > 1.0
            failures = 0 if lasted else failures + 1
            self._index += 1
            # A whole round of servers failed: back off a little (capped) before the next round.
            if failures and failures % len(self.urls) == 0:
                await asyncio.sleep(min(0.1 * 2 ** (failures // len(self.urls)), 2.0))

    def _drop_writer(self) -> None:
        with self._wlock:  # before the socket closes (its fd number may then be reused)
            self._direct_fd = None
        self._connected.clear()
        self.connected_url = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(ConnectionError("relay connection lost"))
        self._pings.clear()

    async def _session(self, url: str) -> None:
        _, host, port, path, tls = parse_relay_url(url)
        ctx = (self.ssl or ssl_module.create_default_context()) if tls else None
        reader, writer = await self._dial(host, port, ctx)
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hostport = host if ":" not in host else f"[{host}]"
            writer.write((f"GET {path} HTTP/1.1\r\nHost: {hostport}:{port}\r\nUpgrade: DERP\r\n"
                          "Connection: Upgrade\r\nUser-Agent: meshnode-derp\r\n\r\n").encode())
            rest = await asyncio.wait_for(self._upgrade(reader, url), self.connect_timeout)
            session = ClientSession(self.private_key, self.info)
            logged_in = False
            deadline = time.monotonic() + self.connect_timeout
            pending = rest
            while not logged_in:
                for ev in session.receive(pending):
                    if isinstance(ev, LoggedIn):
                        logged_in = True
                        self.server_key = ev.server_key
                    else:
                        self._on_event(ev)
                out = session.take_output()
                if out:
                    writer.write(out)
                if logged_in:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DerpConnectError(f"{url}: login timed out")
                pending = await asyncio.wait_for(reader.read(65536), left)
                if not pending:
                    raise DerpConnectError(f"{url}: server closed the connection during login")
        except BaseException:
            writer.close()
            raise
        if self.preferred:
            writer.write(NotePreferred(True).encode())
        if self.watch_conns:
            writer.write(WatchConns().encode())
        self._writer = writer
        self.connected_url = url
        self._since = time.monotonic()
        self._flush_pending(writer, self._since)
        sock = writer.get_extra_info("socket")
        if not tls and sock is not None:
            with self._wlock:  # threads may write to this socket directly from now on
                self._loop = asyncio.get_running_loop()
                self._direct_fd = sock.fileno()
                self._tails.clear()
        self._connected.set()
        self.stats["connects"] += 1
        log.info("relay: connected to %s", url)
        if self.on_connection is not None:
            self.on_connection(True)
        await self._read_loop(reader, writer, session)

    def _flush_pending(self, writer: asyncio.StreamWriter, now: float) -> None:
        """Send what waited for this connection; what waited too long is dropped and counted."""
        pending, self._pending = self._pending, collections.deque()
        fresh = [frame for at, frame in pending if now - at <= PENDING_TTL]
        self.stats["send_dropped_disconnected"] += len(pending) - len(fresh)
        if fresh:
            self._write(writer, b"".join(fresh), len(fresh))

    async def _dial(self, host: str, port: int, ctx: ssl_module.SSLContext | None
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Each address of `host` in turn (the one that answered last first); TLS checks `host`."""
        addrs = await asyncio.wait_for(self.resolver.addresses(host), self.connect_timeout)
        last: BaseException = OSError(f"{host}: no address")
        for addr in addrs:
            try:
                conn = await asyncio.wait_for(
                    asyncio.open_connection(str(addr), port, ssl=ctx, server_hostname=host if ctx else None),
                    self.connect_timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                last = exc
                continue
            self.resolver.prefer(host, str(addr))
            return conn
        raise last

    async def _upgrade(self, reader: asyncio.StreamReader, url: str) -> bytes:
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = await reader.read(4096)
            if not chunk:
                raise DerpConnectError(f"{url}: connection closed before the HTTP upgrade")
            buf += chunk
            if len(buf) > MAX_HTTP_HEADER:
                raise DerpConnectError(f"{url}: HTTP response header too long")
        head, rest = buf.split(b"\r\n\r\n", 1)
        status = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status.split(" ", 2)
        if len(parts) < 2 or parts[1] != "101":
            raise DerpConnectError(f"{url}: the server did not upgrade to DERP ({status!r})")
        return rest

    async def _read_loop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         session: ClientSession) -> None:
        """Until the connection ends (raises why). After the login the stream reader steps aside:
        frames are handled in the transport's data_received, with no task wake-up per read (a
        loop turn on every relayed packet's way), and liveness runs in a task of its own (a
        wait_for per read made a task per read in Python 3.11)."""
        self._last_rx = time.monotonic()
        self._silent = None
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        proto = _Frames(self, session, writer, done)
        # Read from the socket during the login but not handled yet (StreamReader has no public
        # way to take its buffer; the attribute has been there since asyncio began).
        leftover = bytes(reader._buffer)
        reader._buffer.clear()
        writer.transport.set_protocol(proto)
        if self.on_packets is not None and self._queue:  # came in the login's last read
            early = list(self._queue)
            self._queue.clear()
            try:
                self.on_packets(early)
            except Exception:
                log.exception("relay: packet handler failed")
        if not writer.transport.is_reading():  # the stream reader paused it (a full buffer)
            writer.transport.resume_reading()
        if leftover:
            proto.data_received(leftover)
        if reader.at_eof() and not done.done():
            done.set_exception(EOFError(f"{self.connected_url}: the server closed the connection"))
        watchdog = asyncio.create_task(self._watchdog(writer))
        try:
            await done
        finally:
            watchdog.cancel()
            if not done.done():
                done.cancel()

    def _on_data(self, data: bytes, session: ClientSession, writer: asyncio.StreamWriter) -> None:
        """Bytes from the server: frames to events, relayed packets to `on_packets` or the queue."""
        self._last_rx = time.monotonic()
        on_packets = self.on_packets
        if on_packets is None:
            for ev in session.receive(data):
                self._on_event(ev)
        else:
            self._batch = batch = []
            try:
                for ev in session.receive(data):
                    self._on_event(ev)
            finally:
                self._batch = None
            if batch:
                try:
                    on_packets(batch)
                except Exception:  # the consumer's bug must not drop the connection
                    log.exception("relay: packet handler failed")
        out = session.take_output()
        if out:
            self._write(writer, out)

    async def _watchdog(self, writer: asyncio.StreamWriter) -> None:
        """Ping after `idle_ping` s without a frame; abort the connection after `dead_after` s (the
        read loop then raises DerpConnectError)."""
        pinged_for: float | None = None       # the _last_rx our ping went out after
        while True:
            last = self._last_rx
            since = time.monotonic() - last
            if since >= self.dead_after:
                self._silent = f"{self.connected_url}: silent for {since:.1f}s"
                writer.transport.abort()
                return
            if since >= self.idle_ping and pinged_for != last:
                self._write(writer, Ping(os.urandom(8)).encode())  # liveness probe; any frame answers it
                pinged_for = last
            wait = (self.idle_ping - since) if pinged_for != last else (self.dead_after - since)
            await asyncio.sleep(max(wait, 0.01))

    def _on_event(self, ev: object) -> None:
        if isinstance(ev, RecvPacket):
            self.stats["received"] += 1
            if self._batch is not None:
                self._batch.append((ev.src, ev.packet))
                return
            q = self._queue
            if len(q) >= self._queue_max:
                q.popleft()
                self.stats["recv_dropped"] += 1
            q.append((ev.src, ev.packet))
            self._recv_wake.set()
        elif isinstance(ev, Pong):
            fut = self._pings.get(ev.data)
            if fut is not None and not fut.done():
                fut.set_result(time.monotonic())
        elif isinstance(ev, (PeerGone, PeerPresent)) and self.on_frame is not None:
            self.on_frame(ev)
        elif isinstance(ev, (PeerGone, Health, Restarting)):
            try:
                self._events.put_nowait(ev)
            except asyncio.QueueFull:
                self.stats["events_dropped"] += 1
        elif isinstance(ev, (KeepAlive, Ping)):
            pass


class _Frames(asyncio.Protocol):
    """The transport's protocol once logged in: bytes straight to `DerpClient._on_data`; the end
    of the connection (and why) to `done`."""

    def __init__(self, client: DerpClient, session: ClientSession, writer: asyncio.StreamWriter,
                 done: asyncio.Future[None]) -> None:
        self.client, self.session, self.writer, self.done = client, session, writer, done
        # The stream protocol still does the writer's flow control (StreamWriter.drain).
        self.streams = writer.transport.get_protocol()

    def pause_writing(self) -> None:
        self.streams.pause_writing()

    def resume_writing(self) -> None:
        self.streams.resume_writing()

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        try:
            self.client._on_data(data, self.session, self.writer)
        except Exception as exc:  # a malformed stream (FrameError...): this connection is over
            self.done.set_exception(exc)
            self.writer.transport.abort()

    def eof_received(self) -> bool:
        self._end(EOFError(f"{self.client.connected_url}: the server closed the connection"))
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.streams.connection_lost(exc)  # wakes drain() waiters, closes the stream reader
        silent = self.client._silent
        if silent is not None:
            self._end(DerpConnectError(silent))
        else:
            self._end(exc if exc is not None else
                      EOFError(f"{self.client.connected_url}: the connection closed"))

    def _end(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
