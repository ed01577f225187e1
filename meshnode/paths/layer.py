"""The path layer: for every peer, find the best working path and keep it (sans-I/O).

Driven by `receive(datagram, src, now)` (disco datagrams from the WireGuard socket or the relay),
`tick(now)` at `next_deadline()`, `set_peers` (map updates), `set_relay` (our home region) and
`data_plane` (what WireGuard sees of each peer). It says what to do through `drain()`: datagrams to
send (`SendUDP`, `SendRelay`), path changes for the engine (`PathChanged`) and answers to user pings
(`PingResult`). `path(node_key)` is the current path of a peer. No sockets, no clocks.

How a path is found and kept follows tailscale's magicsock endpoint (wgengine/magicsock/endpoint.go):
every candidate endpoint (from the map, from call-me-maybe, the source of pings and of WireGuard
packets) is sent a disco ping; the fastest answering one wins by `quality.better` (hysteresis); it is
trusted for TRUST after its last pong, kept trusted by heartbeats while traffic flows, and all
candidates are probed again when trust lapses or periodically while its latency is not good enough.
A map update adds candidates and probes them; it never takes away a path that answers."""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ..disco import CallMeMaybe, DiscoError, DiscoKey, PeerBox, Ping, Pong, sender_key
from ..disco.messages import canonical_endpoint
from .quality import better
from .types import (DataPlane, Endpoint, Output, Path, PathChanged, PathType, PeerInfo, PingResult,
                    SendRelay, SendUDP)

# Timings, tailscale's (magicsock.go) unless said otherwise.
TRUST = 6.5             # trustUDPAddrDuration: a path is trusted this long after its last pong
HEARTBEAT = 3.0         # heartbeatInterval: ping the best path this often while traffic flows
PING_INTERVAL = 5.0     # discoPingInterval: at most one ping per candidate per this
PING_TIMEOUT = 5.0      # pingTimeoutDuration
UPGRADE_INTERVAL = 60.0  # upgradeUDPDirectInterval: full re-probe to look for a better path
GOOD_ENOUGH = 0.005     # goodEnoughLatency: below it, no periodic re-probe
SESSION_ACTIVE = 45.0   # sessionActiveTimeout: traffic within this keeps heartbeats going
# Ours: WireGuard answers data within KEEPALIVE_TIMEOUT (10 s) with at least a keepalive; after
# REKEY_TIMEOUT more it gives up on the session too (wireguard's new-handshake timer).
DATA_TIMEOUT = 15.0
BAD_HOLD = 30.0         # an abandoned path is not chosen again for this long
MAX_CANDIDATES = 16     # per peer: learned candidates beyond this evict the oldest learned one
PING_BACK_RETRY = 0.25  # an unanswered candidate that pings us is pinged again after this
CALL_ME_MAYBE_MIN = 1.0  # at most one call-me-maybe handled per peer per second
RELAY_MAGIC_IP = "127.3.3.40"  # tailscale's DERP magic address: "the relay" as a pong source


@dataclass
class _Candidate:
    sources: set[str] = field(default_factory=set)  # "map", "cmm", "ping", "wireguard", "pong"
    added: float = 0.0
    last_ping: float = float("-inf")
    last_pong: float | None = None
    latency: float | None = None
    bad_until: float = float("-inf")


@dataclass
class _Pending:
    endpoint: Endpoint | None  # None: sent through the relay
    sent: float
    ping_id: int | None = None  # a user's ping


