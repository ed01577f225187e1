"""DNS over TLS (RFC 7858): the TCP listener's framing and limits, over TLS with ALPN "dot".

After the handshake a DoT connection is exactly a DNS-over-TCP connection (RFC 7858 section 3.3:
two-octet length prefix, pipelining, out-of-order replies), so it is served by `tcp.TcpConnection`
unchanged: same Dispatch, allow-list, slots, idle timeout and unread-reply limits. What this module
adds is the TLS side: a bounded handshake, and slots of its own, so a flood of expensive TLS
connections cannot take the plain TCP listener's slots (or the other way round).
"""

from __future__ import annotations

import asyncio
import socket
import ssl

from .dispatch import Dispatch
from .tcp import TcpConnection, TcpSlots

DOT_PORT = 853


async def start_dot(host: str, port: int, dispatch: Dispatch, slots: TcpSlots, context: ssl.SSLContext,
                    handshake_timeout: float) -> asyncio.base_events.Server:
    """Listen for DoT on host:port (0: any free port)."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return await loop.create_server(lambda: TcpConnection(dispatch, slots), host=host, port=port, family=family,
                                    ssl=context, ssl_handshake_timeout=handshake_timeout,
                                    ssl_shutdown_timeout=handshake_timeout,
                                    reuse_address=True, backlog=1024)
