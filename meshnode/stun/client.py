"""A STUN client helper: ask a server what address and port it sees us at.

    got = await stun_query(("127.0.0.1", 3478), timeout=1.0)       # -> BindingResponse or raises
    got.ip, got.port, got.rtt

A caller that owns a UDP socket (the node's WireGuard socket) uses `message.request` and
`message.parse_response` itself; this helper opens its own socket for one-off checks and tests.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass

from .message import StunError, new_txid, parse_response, request


@dataclass(frozen=True, slots=True)
class StunResult:
    ip: str
    port: int
    rtt: float                 # seconds from the first request sent to the answer


class _Query(asyncio.DatagramProtocol):
    def __init__(self, txid: bytes) -> None:
        self.txid = txid
        self.done: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        try:
            got = parse_response(data)
        except StunError:
            return                                 # someone else's datagram: keep waiting
        if got.txid == self.txid and not self.done.done():
            self.done.set_result((got.ip, got.port))

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


async def stun_query(server: tuple[str, int], *, timeout: float = 1.0, retries: int = 3,
                     local: tuple[str, int] | None = None) -> StunResult:
    """One binding request (resent up to `retries` times within `timeout`); raises TimeoutError."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    txid = new_txid()
    transport, proto = await loop.create_datagram_endpoint(lambda: _Query(txid), family=family,
                                                           local_addr=local, remote_addr=server)
    try:
        t0 = time.monotonic()
        req = request(txid)
        for attempt in range(retries):
            transport.sendto(req)
            try:
                ip, port = await asyncio.wait_for(asyncio.shield(proto.done),
                                                  timeout / retries)
                return StunResult(ip, port, time.monotonic() - t0)
            except asyncio.TimeoutError:
                continue
        raise TimeoutError(f"no STUN answer from {server[0]}:{server[1]} within {timeout}s")
    finally:
        transport.close()