class _Peer:
    def __init__(self, info: PeerInfo, box: PeerBox | None, now: float) -> None:
        self.info = info
        self.box = box
        self.candidates: dict[Endpoint, _Candidate] = {}
        self.pending: dict[bytes, _Pending] = {}
        self.best: Endpoint | None = None
        self.best_latency = 0.0
        self.trust_until = float("-inf")
        self.last_full_ping = float("-inf")
        self.last_heartbeat = float("-inf")
        self.probe_due = True
        self.data = DataPlane()
        self.last_cmm = float("-inf")
        self.path = Path(PathType.NONE, since=now, reason="not probed yet")
        self.send_to: Endpoint | None = None
        self.pushed = False  # the engine has been told send_to at least once
        self.abandon_reason = ""
        self.answered_pings: set[int] = set()

    def add(self, ep: Endpoint, source: str, now: float) -> _Candidate | None:
        cand = self.candidates.get(ep)
        if cand is None:
            if len(self.candidates) >= MAX_CANDIDATES and not self._evict():
                return None
            cand = self.candidates[ep] = _Candidate(added=now)
        cand.sources.add(source)
        return cand

    def _evict(self) -> bool:
        learned = [(c.added, ep) for ep, c in self.candidates.items()
                   if "map" not in c.sources and ep != self.best]
        if not learned:
            return False
        del self.candidates[min(learned)[1]]
        return True

    def active(self, now: float) -> bool:
        d = self.data
        return any(t is not None and now - t < SESSION_ACTIVE for t in (d.last_sent, d.last_received))


