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
from ..wg.device import relay_endpoint
from ..paths import (DataPlane, Endpoint, Path, PathChanged, PathLayer, PathType, PeerInfo,
                     PingResult, SendRelay, SendUDP, format_endpoint, parse_endpoint)

log = logging.getLogger("meshnode.node.paths")

POLL = 1.0         # seconds between reads of WireGuard's per-peer state (also the longest sleep)
QUEUE_MAX = 4096   # disco datagrams waiting for the loop; beyond, they are dropped and counted
RELAY_OUT_MAX = 4096  # WireGuard datagrams waiting for the loop to relay them; beyond, dropped and counted
STUN_COOKIE = b"\x21\x12\xa4\x42"
STUN_INTERVAL = 20.0  # seconds between STUN queries (Tailscale re-STUNs every 20-26 s)


def b64_key(text: str) -> bytes | None:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 32 else None


def _latest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


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
        self.counters: collections.Counter[str] = collections.Counter()
        # Counted by the device threads as well (direct relay writes): present from the start, so
        # a first count from another thread never resizes the dict while the loop reads it.
        self.counters.update(relay_sent=0, relay_bytes_sent=0)
        self._last_poll = float("-inf")
        self._bytes: dict[bytes, tuple[Any, ...]] = {}  # per peer: what WireGuard said last poll
        self._private = node_key_private
        # The relay (DERP) of our home region: a client, its region and URLs, and peer ids for
        # the device's relay endpoints.
        self.relay: Any = None
        self.relay_region: int | None = None
        self._relay_urls: tuple[str, ...] = ()
        self._relay_ids: dict[bytes, int] = {}
        self._relay_keys: dict[int, bytes] = {}
        self._peers: list[Any] = []
        # Peers homed on another region: its servers (from the relay map), a client per such
        # region with its reader task, and each peer's region.
        self._region_urls: dict[int, tuple[str, ...]] = {}
        self._others: dict[int, Any] = {}
        # WireGuard datagrams from the device's threads for the relay, waiting for the loop.
        self._out: list[tuple[bytes, Any]] = []
        self._out_lock = threading.Lock()
        self._out_dropped = 0
        self._peer_region: dict[bytes, int | None] = {}
        # STUN servers of the relay region: our public address as they see the WireGuard socket.
        self._stun_servers: tuple[Endpoint, ...] = ()
        self._stun_txids: dict[bytes, float] = {}
        self._last_stun = float("-inf")
        self.stun_endpoint: Endpoint | None = None
        self._order: Callable[[tuple[str, ...]], list[Endpoint]] = lambda texts: []

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.device.set_datagram_handler(self._on_datagram)
        self.device.relay_out = self._relay_out
        self._task = asyncio.create_task(self._run(), name="paths")

    async def close(self) -> None:
        self.device.set_datagram_handler(None)
        self.device.relay_out = None
        await self.set_relay(None, ())
        for client in self._others.values():
            await client.close()
        self._others.clear()
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
        self._peers, self._order = list(peers), order
        infos = []
        regions: dict[bytes, int | None] = {}
        for p in self._peers:
            key = b64_key(p.node_key)
            if key is None:
                continue
            disco = b64_key(p.disco_key) if getattr(p, "disco_key", "") else None
            # A peer's relay traffic goes to its home region when the map names one we have servers
            # for; otherwise (an older control server) it is taken to home where we do.
            home = getattr(p, "home_region", None)
            region = home if home is not None and home in self._region_urls else self.relay_region
            regions[key] = region
            infos.append(PeerInfo(key, disco, tuple(order(p.endpoints)), region))
        self._peer_region = regions
        self._sync_other_regions()
        self.layer.set_peers(infos, self._clock())
        self._kick()

    def set_relay_regions(self, urls: dict[int, Iterable[str]]) -> None:
        """Every region of the relay map with its server URLs (for peers homed elsewhere)."""
        self._region_urls = {int(r): tuple(u) for r, u in urls.items() if u}

    def _sync_other_regions(self) -> None:
        """A DERP client for each region a peer homes on that is not ours; none for the others."""
        if self._loop is None:
            return
        from ..derp.client import DerpClient
        # Without a home relay (the first map, before set_relay; or closing) there is no "other"
        # region yet: a client made now could be for the home-to-be, a second connection with our
        # key that replaces the home one at the server, only to be closed a moment later.
        wanted = ({r for r in self._peer_region.values() if r is not None and r != self.relay_region}
                  if self.relay is not None else set())
        for region in [r for r in self._others if r not in wanted
                       or self._others[r].urls != list(self._region_urls.get(r, ()))]:
            asyncio.ensure_future(self._others.pop(region).close())
        for region in wanted - set(self._others):
            client = DerpClient(self._private, list(self._region_urls[region]), on_packets=self._on_relayed)
            asyncio.ensure_future(client.start())
            self._others[region] = client
            log.info("paths: relay region %s for peers homed there", region)

    def _client(self, key: bytes) -> Any:
        """The DERP client that reaches the peer `key` (its home region's, or ours)."""
        region = self._peer_region.get(key, self.relay_region)
        if region is None or region == self.relay_region:
            return self.relay
        return self._others.get(region)

    async def set_relay(self, region_id: int | None, urls: Iterable[str]) -> None:
        """Use the relay servers `urls` of region `region_id` (None: no relay)."""
        urls = tuple(urls)
        if region_id == self.relay_region and urls == self._relay_urls:
            return
        old = self.relay
        self.relay, self.relay_region, self._relay_urls = None, None, ()
        if old is not None:
            await old.close()
        if region_id is not None and urls:
            from ..derp.client import DerpClient
            self.relay = DerpClient(self._private, list(urls), on_packets=self._on_relayed)
            await self.relay.start()
            self.relay_region, self._relay_urls = region_id, urls
            log.info("paths: relay region %s at %s", region_id, ", ".join(urls))
        # Traffic to a peer with no direct path goes through the relay at once.
        self.layer.set_relay(self.relay_region, self._clock())
        self.set_peers(self._peers, self._order)

    def set_stun_servers(self, servers: Iterable[Endpoint]) -> None:
        """STUN servers (ip, port) to learn our public address from; asked now and every
        STUN_INTERVAL from the WireGuard socket, so the mapping found is the one peers will use."""
        servers = tuple(servers)
        if servers != self._stun_servers:
            self._stun_servers, self._last_stun = servers, float("-inf")
            self._kick()

    def _stun(self, now: float) -> None:
        from ..stun.message import new_txid, request
        self._last_stun = now
        self._stun_txids = {t: at for t, at in self._stun_txids.items() if now - at < STUN_INTERVAL}
        for server in self._stun_servers:
            txid = new_txid()
            self._stun_txids[txid] = now
            self.device.send_datagram(request(txid), server)
            self.counters["stun_sent"] += 1

    def _on_stun(self, data: bytes, src: Endpoint) -> None:
        """On the loop: a STUN answer from the WireGuard socket."""
        from ..stun.message import StunError, parse_response
        try:
            res = parse_response(data)
        except (StunError, ValueError):
            self.counters["stun_bad"] += 1
            return
        if self._stun_txids.pop(res.txid, None) is None:
            self.counters["stun_unknown"] += 1
            return
        self.counters["stun_received"] += 1
        ep = (res.ip, res.port)
        if ep != self.stun_endpoint:
            log.info("paths: STUN says we are %s", format_endpoint(ep))
        self.stun_endpoint = ep
        self.layer.discovered[ep] = self._clock()  # reported with our endpoints, sent in call-me-maybe

    def _relay_id(self, key: bytes) -> int:
        rid = self._relay_ids.get(key)
        if rid is None:
            rid = len(self._relay_ids) % 65535 + 1
            self._relay_keys.pop(rid, None)
            self._relay_ids[key], self._relay_keys[rid] = rid, key
        return rid

    def _relay_out(self, items: list[tuple[bytes, Any]]) -> None:
        """From the device's I/O thread: WireGuard datagrams for relay endpoints. They wait in
        `_out` for the loop, which is woken only when `_out` was empty: one self-pipe write per
        burst, not one per batch, while the loop is busy with the previous ones."""
        loop = self._loop
        if loop is None:
            return
        with self._out_lock:
            first = not self._out
            if first:  # nothing waits for the loop: write to the relay here if it can be done
                items = self._send_direct(items)
                if not items:
                    return
            room = RELAY_OUT_MAX - len(self._out)
            if room < len(items):
                self._out_dropped += len(items) - max(room, 0)
                items = items[:max(room, 0)]
            self._out.extend(items)
        if first and items:
            loop.call_soon_threadsafe(self._drain_out)

    def _send_direct(self, items: list[tuple[bytes, Any]]) -> list[tuple[bytes, Any]]:
        """With `_out_lock` held, on a device thread: write `items` to their DERP clients on this
        thread (`send_many_threadsafe`); what could not be written so is returned, in order."""
        keys, rest = self._relay_keys, []
        i, n = 0, len(items)
        while i < n:  # runs of datagrams to one peer: one write each
            ep = items[i][1]
            j = i + 1
            while j < n and items[j][1] == ep:
                j += 1
            key = keys.get(ep[1])
            client = self._client(key) if key is not None else None
            batch = [(key, data) for data, _ in items[i:j]]
            if rest or client is None or client.send_many_threadsafe(batch) is None:
                rest.extend(items[i:j])  # (order kept: once one run waits, the later ones do)
            else:
                self.counters["relay_sent"] += j - i
                self.counters["relay_bytes_sent"] += sum(len(d) for d, _ in items[i:j])
            i = j
        return rest

    def _drain_out(self) -> None:
        with self._out_lock:
            items, self._out = self._out, []
            dropped, self._out_dropped = self._out_dropped, 0
        if dropped:
            with self._out_lock:
                self.counters["relay_send_dropped"] += dropped
        self._send_relayed(items)

    def _send_relayed(self, items: list[tuple[bytes, Any]]) -> None:
        # One write per DERP client for the whole batch the device handed over.
        batches: dict[int, tuple[Any, list[tuple[bytes, bytes]]]] = {}
        dropped = 0
        for data, ep in items:
            key = self._relay_keys.get(ep[1])
            client = self._client(key) if key is not None else None
            if client is None or key is None:
                dropped += 1
                continue
            batches.setdefault(id(client), (client, []))[1].append((key, data))
        sent = nbytes = 0
        for client, batch in batches.values():
            n = client.send_many(batch)
            sent += n
            dropped += len(batch) - n
            nbytes += sum(len(d) for _, d in batch[:n])  # all or none in practice
        with self._out_lock:  # the device threads count their direct sends too
            self.counters["relay_sent"] += sent
            self.counters["relay_bytes_sent"] += nbytes
            if dropped:
                self.counters["relay_send_dropped"] += dropped

    def _on_relayed(self, batch: list[tuple[bytes, bytes]]) -> None:
        """The packets of one read from a DERP connection (on the loop, called by the client):
        disco to the path layer, WireGuard straight into the device (decrypted on this thread)."""
        counters = self.counters
        counters["relay_received"] += len(batch)
        counters["relay_bytes_received"] += sum(len(packet) for _, packet in batch)
        wireguard = []
        for src, packet in batch:
            if looks_like_disco(packet):
                self.layer.receive(packet, None, self._clock())
                self._kick()
            else:
                wireguard.append((packet, relay_endpoint(self._relay_id(src))))
        if wireguard:
            self.device.receive_relayed_many(wireguard)

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
        elif len(data) >= 20 and data[4:8] == STUN_COOKIE:
            if self.stun_handler is not None:
                self.stun_handler(data, src)
            if self._loop is not None and self._stun_txids:
                self._loop.call_soon_threadsafe(self._on_stun, data, src)
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
                # Not asyncio.wait_for: on 3.11 it can swallow a cancellation that races with the
                # event being set, and close() would wait forever.
                waiter = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait((waiter,), timeout=sleep)
                finally:
                    waiter.cancel()
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
            if self._stun_servers and now - self._last_stun >= STUN_INTERVAL:
                self._stun(now)
        layer.tick(now)
        self._apply(layer.drain())

    def _poll_data_plane(self, now: float) -> None:
        from ..wg.device import display_endpoint
        from ..wg.device import RELAY_HOST
        seen: dict[bytes, tuple[Any, ...]] = {}
        for s in self.device.stats():
            # Heard through the relay: not a UDP candidate.
            ep = display_endpoint(s.endpoint) if s.endpoint and s.endpoint[0] != RELAY_HOST else None
            # Handshakes and keepalives are traffic too (the engine times only data): a peer
            # WireGuard is trying to reach is probed even before it has a session.
            before = self._bytes.get(s.public_key)
            tx, rx, sent, heard, old_ep, old_un = before or (0, 0, None, None, None, None)
            if s.tx_bytes > tx:
                sent = now
            if s.rx_bytes > rx:
                heard = now
            seen[s.public_key] = (s.tx_bytes, s.rx_bytes, sent, heard, ep, s.unanswered_since)
            if before is not None and seen[s.public_key] == before:
                continue  # nothing new from WireGuard: a big tailnet's idle peers cost nothing
            self.layer.data_plane(s.public_key, DataPlane(
                _latest(s.last_sent, sent), _latest(s.last_received, heard), s.unanswered_since, ep), now)
        self._bytes = seen

    def _apply(self, outputs: list[Any]) -> None:
        for out in outputs:
            if isinstance(out, SendUDP):
                self.device.send_datagram(out.data, out.endpoint)
            elif isinstance(out, SendRelay):
                client = self._client(out.node_key)
                if client is not None and client.send(out.node_key, out.data):
                    self.counters["relay_disco_sent"] += 1
                else:
                    self.counters["relay_unavailable"] += 1
            elif isinstance(out, PathChanged):
                if out.path.type is PathType.RELAY:
                    self.device.set_endpoint(out.node_key, relay_endpoint(self._relay_id(out.node_key)))
                else:
                    self.device.set_endpoint(out.node_key, out.send_to)
                log.info("paths: %s now %s (%s)", base64.b64encode(out.node_key).decode()[:8],
                         out.path.describe(), out.path.reason)
            elif isinstance(out, PingResult):
                fut = self._pings.get(out.ping_id)
                if fut is not None and not fut.done():
                    fut.set_result(out)
