"""Runs the sans-I/O path layer (`meshnode.paths`) for the node's WireGuard device: disco datagrams
from the device's socket in, pings and pongs out of the same socket, WireGuard's per-peer view
polled once a second, the engine's endpoint set when a peer's path changes, ticks at the layer's
next deadline. Everything runs on the daemon's event loop except the datagram hand-off, which the
device's receive thread makes through a bounded queue."""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import logging
import threading
import time
from typing import Any, Callable, Iterable

from ..disco import DiscoKey, looks_like_disco
from ..paths import (DataPlane, Endpoint, Path, PathChanged, PathLayer, PathType, PeerInfo,
                     PingResult, SendRelay, SendUDP, format_endpoint, parse_endpoint)

log = logging.getLogger("meshnode.node.paths")

POLL = 1.0         # seconds between reads of WireGuard's per-peer state (also the longest sleep)
QUEUE_MAX = 4096   # disco datagrams waiting for the loop; beyond, they are dropped and counted
STUN_COOKIE = b"\x21\x12\xa4\x42"


def b64_key(text: str) -> bytes | None:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 32 else None


class PathRunner:
    """The path layer of one running device (see the module docstring)."""

    def __init__(self, device: Any, node_key_private: bytes,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from ..wg.crypto import public_key
        self.device = device
        self.disco_key = DiscoKey()  # a fresh one each start, as tailscaled's
        self.layer = PathLayer(self.disco_key, public_key(node_key_private))
        self._clock = clock
        self._wall_offset = time.time() - clock()
        self._inbox: collections.deque[tuple[bytes, Endpoint, float]] = collections.deque()
        self._inbox_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._pings: dict[int, asyncio.Future[PingResult]] = {}
        self.stun_handler: Callable[[bytes, Endpoint], None] | None = None  # netcheck's STUN client
        self.relay_sender: Callable[[bytes, bytes], None] | None = None     # (node key, datagram)
        self.counters: collections.Counter[str] = collections.Counter()
        self._last_poll = float("-inf")

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.device.set_datagram_handler(self._on_datagram)
        self._task = asyncio.create_task(self._run(), name="paths")

    async def close(self) -> None:
        self.device.set_datagram_handler(None)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        for fut in self._pings.values():
            fut.cancel()

    # -------------------------------------------------------------- inputs

    def set_peers(self, peers: Iterable[Any], order: Callable[[tuple[str, ...]], list[Endpoint]]) -> None:
        """The map's peers (MapNode); `order` turns reported endpoints into candidates, best guess
        first."""
        infos = []
        for p in peers:
            key = b64_key(p.node_key)
            if key is None:
                continue
            disco = b64_key(p.disco_key) if getattr(p, "disco_key", "") else None
            infos.append(PeerInfo(key, disco, tuple(order(p.endpoints)),
                                  getattr(p, "relay_region", None)))
        self.layer.set_peers(infos, self._clock())
        self._kick()

    def set_local_endpoints(self, texts: Iterable[str]) -> None:
        eps = []
        for t in texts:
            try:
                eps.append(parse_endpoint(t))
            except ValueError:
                continue
        self.layer.set_local_endpoints(eps)

    def discovered_endpoints(self) -> list[str]:
        """Our address as peers' pongs saw it (a NAT's public side): worth reporting."""
        return [format_endpoint(ep) for ep in self.layer.discovered]

    async def ping(self, node_key: bytes, timeout: float) -> PingResult | None:
        """One disco ping round to a peer; the first pong (or None after `timeout`)."""
        pid = self.layer.ping(node_key, self._clock())
        if pid is None:
            return None
        fut: asyncio.Future[PingResult] = asyncio.get_running_loop().create_future()
        self._pings[pid] = fut
        self._kick()
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            self._pings.pop(pid, None)

    # -------------------------------------------------------------- status

    def path_json(self, node_key: bytes) -> dict[str, Any]:
        path = self.layer.path(node_key) or Path(PathType.NONE, since=self._clock())
        return {"type": path.type.value,
                "endpoint": format_endpoint(path.endpoint) if path.endpoint else None,
                "relay_region": path.relay_region, "latency_ms": path.latency_ms,
                "since": round(path.since + self._wall_offset, 3), "reason": path.reason}

    def metrics(self) -> dict[str, int]:
        return {**self.layer.counters, **self.counters}

    # -------------------------------------------------------------- the loop

    def _on_datagram(self, data: bytes, src: Endpoint) -> None:
        """On the device's receive thread: queue disco for the loop, hand STUN to netcheck."""
        if looks_like_disco(data):
            with self._inbox_lock:
                if len(self._inbox) >= QUEUE_MAX:
                    self.counters["disco_queue_drops"] += 1
                    return
                first = not self._inbox
                self._inbox.append((data, src, self._clock()))
            if first and self._loop is not None:
                self._loop.call_soon_threadsafe(self._kick)
        elif len(data) >= 20 and data[4:8] == STUN_COOKIE and self.stun_handler is not None:
            self.stun_handler(data, src)
        else:
            self.counters["socket_junk"] += 1

    def receive_relayed(self, data: bytes) -> None:
        """A disco datagram that came through the relay (on the loop)."""
        self.layer.receive(data, None, self._clock())
        self._kick()

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            try:
                self._step()
            except Exception:  # a bug must not end path discovery silently
                log.exception("paths: step failed")
            deadline = self.layer.next_deadline()
            now = self._clock()
            sleep = min(POLL - (now - self._last_poll), POLL)
            if deadline is not None:
                sleep = min(sleep, deadline - now)
            if sleep > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), sleep)
                except asyncio.TimeoutError:
                    pass
            else:
                await asyncio.sleep(0)  # let the loop breathe between busy steps

    def _step(self) -> None:
        layer = self.layer
        with self._inbox_lock:
            inbox = list(self._inbox)
            self._inbox.clear()
        for data, src, at in inbox:
            layer.receive(data, src, at)
        now = self._clock()
        if now - self._last_poll >= POLL:
            self._last_poll = now
            self._poll_data_plane(now)
        layer.tick(now)
        self._apply(layer.drain())

    def _poll_data_plane(self, now: float) -> None:
        from ..wg.device import display_endpoint
        for s in self.device.stats():
            ep = display_endpoint(s.endpoint)
            self.layer.data_plane(s.public_key, DataPlane(s.last_sent, s.last_received,
                                                          s.unanswered_since, ep), now)

    def _apply(self, outputs: list[Any]) -> None:
        for out in outputs:
            if isinstance(out, SendUDP):
                self.device.send_datagram(out.data, out.endpoint)
            elif isinstance(out, SendRelay):
                if self.relay_sender is not None:
                    self.relay_sender(out.node_key, out.data)
                else:
                    self.counters["relay_unavailable"] += 1
            elif isinstance(out, PathChanged):
                self.device.set_endpoint(out.node_key, out.send_to)
                log.info("paths: %s now %s (%s)", base64.b64encode(out.node_key).decode()[:8],
                         out.path.describe(), out.path.reason)
            elif isinstance(out, PingResult):
                fut = self._pings.get(out.ping_id)
                if fut is not None and not fut.done():
                    fut.set_result(out)
