"""DNS over TLS (RFC 7858), and the admission of every TLS client (DoT and DoH) before its handshake.

After the handshake a DoT connection is exactly a DNS-over-TCP connection (RFC 7858 section 3.3:
two-octet length prefix, pipelining, out-of-order replies), so it is served by `tcp.TcpConnection`
unchanged: same Dispatch, allow-list, slots, idle timeout and unread-reply limits. What this module
adds is the TLS side: the allow-list checked on the plain TCP connection *before* any TLS byte is
read or written, a bounded number of handshakes in flight, a bounded handshake time, and slots of
their own, so a flood of expensive TLS connections cannot take the plain TCP listener's slots (or
the other way round).

Why not `create_server(ssl=...)`: there the TLS layer is built at accept and the application
protocol only sees the peer once the handshake is done, so a client outside the allow-list would
get a ServerHello (and cost us the key exchange) before being refused. Why not accept plain TCP and
`loop.start_tls` after the check: uvloop starts reading right after `connection_made` whatever the
protocol asked, so a ClientHello sent at once lands in the plain protocol and is lost to TLS (the
client then waits for a ServerHello for ever: kdig stalled). So `GatedListener` accepts itself:
the listening socket is read with `add_reader`, each accepted socket's peer is checked while it is
still a bare socket (refused: closed with SO_LINGER 0, a reset, not one byte sent), and only an
admitted socket is handed to `loop.connect_accepted_socket(ssl=...)`, the library's own TLS path.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
from typing import Callable

from .dispatch import Dispatch
from .tcp import GuardedConnection, TcpConnection, TcpSlots

log = logging.getLogger("magicdns.dot")

DOT_PORT = 853


class TlsAdmission:
    """What the TLS listeners of one server share: the allow-list and counters (from Dispatch),
    the post-handshake connection slots, and the handshakes in flight."""

    def __init__(self, dispatch: Dispatch, slots: TcpSlots, handshake_timeout: float) -> None:
        self.dispatch = dispatch
        self.slots = slots
        self.handshake_timeout = handshake_timeout
        self.handshakes: set[asyncio.Task[object]] = set()  # also keeps them alive: the loop holds tasks weakly
        self.handshake_failures = 0

    def abort_all(self) -> None:
        """Drop every connection still in its handshake (listeners closing)."""
        for task in list(self.handshakes):
            task.cancel()

    def admit(self, conn: socket.socket, peer: tuple, context: ssl.SSLContext,
              app: Callable[[], GuardedConnection]) -> None:
        """One accepted socket: refused while still a bare socket, or handed to TLS."""
        c = self.dispatch.counters
        host = peer[0] if peer else ""
        if not self.dispatch.client_allowed(host):
            c.refused_clients += 1
            _reset(conn)
            return
        if len(self.handshakes) >= self.slots.limits.max_connections:
            c.tcp_rejected += 1  # handshakes cost CPU: no more of them in flight than connection slots
            _reset(conn)
            return
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._handshake(conn, context, app))
        self.handshakes.add(task)
        task.add_done_callback(self._done)

    async def _handshake(self, conn: socket.socket, context: ssl.SSLContext,
                         app: Callable[[], GuardedConnection]) -> None:
        # The TLS layer calls app().connection_made once the handshake is done; GuardedConnection
        # then takes a slot (its allow-list check passes: it is the one made here).
        await asyncio.get_running_loop().connect_accepted_socket(
            app, conn, ssl=context, ssl_handshake_timeout=self.handshake_timeout,
            ssl_shutdown_timeout=self.handshake_timeout)

    def _done(self, task: asyncio.Task[object]) -> None:
        self.handshakes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A client that speaks no TLS, offers nothing we accept, or stops mid-handshake: the
            # TLS layer has closed the socket; reading the exception keeps asyncio from logging it.
            self.handshake_failures += 1

    async def listen(self, host: str, port: int, context: ssl.SSLContext,
                     app: Callable[[], GuardedConnection]) -> "GatedListener":
        """Listen on host:port (0: any free port); admitted clients get TLS with `context`, then `app()`."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return GatedListener(self, sock, context, app)


def _reset(conn: socket.socket) -> None:
    """Close with a TCP reset: no FIN handshake to keep state for, and no byte of ours sent."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    conn.close()


class GatedListener:
    """A listening socket accepted by hand (see the module docstring); the part of
    `asyncio.Server` that the listeners use: `sockets`, `close`, `wait_closed`."""

    ACCEPT_BATCH = 64  # accepts per readiness event, so a SYN flood cannot monopolise the loop

    def __init__(self, admission: TlsAdmission, sock: socket.socket, context: ssl.SSLContext,
                 app: Callable[[], GuardedConnection]) -> None:
        self.admission = admission
        self.sockets = [sock]
        self.context = context
        self.app = app
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(sock.fileno(), self._accept)
        self.closed = False

    def _accept(self) -> None:
        sock = self.sockets[0]
        for _ in range(self.ACCEPT_BATCH):
            try:
                conn, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ENOBUFS, ECONNABORTED: this one is lost, the listener stays
                log.warning("tls accept: %s", exc.strerror)
                return
            self.admission.admit(conn, peer, self.context, self.app)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            sock = self.sockets[0]
            self.loop.remove_reader(sock.fileno())
            sock.close()

    async def wait_closed(self) -> None:
        return None  # closing is synchronous; connections are the caller's to abort


async def start_dot(admission: TlsAdmission, host: str, port: int, context: ssl.SSLContext) -> GatedListener:
    """Listen for DoT on host:port (0: any free port)."""
    return await admission.listen(host, port, context, lambda: TcpConnection(admission.dispatch, admission.slots))