class PathLayer:
    """Paths to every peer of one node. See the module docstring."""

    def __init__(self, disco_key: DiscoKey, node_key: bytes,
                 random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self.disco_key = disco_key
        self.node_key = node_key
        self._random = random_bytes
        self._peers: dict[bytes, _Peer] = {}
        self._by_disco: dict[bytes, _Peer] = {}
        self._out: collections.deque[Output] = collections.deque()
        self.home_region: int | None = None
        self.local_endpoints: tuple[Endpoint, ...] = ()
        self.discovered: dict[Endpoint, float] = {}  # our address as peers' pongs saw it, when
        self._ping_ids = 0
        self._last_tick = float("-inf")
        self.counters: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------ inputs

    def set_peers(self, peers: Iterable[PeerInfo], now: float) -> None:
        """The map's peers: new ones are probed, changed ones re-probed while their path keeps
        carrying traffic, gone ones forgotten."""
        wanted = {p.node_key: p for p in peers if p.node_key != self.node_key}
        for key in [k for k in self._peers if k not in wanted]:
            self._forget(key)
        for key, info in wanted.items():
            peer = self._peers.get(key)
            if peer is None:
                peer = self._peers[key] = _Peer(info, self._box(info.disco_key), now)
                if peer.box is not None:
                    self._by_disco[peer.box.peer_public] = peer
                for ep in info.endpoints:
                    peer.add(ep, "map", now)
                self._update_path(peer, now)
                continue
            if info == peer.info:
                continue
            old, peer.info = peer.info, info
            if info.disco_key != old.disco_key:
                # The peer restarted (a new disco key): its old pings mean nothing now.
                if peer.box is not None:
                    self._by_disco.pop(peer.box.peer_public, None)
                peer.box = self._box(info.disco_key)
                if peer.box is not None:
                    self._by_disco[peer.box.peer_public] = peer
                peer.pending.clear()
                peer.probe_due = True
            if info.endpoints != old.endpoints:
                for ep in set(old.endpoints) - set(info.endpoints):
                    cand = peer.candidates.get(ep)
                    if cand is not None:
                        cand.sources.discard("map")
                        if not cand.sources and ep != peer.best:
                            del peer.candidates[ep]
                for ep in info.endpoints:
                    peer.add(ep, "map", now)
                peer.probe_due = True
            self._update_path(peer, now)

    def set_relay(self, home_region: int | None, now: float) -> None:
        """Our home relay region (None: no relay)."""
        self.home_region = home_region
        for peer in self._peers.values():
            self._update_path(peer, now)

    def set_local_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        """Where peers can reach us (sent in call-me-maybe)."""
        self.local_endpoints = tuple(endpoints)

    def data_plane(self, node_key: bytes, state: DataPlane, now: float) -> None:
        """WireGuard's view of a peer. A source it hears the peer from becomes a candidate; data
        sent on a direct path and unanswered for DATA_TIMEOUT abandons that path."""
        peer = self._peers.get(node_key)
        if peer is None:
            return
        peer.data = state
        src = state.received_from
        if src is not None and state.last_received is not None and now - state.last_received < TRUST:
            if src not in peer.candidates:
                peer.add(src, "wireguard", now)
        self._check_liveness(peer, now)
        self._update_path(peer, now)
        if (peer.path.type is PathType.DIRECT and peer.send_to is not None and src is not None
                and src != peer.send_to and peer.box is not None):
            cand = peer.candidates.get(src)
            if cand is None:
                return
            if cand.last_ping > float("-inf") and (cand.last_pong is None or now - cand.last_pong > TRUST):
                # WireGuard roamed to an address our pings get no answer from (a handshake came
                # over a one-way path): put back the path that answers.
                self._out.append(PathChanged(peer.info.node_key, peer.path, peer.send_to))
                self.counters["path_reasserted"] += 1
            elif now - cand.last_ping >= PING_INTERVAL:
                # The peer may have moved: ask there now; its pong decides.
                self._send_ping(peer, src, now)

    def receive(self, datagram: bytes, src: Endpoint | None, now: float) -> bool:
        """A disco datagram from `src` (None: through the relay). False if it was not usable
        (unknown sender, bad seal, unparsable): it is dropped and counted."""
        try:
            peer = self._by_disco.get(sender_key(datagram))
            if peer is None or peer.box is None:
                self.counters["disco_unknown_sender"] += 1
                return False
            msg = peer.box.open(datagram)
        except DiscoError:
            self.counters["disco_bad"] += 1
            return False
        if src is not None:
            try:
                src = canonical_endpoint(*src)
            except DiscoError:
                self.counters["disco_bad"] += 1
                return False
        if isinstance(msg, Ping):
            self._on_ping(peer, msg, src, now)
        elif isinstance(msg, Pong):
            self._on_pong(peer, msg, src, now)
        else:
            self._on_call_me_maybe(peer, msg, now)
        return True

    def ping(self, node_key: bytes, now: float) -> int | None:
        """A user's ping (`meshnode ping`): disco pings to every candidate (and through the relay);
        the first pong gives a `PingResult` with this id. None: unknown peer or no disco key."""
        peer = self._peers.get(node_key)
        if peer is None or peer.box is None:
            return None
        self._ping_ids += 1
        pid = self._ping_ids
        targets: list[Endpoint | None]
        if peer.path.type is PathType.DIRECT and peer.path.endpoint is not None:
            # As Tailscale's discoPing: a direct path in use is the one pinged, alone. Otherwise
            # whichever answers first (the relay, now that its hops are as quick as a direct
            # path's) would be reported, and `ping --until-direct` could miss the path in use.
            targets = [peer.path.endpoint]
        else:
            targets = [ep for ep, c in peer.candidates.items() if c.bad_until <= now]
            if self._relay_ok(peer):
                targets.append(None)
        for ep in targets:
            self._send_ping(peer, ep, now, pid)
        return pid

    # ------------------------------------------------------------------ outputs

    def drain(self) -> list[Output]:
        """What to do now, in order; empties the queue."""
        out = list(self._out)
        self._out.clear()
        return out

    def path(self, node_key: bytes) -> Path | None:
        peer = self._peers.get(node_key)
        return peer.path if peer is not None else None

    def paths(self) -> dict[bytes, Path]:
        return {k: p.path for k, p in self._peers.items()}

    def next_deadline(self) -> float | None:
        """When `tick` has work next (None: nothing scheduled). Deadlines already passed at the
        last tick were handled then, so they are not returned again (no busy loop)."""
        floor = self._last_tick
        best: float | None = None

        def at(t: float) -> None:
            nonlocal best
            if t > floor and (best is None or t < best):
                best = t

        for peer in self._peers.values():
            if peer.box is None:
                continue
            if peer.probe_due:
                return float("-inf")
            for p in peer.pending.values():
                at(p.sent + PING_TIMEOUT)
            direct = peer.path.type is PathType.DIRECT
            if direct:
                at(peer.trust_until)
            d = peer.data
            seen = [t for t in (d.last_sent, d.last_received) if t is not None]
            if seen:
                active_until = max(seen) + SESSION_ACTIVE
                nxt = (peer.last_heartbeat + HEARTBEAT if direct else peer.last_full_ping + PING_INTERVAL)
                if nxt < active_until:
                    at(nxt)
                if direct and peer.best_latency > GOOD_ENOUGH:
                    at(peer.last_full_ping + UPGRADE_INTERVAL)
            if d.unanswered_since is not None and direct:
                at(max(d.unanswered_since, peer.path.since) + DATA_TIMEOUT)
        return best

    def tick(self, now: float) -> None:
        """Expire pings, check liveness and trust, send the heartbeats and probes that are due."""
        self._last_tick = now
        for ep in [ep for ep, t in self.discovered.items() if now - t > UPGRADE_INTERVAL]:
            del self.discovered[ep]
        for peer in self._peers.values():
            for tx in [tx for tx, p in peer.pending.items() if now - p.sent >= PING_TIMEOUT]:
                del peer.pending[tx]
                self.counters["ping_timeouts"] += 1
            self._check_liveness(peer, now)
            if peer.box is not None:
                self._promote(peer, now)
                self._probe(peer, now)
            self._update_path(peer, now)

    # ------------------------------------------------------------------ internals

    def _box(self, disco_key: bytes | None) -> PeerBox | None:
        if not disco_key:
            return None
        try:
            return self.disco_key.box_with(disco_key)
        except (DiscoError, ValueError):
            return None

    def _forget(self, key: bytes) -> None:
        peer = self._peers.pop(key)
        if peer.box is not None and self._by_disco.get(peer.box.peer_public) is peer:
            del self._by_disco[peer.box.peer_public]

    def _relay_ok(self, peer: _Peer) -> bool:
        return self.home_region is not None and peer.info.relay_region is not None and peer.box is not None

    def _probe(self, peer: _Peer, now: float) -> None:
        active = peer.active(now)
        trusted = peer.best is not None and now < peer.trust_until
        full = peer.probe_due or (active and (
            (not trusted and now - peer.last_full_ping >= PING_INTERVAL)
            or (trusted and peer.best_latency > GOOD_ENOUGH
                and now - peer.last_full_ping >= UPGRADE_INTERVAL)))
        if full:
            self._full_ping(peer, now)
        elif trusted and active and now - peer.last_heartbeat >= HEARTBEAT:
            peer.last_heartbeat = now
            self._send_ping(peer, peer.best, now)

    def _promote(self, peer: _Peer, now: float) -> None:
        """When the best path's trust lapses, take the best other candidate that answered within
        TRUST at once, rather than waiting for the next probe round (a peer that moved)."""
        if now < peer.trust_until:
            return
        choice: Endpoint | None = None
        latency = 0.0
        for ep, cand in peer.candidates.items():
            if (cand.last_pong is None or now - cand.last_pong >= TRUST or cand.bad_until > now
                    or cand.latency is None):
                continue
            if choice is None or better(ep, cand.latency, choice, latency):
                choice, latency = ep, cand.latency
        if choice is not None:
            last = peer.candidates[choice].last_pong
            assert last is not None
            peer.best, peer.best_latency, peer.trust_until = choice, latency, last + TRUST
            peer.abandon_reason = ""

    def _full_ping(self, peer: _Peer, now: float) -> None:
        forced = peer.probe_due
        peer.probe_due = False
        peer.last_full_ping = peer.last_heartbeat = now
        for ep, cand in list(peer.candidates.items()):
            if cand.bad_until > now:
                continue
            if forced or now - cand.last_ping >= PING_INTERVAL or ep == peer.best:
                self._send_ping(peer, ep, now)
        if self._relay_ok(peer) and (self.local_endpoints or self.discovered):
            # Both sides send at once: their pings open our NAT for our pings' answers.
            assert peer.box is not None
            mine = tuple(dict.fromkeys((*self.discovered, *self.local_endpoints)))[:32]
            self._out.append(SendRelay(peer.info.node_key, peer.box.seal(CallMeMaybe(mine))))
            self.counters["call_me_maybe_sent"] += 1

    def _send_ping(self, peer: _Peer, ep: Endpoint | None, now: float, ping_id: int | None = None) -> None:
        assert peer.box is not None
        tx = self._random(12)
        peer.pending[tx] = _Pending(ep, now, ping_id)
        data = peer.box.seal(Ping(tx, self.node_key))
        if ep is None:
            self._out.append(SendRelay(peer.info.node_key, data))
        else:
            peer.candidates[ep].last_ping = now
            self._out.append(SendUDP(ep, data))
        self.counters["pings_sent"] += 1

    def _reply(self, peer: _Peer, msg: Pong, src: Endpoint | None) -> None:
        assert peer.box is not None
        data = peer.box.seal(msg)
        self._out.append(SendUDP(src, data) if src is not None else SendRelay(peer.info.node_key, data))
        self.counters["pongs_sent"] += 1

    def _on_ping(self, peer: _Peer, msg: Ping, src: Endpoint | None, now: float) -> None:
        self.counters["pings_received"] += 1
        if msg.node_key is not None and msg.node_key != peer.info.node_key:
            self.counters["disco_key_mismatch"] += 1  # another node's ping sealed with this disco key
            return
        seen = src if src is not None else (RELAY_MAGIC_IP, self.home_region or 0)
        self._reply(peer, Pong(msg.tx_id, seen), src)
        if src is not None:
            cand = peer.add(src, "ping", now)
            if cand is None or cand.bad_until > now:
                return
            unanswered = cand.last_pong is None or cand.last_pong < cand.last_ping
            if (now - cand.last_ping >= PING_INTERVAL
                    or (unanswered and now - cand.last_ping >= PING_BACK_RETRY)):
                # Learn the way back, and open our NAT to it. Our last ping there got no answer
                # (their NAT was closed): now that their ping came through it is open, so ask
                # again at once rather than at the next round (hole punching in one round trip).
                self._send_ping(peer, src, now)

    def _on_pong(self, peer: _Peer, msg: Pong, src: Endpoint | None, now: float) -> None:
        sent = peer.pending.pop(msg.tx_id, None)
        if sent is None:
            self.counters["pongs_unknown"] += 1
            return
        self.counters["pongs_received"] += 1
        latency = max(now - sent.sent, 0.0)
        if msg.src[0] != RELAY_MAGIC_IP and src is not None:
            if msg.src in self.discovered or len(self.discovered) < 8:
                self.discovered[msg.src] = now  # how this peer sees us: a candidate endpoint of ours
        if sent.ping_id is not None and sent.ping_id not in peer.answered_pings:
            if len(peer.answered_pings) > 256:
                peer.answered_pings.clear()
            peer.answered_pings.add(sent.ping_id)
            self._out.append(PingResult(sent.ping_id, peer.info.node_key, sent.endpoint,
                                        None if sent.endpoint is not None else self.home_region,
                                        latency * 1000))
        ep = sent.endpoint
        if ep is None or src is None:
            return  # the relay answered: it proves the peer is there, not a direct path
        cand = peer.candidates.get(ep)
        if cand is None:
            return
        cand.last_pong, cand.latency = now, latency
        if cand.bad_until > now:
            return
        if ep == peer.best:
            peer.best_latency = latency
            peer.trust_until = now + TRUST
        elif better(ep, latency, peer.best if now < peer.trust_until else None, peer.best_latency):
            peer.best, peer.best_latency, peer.trust_until = ep, latency, now + TRUST
            peer.abandon_reason = ""
        self._update_path(peer, now)

    def _on_call_me_maybe(self, peer: _Peer, msg: CallMeMaybe, now: float) -> None:
        self.counters["call_me_maybe_received"] += 1
        if now - peer.last_cmm < CALL_ME_MAYBE_MIN:
            return
        peer.last_cmm = now
        for ep in msg.endpoints[:MAX_CANDIDATES]:
            cand = peer.add(ep, "cmm", now)
            if cand is not None and cand.bad_until <= now:
                self._send_ping(peer, ep, now)  # now, while their pings open their NAT to us

    def _check_liveness(self, peer: _Peer, now: float) -> None:
        best = peer.best
        since = peer.data.unanswered_since
        if best is None or since is None or peer.path.type is not PathType.DIRECT:
            return
        since = max(since, peer.path.since)
        if now - since < DATA_TIMEOUT:
            return
        cand = peer.candidates.get(best)
        if cand is not None:
            cand.bad_until = now + BAD_HOLD
        peer.abandon_reason = (f"WireGuard traffic to {best[0]}:{best[1]} unanswered for "
                               f"{now - since:.0f}s (disco pongs do not prove the data path)")
        peer.best, peer.trust_until = None, float("-inf")
        peer.probe_due = True
        self.counters["paths_abandoned"] += 1

    def _update_path(self, peer: _Peer, now: float) -> None:
        if peer.best is not None and now < peer.trust_until:
            path = Path(PathType.DIRECT, peer.best, latency_ms=round(peer.best_latency * 1000, 3),
                        reason="disco pong")
            send_to: Endpoint | None = peer.best
        elif peer.box is None and self._recently_heard(peer, now):
            src = peer.data.received_from
            path = Path(PathType.DIRECT, src, reason="WireGuard traffic (the peer has no disco key)")
            send_to = src
        elif self._relay_ok(peer):
            path = Path(PathType.RELAY, relay_region=peer.info.relay_region,
                        reason=peer.abandon_reason or "no direct path answers")
            send_to = None
        else:
            path = Path(PathType.NONE, reason=peer.abandon_reason or (
                "no disco pong within the last 6.5s" if peer.best is not None else "no endpoint answered yet"))
            send_to = self._fallback(peer, now)
        same = (path.type, path.endpoint, path.relay_region) == (
            peer.path.type, peer.path.endpoint, peer.path.relay_region)
        if same and path.reason == peer.path.reason:
            if path.latency_ms != peer.path.latency_ms:
                peer.path = Path(path.type, path.endpoint, path.relay_region, path.latency_ms,
                                 peer.path.since, path.reason)
        else:
            peer.path = Path(path.type, path.endpoint, path.relay_region, path.latency_ms,
                             peer.path.since if same else now, path.reason)
            if not same:
                self.counters["path_changes"] += 1
        if send_to != peer.send_to or not peer.pushed:
            # Nothing better known (send_to None without a relay): leave WireGuard where it is,
            # it may still be talking to the peer (and it follows a roaming peer by itself).
            if send_to is not None or path.type is PathType.RELAY or not peer.pushed:
                peer.send_to, peer.pushed = send_to, True
                self._out.append(PathChanged(peer.info.node_key, peer.path, send_to))

    def _recently_heard(self, peer: _Peer, now: float) -> bool:
        d = peer.data
        return (d.received_from is not None and d.last_received is not None
                and now - d.last_received < DATA_TIMEOUT)

    def _fallback(self, peer: _Peer, now: float) -> Endpoint | None:
        """Where WireGuard should send while nothing answers: the last good path, else the map's
        first usable endpoint."""
        if peer.best is not None:
            return peer.best
        for ep in peer.info.endpoints:
            cand = peer.candidates.get(ep)
            if cand is None or cand.bad_until <= now:
                return ep
        return None
