"""A STUN server: answers binding requests on UDP with the sender's address as XOR-MAPPED-ADDRESS.

    transport, server = await start_stun_server("0.0.0.0", 3478)   # port 0: any free port
    server.port; server.stats; transport.close()

Anything that is not a binding request is counted and ignored (never answered: a STUN server must
not be a reflector for spoofed garbage).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket

from .message import NotStun, StunError, parse_request, response

log = logging.getLogger("meshnode.stun.server")


class StunServer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.stats: collections.Counter[str] = collections.Counter()
        self.port = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        try:
            txid = parse_request(data)
        except NotStun:
            self.stats["not_stun"] += 1
            return
        except StunError:
            self.stats["bad_request"] += 1
            return
        self.stats["binding_requests"] += 1
        assert self.transport is not None
        self.transport.sendto(response(txid, addr[0], addr[1]), addr)

    def error_received(self, exc: Exception) -> None:
        self.stats["errors"] += 1
        log.debug("stun: %s", exc)


async def start_stun_server(host: str, port: int) -> tuple[asyncio.DatagramTransport, StunServer]:
    """Listen on host:port. An empty host or "::" listens on IPv6 and IPv4 (dual stack)."""
    loop = asyncio.get_running_loop()
    if host in ("", "::"):
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        transport, proto = await loop.create_datagram_endpoint(StunServer, sock=sock)
    else:
        transport, proto = await loop.create_datagram_endpoint(StunServer, local_addr=(host, port))
    return transport, proto  # type: ignore[return-value]
