"""The DERP relay server: Tailscale's protocol over an HTTP upgrade on `/derp`, in any aiohttp app.

    relay = RelayServer(private_key, admit=lambda key: key in tailnet_keys)
    relay.attach(app)            # /derp, /derp/probe, /derp/latency-check, /generate_204
    await relay.start()          # mesh links (if any); then serve `app` as usual
    relay.disconnect(key)        # drop a key at once; relay.recheck() re-asks `admit` for every client

What it guarantees:
- Only keys `admit` accepts (and mesh peers holding the mesh key) are served; others get a health
  frame saying why and are closed.
- Frames go straight into a client's socket while it keeps up. A client that stops reading gets two
  bounded queues (disco first, then data); when one is full the oldest packet is dropped and counted
  (`drops[reason]`): a slow reader loses only its own packets, and no sender ever waits on it.
- A client that disconnects is announced (peer gone) to every client it had sent to.
- Meshing: with `mesh_with` URLs and a mesh key, this server connects to each other server of its
  region as a watcher, learns which keys live there and forwards one hop to them; packets forwarded
  to us are delivered locally only (never re-forwarded).

Bytes are handled by `session.ServerSession`; this module only moves them. Connection bytes arrive
through aiohttp's upgraded-connection parser hook (`protocol.set_parser`, the mechanism its own
WebSocket support uses) so the relay shares the control server's listener.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import struct
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from aiohttp import web

from .frames import (FrameError, FrameType, ForwardPacket, Health, KeepAlive, NotePreferred, PeerGone,
                     PeerGoneReason, PeerPresent, PeerPresentFlags, Ping, SendPacket, WatchConns, ClosePeer,
                     KEEPALIVE_SECONDS, PROTOCOL_VERSION, looks_like_disco)
from .mesh import MeshLink
from .session import ClientHello, ServerSession, public_key

log = logging.getLogger("meshnode.derp.server")

_RECV_HEADER = struct.Struct(">BI")
LOGIN_TIMEOUT = 10.0
WRITE_HIGH_WATER = 256 << 10     # bytes buffered for one client before its frames queue (and may drop)
NOT_HERE_INTERVAL = 1.0          # at most one "peer not here" per destination and second, as Tailscale's


class DropReason(enum.Enum):
    UNKNOWN_DEST = "unknown_dest"
    UNKNOWN_DEST_ON_FWD = "unknown_dest_on_fwd"
    GONE_DISCONNECTED = "gone_disconnected"
    QUEUE_HEAD = "queue_head"
    WRITE_ERROR = "write_error"


class Forwarder(Protocol):
    """Where a key that lives on another server of the region is reached (a mesh link)."""

    def forward(self, src: bytes, dst: bytes, packet: bytes) -> bool: ...


@dataclass(frozen=True, slots=True)
class RelayStats:
    """A snapshot of the relay's counters (for /metrics and tests)."""

    clients: int
    mesh_peers: int
    packets_relayed: int
    bytes_relayed: int
    packets_forwarded_out: int
    packets_forwarded_in: int
    refused: int
    protocol_errors: int
    drops: dict[str, int]


class _Feeder:
    """What aiohttp's protocol feeds after the upgrade (the `set_parser` interface)."""

    def __init__(self, conn: "_Conn") -> None:
        self.conn = conn

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.conn.on_data(bytes(data))
        return False, b""

    def feed_eof(self) -> None:
        self.conn.close("eof")


