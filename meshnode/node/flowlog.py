"""Connection (flow) logs on the node: counting on the data-plane threads, windows for upload.

Shapes follow Tailscale's `types/netlogtype` (ConnectionCounts: a connection is protocol, source
and destination address and port; counts are packets and bytes of whole IP packets, TX and RX) and
`wgengine/netlog` (windows of a few seconds, uploaded in the background), plus what the issue asks
beyond it: the peer node, the kind of traffic (tunnel, subnet route, exit node) and dropped packets
with the filter's reason.

Threading: `FlowCounter.outbound` runs on the device's send thread, `inbound` on its receive thread;
each writes only its own dict, and `harvest` swaps the dicts and reads the previous ones one window
later, so an increment that was in flight during a swap still lands before it is read (no locks on
the packet path). Everything else here is sans-I/O (`now` passed in).
"""

from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from magicdns.ranges import TAILNET_V4, TAILNET_V6

WINDOW_SECONDS = 5.0
MAX_BUFFERED_WINDOWS = 720          # an hour of 5 s windows while control is unreachable
MAX_SAVED_BYTES = 32 << 20          # the saved queue (flows-pending.json) is refused beyond this
SAVE_EVERY = 30.0                   # seconds between saves of a growing queue (always at exit)
_PORT_PROTOS = (6, 17, 132)


def flow_key(packet: bytes) -> tuple[int, bytes, bytes, int, int] | None:
    """(proto, src, dst, sport, dport) of an IP packet; ports are 0 for protocols without them."""
    n = len(packet)
    if n < 20:
        return None
    v = packet[0] >> 4
    if v == 4:
        off = (packet[0] & 15) << 2
        proto = packet[9]
        src, dst = packet[12:16], packet[16:20]
        frag = ((packet[6] & 0x1F) << 8) | packet[7]
    elif v == 6 and n >= 40:
        off, proto, frag = 40, packet[6], 0
        src, dst = packet[8:24], packet[24:40]
    else:
        return None
    if proto in _PORT_PROTOS and not frag and off + 4 <= n:
        return (proto, src, dst, (packet[off] << 8) | packet[off + 1], (packet[off + 2] << 8) | packet[off + 3])
    return (proto, src, dst, 0, 0)


def _fast_key(packet: bytes, peer: bytes) -> tuple | None:
    """The counting key, cheap on the packet path: raw header bytes, decoded at `build_window`.
    (peer, proto, src+dst, sport+dport bytes); IPv4 without options is the fast path."""
    b0 = packet[0] if packet else 0
    if b0 == 0x45 and len(packet) >= 24:
        proto = packet[9]
        if proto in _PORT_PROTOS and not (packet[6] & 0x1F or packet[7]):
            return (peer, proto, packet[12:20], packet[20:24])
        return (peer, proto, packet[12:20], b"")
    k = flow_key(packet)
    if k is None:
        return None
    proto, src, dst, sport, dport = k
    ports = bytes([sport >> 8, sport & 255, dport >> 8, dport & 255]) if (sport or dport) else b""
    return (peer, proto, src + dst, ports)


def decode_key(key: tuple) -> tuple[int, bytes, bytes, int, int, bytes]:
    """(proto, src, dst, sport, dport, peer) of a counting key."""
    peer, proto, addrs, ports = key
    half = len(addrs) // 2
    sport = (ports[0] << 8) | ports[1] if ports else 0
    dport = (ports[2] << 8) | ports[3] if ports else 0
    return proto, addrs[:half], addrs[half:], sport, dport, peer


class FlowCounter:
    """Per-connection counters, written by the data-plane hooks."""

    def __init__(self) -> None:
        # key (see _fast_key) -> [packets, bytes]
        self.tx: dict[tuple, list[int]] = {}
        self.rx: dict[tuple, list[int]] = {}
        self.dropped: dict[tuple, list[Any]] = {}   # key -> [packets, bytes, reason]
        self._pending: tuple[dict, dict, dict] | None = None

    def outbound(self, packet: bytes, peer: bytes) -> None:
        key = _fast_key(packet, peer)
        if key is None:
            return
        c = self.tx.get(key)
        if c is None:
            self.tx[key] = [1, len(packet)]
        else:
            c[0] += 1
            c[1] += len(packet)

    def inbound(self, packet: bytes, peer: bytes, accepted: bool, reason: str = "") -> None:
        key = _fast_key(packet, peer)
        if key is None:
            key = (peer, 0, b"", b"")
        if accepted:
            c = self.rx.get(key)
            if c is None:
                self.rx[key] = [1, len(packet)]
            else:
                c[0] += 1
                c[1] += len(packet)
        else:
            d = self.dropped.get(key)
            if d is None:
                self.dropped[key] = [1, len(packet), reason]
            else:
                d[0] += 1
                d[1] += len(packet)

    def harvest(self) -> tuple[dict, dict, dict]:
        """Swap in fresh dicts; return the ones swapped out at the previous call (see module doc)."""
        fresh = (self.tx, self.rx, self.dropped)
        self.tx, self.rx, self.dropped = {}, {}, {}
        ready, self._pending = self._pending, fresh
        return ready if ready is not None else ({}, {}, {})


PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}


def not_allowed_text(packet: bytes) -> str:
    """The deciding information of a default-deny drop: `no rule allowed tcp 100.64.0.2:8443` (no port
    for protocols without one, IPv6 in brackets). The filter has no rule to name here: the packet was
    dropped because none matched. At most 71 characters."""
    k = flow_key(packet)
    if k is None:
        return "not_allowed"
    proto, _src, dst, _sport, dport = k
    ip = ipaddress.ip_address(dst)
    name = PROTO_NAMES.get(proto, f"proto {proto}")
    if proto not in _PORT_PROTOS:
        return f"no rule allowed {name} {ip}"
    return f"no rule allowed {name} {ip}:{dport}" if ip.version == 4 else f"no rule allowed {name} [{ip}]:{dport}"


def counting_hooks(pf: Any, counter: FlowCounter
                   ) -> tuple[Callable[[bytes, bytes, float], bool], Callable[[bytes, bytes, float], None]]:
    """The device hooks of `policy.PacketFilter` `pf` that also count every packet into `counter`
    (accepted and dropped inbound, with the drop reason; outbound)."""
    from ..policy.filter import DropReason

    check, note = pf.check, pf.note_outbound
    drops = pf._drops          # the filter's drop counters: the one that moved names the reason
    last = list(drops)
    names = [r.name.lower() for r in DropReason]
    count_in, count_out = counter.inbound, counter.outbound

    def inbound(packet: bytes, peer_key: bytes, now: float) -> bool:
        ok = check(packet, now)
        if ok:
            count_in(packet, peer_key, True)
        else:
            reason = "dropped"
            for i, v in enumerate(drops):
                if v != last[i]:
                    reason, last[i] = names[i], v
            if reason == "not_allowed":
                reason = not_allowed_text(packet)
            count_in(packet, peer_key, False, reason)
        return ok

    def outbound(packet: bytes, peer_key: bytes, now: float) -> None:
        note(packet, now)
        count_out(packet, peer_key)

    return inbound, outbound


@dataclass(frozen=True)
class PeerInfo:
    name: str
    approved_routes: tuple[str, ...] = ()
    exit_node: bool = False


def _ip(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw)) if len(raw) in (4, 16) else ""


def _tailnet(ip: Any) -> bool:
    return ip in (TAILNET_V4 if ip.version == 4 else TAILNET_V6)


def kind_of(src: str, dst: str, peer: PeerInfo | None, own: PeerInfo | None = None) -> str:
    """tunnel (both ends tailnet addresses), subnet (the other end is in an approved route of the
    peer, or of this node when it is the router) or exit (anything else: through an exit node)."""
    others = [ipaddress.ip_address(a) for a in (src, dst) if a]
    others = [ip for ip in others if not _tailnet(ip)]
    if not others:
        return "tunnel"
    ip = others[0]
    for info in (peer, own):
        for r in (info.approved_routes if info is not None else ()):
            net = ipaddress.ip_network(r, strict=False)
            if net.version == ip.version and ip in net and net.prefixlen > 0:
                return "subnet"
    return "exit"


OWN = b""   # the key under which `peers` holds this node's own routes (for a subnet router's records)


def build_window(start: float, end: float, counts: tuple[dict, dict, dict],
                 peers: Mapping[bytes, PeerInfo]) -> list[dict[str, Any]]:
    """The records of one window: one per connection and direction-agnostic key, with tx and rx."""
    tx, rx, dropped = counts
    out: dict[tuple, dict[str, Any]] = {}

    def rec(key: tuple, direction: str) -> dict[str, Any]:
        proto, src, dst, sport, dport, peer = decode_key(key)
        r = out.get((key, direction == "drop"))
        if r is None:
            info = peers.get(peer)
            s, d = _ip(src), _ip(dst)
            r = {"start": start, "end": end, "proto": proto, "src": s, "dst": d, "sport": sport,
                 "dport": dport, "peer": info.name if info else "", "kind": kind_of(s, d, info, peers.get(OWN)),
                 "tx_packets": 0, "tx_bytes": 0, "rx_packets": 0, "rx_bytes": 0}
            out[(key, direction == "drop")] = r
        return r

    for key, (p, b) in tx.items():
        r = rec(key, "tx")
        r["tx_packets"] += p
        r["tx_bytes"] += b
    for key, (p, b) in rx.items():
        r = rec(key, "rx")
        r["rx_packets"] += p
        r["rx_bytes"] += b
    for key, (p, b, reason) in dropped.items():
        r = rec(key, "drop")
        r["rx_packets"] += p
        r["rx_bytes"] += b
        r["dropped"] = True
        r["rule"] = reason
    return list(out.values())


