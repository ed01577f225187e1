"""The asyncio datagram listener: the fallback where batched UDP (udpbatch.py) is not available."""

from __future__ import annotations

import asyncio
import logging

from .dispatch import Dispatch

log = logging.getLogger(__name__)


class UdpListener(asyncio.DatagramProtocol):
    """One UDP socket served through asyncio's datagram transport."""

    def __init__(self, dispatch: Dispatch) -> None:
        self.dispatch = dispatch
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        dispatch = self.dispatch
        c = dispatch.counters
        c.udp += 1
        host = addr[0]
        if not dispatch.client_allowed(host):
            c.refused_clients += 1  # dropped, not answered: we are no reflector
            return
        result = dispatch.answer(data)
        if result.__class__ is bytes:
            self.transport.sendto(result, addr)  # type: ignore[union-attr, arg-type]
            if dispatch.qlog is not None:
                dispatch.qlog.write(host, data, result, "local")  # type: ignore[arg-type]
        elif result is not None:
            transport = self.transport

            def reply_to(reply: bytes) -> None:
                if not transport.is_closing():  # type: ignore[union-attr]
                    transport.sendto(reply, addr)  # type: ignore[union-attr]

            dispatch.forward(result, data, host, reply_to, False)  # type: ignore[arg-type]

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP error: %s", exc)