class _Conn:
    """One client connection: its session, queues and writer."""

    def __init__(self, server: "RelayServer", request: web.Request, writer: object) -> None:
        self.server = server
        self.request = request
        self.writer = writer
        self.transport = request.transport
        self.remote = request.remote or "?"
        self.session = ServerSession(server.private_key, server.mesh_key)
        self.key: bytes | None = None
        self.ready = False
        self.closed = False
        self.done = asyncio.get_running_loop().create_future()
        self.ctrl: collections.deque[bytes] = collections.deque()
        self.disco: collections.deque[bytes] = collections.deque()
        self.data: collections.deque[bytes] = collections.deque()
        self.wake = asyncio.Event()
        self.sent_to: set[bytes] = set()         # keys this client sent to: told when it leaves
        self.not_here_at: dict[bytes, float] = {}
        self.preferred = False
        self.mesh = False                        # a server of our region (holds the mesh key)
        self.logged_in = asyncio.Event()
        self.drops = 0

    # -- input ------------------------------------------------------------------------------

    def on_data(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.session.receive(data)
            for ev in events:
                self._event(ev)
                if self.closed:
                    return
            out = self.session.take_output()
            if out:
                self.queue_ctrl(out)
        except FrameError as exc:
            self.server.protocol_errors += 1
            log.info("derp: closing %s (%s): %s", self.remote, self.key.hex()[:16] if self.key else "-", exc)
            self.close("protocol error")

    def _event(self, ev: object) -> None:
        server = self.server
        if isinstance(ev, SendPacket):
            server.route(self, ev.dst, ev.packet)
        elif isinstance(ev, ClientHello):
            if not server.register(self, ev):
                return
            info, held = self.session.accept()
            self.queue_ctrl(info)
            for e in held:
                self._event(e)
        elif isinstance(ev, ForwardPacket):
            server.packets_forwarded_in += 1
            server.deliver(ev.src, ev.dst, ev.packet, forwarded=True)
        elif isinstance(ev, NotePreferred):
            self.preferred = ev.preferred
        elif isinstance(ev, WatchConns):
            server.add_watcher(self)
        elif isinstance(ev, ClosePeer):
            server.disconnect(ev.key)
        elif isinstance(ev, Ping):
            pass  # the session queued the pong

    # -- output -----------------------------------------------------------------------------

    # Frames go straight into the transport while its buffer is below the high-water mark, so a
    # reader that keeps up costs no queueing and no task switch. Once a client stops reading, its
    # buffer fills, frames wait in its bounded queues (disco first), and the oldest are dropped.

    def queue_ctrl(self, frame: bytes) -> None:
        if not self.ctrl and not self.disco and not self.data and self._can_write():
            self.transport.write(frame)  # type: ignore[union-attr]
            return
        if len(self.ctrl) >= 4096:
            self.close("control queue overflow")   # a watcher or client that never reads
            return
        self.ctrl.append(frame)
        self.wake.set()

    def queue_packet(self, src: bytes, packet: bytes) -> None:
        """Send a RecvPacket frame, or queue it; the oldest is dropped (and counted) when the queue is full."""
        frame = _RECV_HEADER.pack(FrameType.RECV_PACKET, 32 + len(packet)) + src + packet
        if not self.ctrl and not self.disco and not self.data and self._can_write():
            self.transport.write(frame)  # type: ignore[union-attr]
            return
        q = self.disco if looks_like_disco(packet) else self.data
        if len(q) >= self.server.queue_depth:
            q.popleft()
            self.drops += 1
            self.server.count_drop(DropReason.QUEUE_HEAD)
        q.append(frame)
        self.wake.set()

    def _can_write(self) -> bool:
        t = self.transport
        return t is not None and not self.closed and t.get_write_buffer_size() < WRITE_HIGH_WATER

    async def write_loop(self) -> None:
        try:
            while not self.closed:
                await self.wake.wait()
                self.wake.clear()
                while (self.ctrl or self.disco or self.data) and not self.closed:
                    if not self._can_write():
                        await self.writer.drain()  # type: ignore[attr-defined]  # until the reader catches up
                        if not self._can_write():
                            await asyncio.sleep(0.005)
                            continue
                    chunks = list(self.ctrl)
                    self.ctrl.clear()
                    chunks.extend(self.disco)
                    self.disco.clear()
                    for _ in range(min(len(self.data), 64)):
                        chunks.append(self.data.popleft())
                    self.transport.write(b"".join(chunks))  # type: ignore[union-attr]
        except (ConnectionError, RuntimeError, OSError) as exc:
            self.server.count_drop(DropReason.WRITE_ERROR, len(self.data) + len(self.disco))
            self.close(f"write failed: {exc}")

    def flush_and_close(self, why: str) -> None:
        """Write whatever is queued (a last health frame), then close: transports flush on close."""
        if self.transport is not None and not self.closed:
            self.transport.write(b"".join([*self.ctrl, *self.disco, *self.data]))
            self.ctrl.clear()
            self.disco.clear()
            self.data.clear()
        self.close(why)

    def close(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        log.debug("derp: connection %s closed: %s", self.remote, why)
        self.wake.set()
        pending = len(self.data) + len(self.disco)
        if pending and self.ready:
            self.server.count_drop(DropReason.GONE_DISCONNECTED, pending)
        self.server.unregister(self)
        if self.transport is not None:
            self.transport.close()
        if not self.done.done():
            self.done.set_result(None)


class RelayServer:
    """The relay: connections by key, the mesh map, counters."""

    def __init__(self, private_key: bytes, *, admit: Callable[[bytes], bool] | None = None,
                 mesh_key: bytes | None = None, mesh_with: tuple[str, ...] = (), queue_depth: int = 64,
                 keepalive: float = KEEPALIVE_SECONDS, login_timeout: float = LOGIN_TIMEOUT) -> None:
        self.private_key = private_key
        self.public_key = public_key(private_key)
        self.admit = admit
        self.mesh_key = mesh_key
        self.mesh_with = tuple(mesh_with)
        self.queue_depth = queue_depth
        self.keepalive = keepalive
        self.login_timeout = login_timeout
        self.clients: dict[bytes, _Conn] = {}
        self.mesh_clients: dict[bytes, Forwarder] = {}   # key -> the mesh link it lives behind
        self.watchers: set[_Conn] = set()
        self.packets_relayed = 0
        self.bytes_relayed = 0
        self.packets_forwarded_out = 0
        self.packets_forwarded_in = 0
        self.refused = 0
        self.protocol_errors = 0
        self.drops: collections.Counter[str] = collections.Counter()
        self._links: list[MeshLink] = []
        self._conns: set[_Conn] = set()

    # -- HTTP ---------------------------------------------------------------------------------

    def attach(self, app: web.Application) -> None:
        app.router.add_get("/derp", self.handle_derp)
        app.router.add_route("*", "/derp/probe", handle_probe)
        app.router.add_route("*", "/derp/latency-check", handle_probe)
        app.router.add_get("/generate_204", handle_no_content)
        app.on_shutdown.append(self._on_shutdown)

    async def _on_shutdown(self, _app: web.Application) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the mesh links (nothing else needs starting)."""
        if self.mesh_with and not self.mesh_key:
            raise ValueError("meshing needs a mesh key")
        for url in self.mesh_with:
            link = MeshLink(self, url)
            link.start()
            self._links.append(link)

    async def stop(self) -> None:
        links, self._links = self._links, []
        for link in links:
            await link.close()
        for conn in list(self._conns):
            conn.close("server stopping")

    async def handle_derp(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "derp":
            return web.Response(status=426, text="DERP requires connection upgrade\n")
        resp = web.StreamResponse(status=101, reason="Switching Protocols", headers={
            "Upgrade": "DERP", "Connection": "Upgrade", "Derp-Version": str(PROTOCOL_VERSION),
            "Derp-Public-Key": self.public_key.hex()})
        resp.force_close()
        writer = await resp.prepare(request)
        conn = _Conn(self, request, writer)
        self._conns.add(conn)
        writer_task = asyncio.create_task(conn.write_loop())
        conn.queue_ctrl(conn.session.greeting())
        request.protocol.set_parser(_Feeder(conn))  # type: ignore[arg-type]
        request.protocol.keep_alive(False)
        try:
            login = asyncio.ensure_future(conn.logged_in.wait())
            await asyncio.wait([login, conn.done], timeout=self.login_timeout, return_when=asyncio.FIRST_COMPLETED)
            login.cancel()
            if not conn.ready:
                conn.close("login timeout")
            while not conn.done.done():
                try:
                    await asyncio.wait_for(asyncio.shield(conn.done), self.keepalive)
                except asyncio.TimeoutError:
                    conn.queue_ctrl(KeepAlive().encode())
        finally:
            conn.close("handler ended")
            self._conns.discard(conn)
            writer_task.cancel()
            try:
                await writer_task
            except (asyncio.CancelledError, Exception):
                pass
        return resp

    # -- registry -----------------------------------------------------------------------------

    def register(self, conn: _Conn, hello: ClientHello) -> bool:
        key = hello.key
        mesh = conn.session.can_mesh
        if not mesh and not (self.admit is None or self.admit(key)):
            self.refused += 1
            log.info("derp: refused key %s from %s (not in the tailnet)", key.hex()[:16], conn.remote)
            conn.ctrl.append(Health("this node key is not allowed on this relay").encode())
            conn.flush_and_close("not admitted")
            return False
        old = self.clients.get(key)
        conn.key = key
        conn.ready = True
        conn.mesh = mesh
        self.clients[key] = conn
        if old is not None and old is not conn:
            old.ctrl.append(Health("another connection with this node key replaced this one").encode())
            old.key = None      # its close must not unregister the new connection
            old.flush_and_close("replaced by a newer connection")
        if not mesh:
            self.mesh_clients.pop(key, None)
            peer_ip, port = _peer_addr(conn)
            for w in self.watchers:
                w.queue_ctrl(PeerPresent(key, peer_ip, port, PeerPresentFlags.REGULAR).encode())
        conn.logged_in.set()
        return True

    def unregister(self, conn: _Conn) -> None:
        self.watchers.discard(conn)
        key = conn.key
        if key is None or self.clients.get(key) is not conn:
            return
        del self.clients[key]
        if conn.mesh:
            return
        gone = PeerGone(key, PeerGoneReason.DISCONNECTED).encode()
        for peer in conn.sent_to:
            other = self.clients.get(peer)
            if other is not None:
                other.queue_ctrl(gone)
        for w in self.watchers:
            w.queue_ctrl(gone)

    def add_watcher(self, conn: _Conn) -> None:
        self.watchers.add(conn)
        for key, c in self.clients.items():
            if not c.mesh:
                ip, port = _peer_addr(c)
                conn.queue_ctrl(PeerPresent(key, ip, port, PeerPresentFlags.REGULAR).encode())

    def disconnect(self, key: bytes) -> bool:
        """Close every connection of `key` now; True if there was one."""
        conn = self.clients.get(key)
        if conn is None:
            return False
        conn.ctrl.append(Health("disconnected by the relay operator").encode())
        conn.flush_and_close("disconnected")
        return True

    def recheck(self) -> int:
        """Ask `admit` again about every connected (non-mesh) client; close those it refuses now."""
        if self.admit is None:
            return 0
        gone = [k for k, c in self.clients.items() if not c.mesh and not self.admit(k)]
        for key in gone:
            self.disconnect(key)
        return len(gone)

    # -- packets ------------------------------------------------------------------------------

    def route(self, src: _Conn, dst: bytes, packet: bytes) -> None:
        """A client's SendPacket: to a local client, over a mesh link, or dropped with 'not here'."""
        assert src.key is not None
        if dst not in src.sent_to and len(src.sent_to) < 65536:
            src.sent_to.add(dst)
        if self.deliver(src.key, dst, packet, forwarded=False):
            return
        link = self.mesh_clients.get(dst)
        if link is not None:
            self.packets_forwarded_out += 1
            if not link.forward(src.key, dst, packet):
                self.count_drop(DropReason.WRITE_ERROR)      # the link is down or backed up
            return
        self.count_drop(DropReason.UNKNOWN_DEST)
        now = time.monotonic()
        if now - src.not_here_at.get(dst, -1e9) >= NOT_HERE_INTERVAL:
            if len(src.not_here_at) > 4096:
                src.not_here_at.clear()
            src.not_here_at[dst] = now
            src.queue_ctrl(PeerGone(dst, PeerGoneReason.NOT_HERE).encode())

    def deliver(self, src: bytes, dst: bytes, packet: bytes, *, forwarded: bool) -> bool:
        conn = self.clients.get(dst)
        if conn is None or conn.closed or conn.mesh:
            if forwarded:
                self.count_drop(DropReason.UNKNOWN_DEST_ON_FWD)
            return False
        self.packets_relayed += 1
        self.bytes_relayed += len(packet)
        conn.queue_packet(src, packet)
        return True

    def count_drop(self, reason: DropReason, n: int = 1) -> None:
        self.drops[reason.value] += n

    # -- mesh (called by MeshLink) ------------------------------------------------------------

    def mesh_peer_present(self, link: Forwarder, key: bytes) -> None:
        if key != self.public_key and key not in self.clients:
            self.mesh_clients[key] = link

    def mesh_peer_gone(self, link: Forwarder, key: bytes) -> None:
        if self.mesh_clients.get(key) is link:
            del self.mesh_clients[key]
            # Tell local clients that talked to it, so their reverse paths are forgotten.
            gone = PeerGone(key, PeerGoneReason.DISCONNECTED).encode()
            for c in self.clients.values():
                if key in c.sent_to:
                    c.queue_ctrl(gone)

    def mesh_link_down(self, link: Forwarder) -> None:
        for key in [k for k, lk in self.mesh_clients.items() if lk is link]:
            del self.mesh_clients[key]

    # -- observability ------------------------------------------------------------------------

    def stats(self) -> RelayStats:
        return RelayStats(clients=sum(1 for c in self.clients.values() if not c.mesh),
                          mesh_peers=len(self.mesh_clients), packets_relayed=self.packets_relayed,
                          bytes_relayed=self.bytes_relayed, packets_forwarded_out=self.packets_forwarded_out,
                          packets_forwarded_in=self.packets_forwarded_in, refused=self.refused,
                          protocol_errors=self.protocol_errors, drops=dict(self.drops))

    def metrics_lines(self) -> list[str]:
        """Prometheus text lines (without a trailing newline)."""
        s = self.stats()
        lines = [f"meshnode_derp_clients {s.clients}", f"meshnode_derp_mesh_known_keys {s.mesh_peers}",
                 f"meshnode_derp_packets_relayed_total {s.packets_relayed}",
                 f"meshnode_derp_bytes_relayed_total {s.bytes_relayed}",
                 f"meshnode_derp_packets_forwarded_out_total {s.packets_forwarded_out}",
                 f"meshnode_derp_packets_forwarded_in_total {s.packets_forwarded_in}",
                 f"meshnode_derp_refused_total {s.refused}",
                 f"meshnode_derp_protocol_errors_total {s.protocol_errors}"]
        for reason in DropReason:
            lines.append(f'meshnode_derp_drops_total{{reason="{reason.value}"}} {s.drops.get(reason.value, 0)}')
        return lines


def _peer_addr(conn: _Conn) -> tuple[str | None, int]:
    peer = conn.transport.get_extra_info("peername") if conn.transport is not None else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0]), int(peer[1])
    return None, 0


async def handle_probe(request: web.Request) -> web.Response:
    """`/derp/probe`: an HTTP latency check for clients without UDP (as Tailscale's ProbeHandler)."""
    if request.method not in ("GET", "HEAD"):
        return web.Response(status=405, text="bogus probe method\n")
    return web.Response(status=200, headers={"Access-Control-Allow-Origin": "*"})


def _challenge_ok(c: str) -> bool:
    return len(c) <= 64 and all(ch.isascii() and (ch.isalnum() or ch in ".-_:") for ch in c)


async def handle_no_content(request: web.Request) -> web.Response:
    """`/generate_204`: captive-portal detection; echoes Tailscale's challenge header."""
    headers = {"Cache-Control": "no-cache, no-store, must-revalidate, no-transform, max-age=0"}
    challenge = request.headers.get("X-Tailscale-Challenge", "")
    if challenge and _challenge_ok(challenge):
        headers["X-Tailscale-Response"] = "response " + challenge
    return web.Response(status=204, headers=headers)