@dataclass
class UploadQueue:
    """Windows waiting for the control server's acknowledgement: bounded, the oldest dropped first
    (and counted) while control is unreachable. Each batch has a sequence number so that the control
    server stores a re-sent batch once."""

    boot_id: str
    max_windows: int = MAX_BUFFERED_WINDOWS
    windows: deque = field(default_factory=deque)     # (seq, records)
    next_seq: int = 1
    dropped_windows: int = 0

    def add(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        self.windows.append((self.next_seq, records))
        self.next_seq += 1
        while len(self.windows) > self.max_windows:
            self.windows.popleft()
            self.dropped_windows += 1

    def batch(self, limit: int = 60) -> list[tuple[int, list[dict[str, Any]]]]:
        return list(self.windows)[:limit]

    def ack(self, upto: int) -> None:
        while self.windows and self.windows[0][0] <= upto:
            self.windows.popleft()


    # -- persistence: windows not yet acknowledged survive a daemon exit ---------------------------
    # The file keeps boot_id and next_seq too: after a restart the same (boot_id, seq) pairs are sent
    # again, so the control server stores a window whose acknowledgement was lost only once.

    def to_json(self) -> str:
        import json

        return json.dumps({"boot_id": self.boot_id, "next_seq": self.next_seq, "lost": self.dropped_windows,
                           "windows": [[seq, recs] for seq, recs in self.windows]}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, max_windows: int = MAX_BUFFERED_WINDOWS) -> "UploadQueue":
        """Raises ValueError on anything but a queue this module wrote."""
        import json

        from ..control.protocol import json_depth_ok

        doc = json.loads(text)
        if not json_depth_ok(doc, 8) or not isinstance(doc, dict):
            raise ValueError("not a flow queue")
        boot_id, next_seq, lost, windows = doc.get("boot_id"), doc.get("next_seq"), doc.get("lost", 0), doc.get("windows")
        if not (isinstance(boot_id, str) and 0 < len(boot_id) <= 64 and isinstance(next_seq, int)
                and next_seq >= 1 and isinstance(lost, int) and lost >= 0 and isinstance(windows, list)):
            raise ValueError("not a flow queue")
        q = cls(boot_id, max_windows, next_seq=next_seq, dropped_windows=lost)
        for w in windows:
            if (not isinstance(w, list) or len(w) != 2 or not isinstance(w[0], int) or not 0 < w[0] < next_seq
                    or not isinstance(w[1], list) or not all(isinstance(r, dict) for r in w[1])):
                raise ValueError("not a flow queue: bad window")
            q.windows.append((w[0], w[1]))
        while len(q.windows) > max_windows:
            q.windows.popleft()
            q.dropped_windows += 1
        return q


def load_queue(path: Any) -> "UploadQueue | None":
    """The queue a previous run saved at `path`, or None (absent, too big or damaged: logged)."""
    import logging
    from pathlib import Path

    f = Path(path)
    try:
        if f.stat().st_size > MAX_SAVED_BYTES:
            raise ValueError(f"larger than {MAX_SAVED_BYTES} bytes")
        return UploadQueue.from_json(f.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logging.getLogger("meshnode.node.flowlog").warning("flow logs: ignoring saved queue %s: %s", f, exc)
        return None


def peer_table(peers: Iterable[Any], key_of: Callable[[Any], bytes]) -> dict[bytes, PeerInfo]:
    return {key_of(p): PeerInfo(p.name, tuple(p.approved_routes), bool(p.exit_node)) for p in peers}


class FlowLogger:
    """The daemon's side: turns counting on and off as the map says, closes a window every
    `window` seconds and uploads what is queued, with acknowledgements (asyncio glue)."""

    def __init__(self, tunnel: Any, client: Callable[[], Any], window: float = WINDOW_SECONDS,
                 state_file: Any = None) -> None:
        import os

        self.tunnel = tunnel
        self.client = client
        self.window = window
        self.on = False
        self.counter: FlowCounter | None = None
        self.peers: dict[bytes, PeerInfo] = {}
        self._peers_of: tuple[Any, Any] | None = None   # (peers tuple, self node) `peers` was built from
        self.state_file = state_file   # where unacknowledged windows are kept across restarts (or None)
        self._saved_at = float("-inf")
        restored = load_queue(state_file) if state_file is not None else None
        self.queue = restored if restored is not None else UploadQueue(os.urandom(8).hex())
        self.uploaded = 0
        self.last_error: str | None = None
        self._task: Any = None
        self._started = 0.0

    async def on_map(self, netmap: Any) -> None:
        import base64

        me = netmap.self_node
        want = bool(netmap.flow_logs) and self.tunnel is not None
        # The table names the peers of counted flows: needed while logging is on (and for the last
        # window when it goes off). A policy change or a record leaves the peers tuple and self as
        # they were (MapAssembler reuses them): the table is then the one built before (~1 us a
        # peer to build again, on every map).
        stale = self._peers_of is None or self._peers_of[0] is not netmap.peers or self._peers_of[1] is not me
        if (want or self.on) and stale:
            peers = peer_table(netmap.peers, lambda p: base64.b64decode(p.node_key))
            peers[OWN] = PeerInfo(me.name, tuple(me.approved_routes), bool(me.exit_node))
            self.peers, self._peers_of = peers, (netmap.peers, me)
        if want == self.on:
            if not want and self.queue.windows and self._task is None:
                await self._upload()   # windows a previous run left: send them even with logging now off
            return
        self.on = want
        if want:
            self.counter = FlowCounter()
            await self.tunnel.set_flow_counter(self.counter)
            self._start()
        else:
            await self.tunnel.set_flow_counter(None)
            await self._stop()

    def _start(self) -> None:
        import asyncio
        import time

        self._started = time.time()
        self._task = asyncio.create_task(self._run())

    async def _stop(self) -> None:
        import asyncio

        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self.counter is not None:
            self._close_window()   # what was counted before the switch
            self._close_window()
            self.counter = None
        await self._upload()

    def _close_window(self) -> None:
        import time

        if self.counter is None:
            return
        now = time.time()
        before = self.queue.next_seq
        self.queue.add(build_window(self._started, now, self.counter.harvest(), self.peers))
        self._started = now
        if self.queue.next_seq != before:
            self._save(force=False)

    def _save(self, force: bool = True) -> None:
        """Write the queue (bounded by MAX_BUFFERED_WINDOWS) atomically; a failure is logged, not fatal.
        Unless `force`d, at most every SAVE_EVERY seconds: while control is down the queue can grow to
        megabytes, and rewriting it every window would cost more than the windows are worth."""
        if self.state_file is None:
            return
        import time
        import logging

        from .atomicfile import atomic_write

        from pathlib import Path

        try:
            if not self.queue.windows:
                Path(self.state_file).unlink(missing_ok=True)   # all acknowledged: nothing to carry over
                return
            if not force and time.monotonic() - self._saved_at < SAVE_EVERY:
                return
            atomic_write(self.state_file, self.queue.to_json())
            self._saved_at = time.monotonic()
        except OSError as exc:
            logging.getLogger("meshnode.node.flowlog").warning("flow logs: cannot save the queue: %s", exc)

    async def _run(self) -> None:
        import asyncio
        import logging

        log = logging.getLogger("meshnode.node.flowlog")
        if self.queue.windows:
            try:
                await self._upload()   # what a previous run left
            except Exception:
                log.exception("flow logs: uploading saved windows failed")
        while True:
            await asyncio.sleep(self.window)
            try:
                self._close_window()
                await self._upload()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("flow logs: closing or uploading a window failed")

    async def _upload(self) -> None:
        client = self.client()
        if client is None:
            return
        while self.queue.windows:
            batch = self.queue.batch()
            try:
                ans = await client.upload_flows({
                    "boot_id": self.queue.boot_id, "lost": self.queue.dropped_windows,
                    "batches": [{"seq": s, "records": r} for s, r in batch]})
            except Exception as exc:  # unreachable or refused: keep the windows, bounded
                self.last_error = str(exc)
                return
            self.last_error = None
            self.queue.ack(int(ans.get("ack", 0)))
            self._save(force=False)
            self.uploaded += len(batch)
            if int(ans.get("ack", 0)) < batch[-1][0]:
                return

    def cancel(self) -> None:
        """At daemon exit: stop the timer, close the window being counted and save what is not yet
        acknowledged (the next run uploads it under the same boot_id and sequence numbers)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.counter is not None:
            self._close_window()   # the window being counted (harvest returns the previous one)
            self._close_window()
        self._save()

    def status(self) -> dict[str, Any]:
        return {"on": self.on, "queued_windows": len(self.queue.windows),
                "dropped_windows": self.queue.dropped_windows, "error": self.last_error}
