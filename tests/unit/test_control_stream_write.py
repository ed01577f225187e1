"""The map stream's no-wait write path (server._fits): taken only when a write cannot block."""

from __future__ import annotations

import asyncio
import socket

from meshnode.control.server import _fits


def test_a_small_frame_fits_until_the_peer_stops_reading() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
        try:
            low, high = transport.get_write_buffer_limits()
            assert _fits(transport, 300)
            assert not _fits(transport, high)           # a frame as big as the high-water mark: the slow path
            # The peer reads nothing: the kernel buffer fills, then asyncio's.
            for _ in range(200):
                transport.write(b"x" * 4096)
                if transport.get_write_buffer_size() > low:
                    break
            assert transport.get_write_buffer_size() > low
            assert not _fits(transport, 300)             # behind: go through the deadline watch
        finally:
            transport.abort()
            theirs.close()

    asyncio.run(main())


def test_a_transport_without_buffer_limits_never_fits() -> None:
    assert not _fits(asyncio.BaseTransport(), 10)
