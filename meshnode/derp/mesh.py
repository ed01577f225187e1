"""A mesh link: this relay server connected, as a watching mesh client, to another server of its region.

Like Tailscale's `derphttp.RunWatchConnectionLoop`: log in with the server's own key and the region's
mesh key, send WATCH_CONNS, and turn the stream of PEER_PRESENT / PEER_GONE frames into "key K lives
behind this link". Packets for such keys go out on the same connection as FORWARD_PACKET frames.
When the link breaks, every key learned through it is forgotten until it reconnects.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .client import DerpClient
from .frames import PeerGone, PeerPresent

if TYPE_CHECKING:
    from .server import RelayServer

log = logging.getLogger("meshnode.derp.mesh")


def read_mesh_key(path: str) -> bytes:
    """A mesh key file: 64 hexadecimal digits (Tailscale's format), whitespace ignored."""
    with open(path, encoding="ascii", errors="replace") as f:
        text = f.read().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{path}: the mesh key must be 64 hexadecimal digits") from None
    if len(key) != 32:
        raise ValueError(f"{path}: the mesh key must be 64 hexadecimal digits")
    return key


class MeshLink:
    def __init__(self, server: "RelayServer", url: str) -> None:
        self.server = server
        self.url = url
        self.client = DerpClient(server.private_key, [url], mesh_key=server.mesh_key, preferred=False,
                                 watch_conns=True, on_frame=self._frame, on_connection=self._connection)

    def start(self) -> None:
        asyncio.get_running_loop().create_task(self.client.start())

    def forward(self, src: bytes, dst: bytes, packet: bytes) -> bool:
        return self.client.forward(src, dst, packet)

    def _frame(self, ev: object) -> None:
        if isinstance(ev, PeerPresent):
            self.server.mesh_peer_present(self, ev.key)
        elif isinstance(ev, PeerGone):
            self.server.mesh_peer_gone(self, ev.key)

    def _connection(self, up: bool) -> None:
        if up:
            log.info("mesh: linked to %s", self.url)
        else:
            log.info("mesh: link to %s lost", self.url)
            self.server.mesh_link_down(self)

    async def close(self) -> None:
        await self.client.close()
        self.server.mesh_link_down(self)
