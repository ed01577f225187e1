"""The node's side of the control protocol: register, stream the network map, report endpoints, log out.

Usage (what the node daemon does):

    client = ControlClient("http://127.0.0.1:8080", machine_key_private, node_key_private)
    result = await client.register(authkey="mskey-...", hostname="laptop")
    async for netmap in client.stream_map():      # reconnects with backoff; whole NetMaps, never deltas
        apply(netmap)
    await client.close()

Keys are standard-base64 Curve25519 private keys (`generate_private_key()`); the machine key identifies
the machine to the control server, the node key is the WireGuard key peers see.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import json
import logging
import platform
import random
import socket
import time
import urllib.parse
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, AsyncIterator, Callable, Iterable, Mapping

import aiohttp

from magicdns.records import Record

from ..derp.derpmap import RelayMap, RelayMapError
from ..hostresolve import HostResolver, is_address
from ..words import control_unreachable, detail
from ..netmap import DnsConfig, MapNode, NetMap, NetMapError, gc_paused, record_key
from .protocol import (MACHINE_KEY_HEADER, Channel, ErrorCode, FrameReader, ProtocolError,
                       generate_private_key, node_key_proof, public_key_of)

__all__ = ["ControlClient", "ControlError", "LoginRequired", "RegisterResult", "generate_private_key", "public_key_of",
           "MapAssembler"]

log = logging.getLogger("meshnode.control.client")


# Refusals that mean this node is no longer in the tailnet (deleted, logged out, expired, re-keyed).
LOGIN_REFUSALS = frozenset({ErrorCode.NOT_REGISTERED, ErrorCode.NODE_EXPIRED, ErrorCode.NODE_KEY_MISMATCH})


class ControlError(RuntimeError):
    """The control server refused a request (`code`, HTTP `status`) or could not be reached.

    `sealed` is True only for a refusal sealed by the pinned server key to this machine, naming the
    request it answers: anything else (a captive portal's 404, an impostor's 401, a proxy's 502) may
    come from anyone on the path and is treated as a transient failure.
    """

    def __init__(self, code: ErrorCode, message: str, status: int = 0, sealed: bool = False,
                 detail: str = "", final: bool = False) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.sealed = sealed
        self.final = final    # decided here, not heard on the network (a changed pinned key): no retry
        self.detail = detail  # the technical form (a repr), for `-v` and debug logs only

    @property
    def retryable(self) -> bool:
        """Worth retrying soon: the server was unreachable, failed or rate-limited us. (Whether an
        error may change the login state is `logs_out`: only a sealed refusal can.)"""
        if self.final:
            return False
        return self.status == 0 or self.status >= 500 or self.code is ErrorCode.RATE_LIMITED

    @property
    def logs_out(self) -> bool:
        """The pinned server itself says this node is out of the tailnet: drop the map and log out."""
        return self.sealed and self.code in LOGIN_REFUSALS


class LoginRequired(ControlError):
    """The server wants this machine confirmed in a browser at `url` (interactive registration)."""

    def __init__(self, url: str) -> None:
        super().__init__(ErrorCode.AUTHKEY_REQUIRED, f"log in at {url}" if url else "waiting for the login", 401)
        self.url = url


@dataclass(frozen=True, slots=True)
class RegisterResult:
    """What the server assigned at registration."""

    node_id: int
    name: str
    fqdn: str
    user: str
    addresses: tuple[str, ...]
    tags: tuple[str, ...]
    approved_routes: tuple[str, ...]
    exit_node: bool
    ephemeral: bool
    server_public_key: str


class MapAssembler:
    """Rebuilds full `NetMap`s from the stream's full and delta frames (sans-I/O).

    It outlives a stream: a node that reconnects sends `resume` (the server's token for the map held
    here) and the server may answer with a delta instead of a full map (mapbuilder.resume_frame).
    """

    def __init__(self) -> None:
        self.resume: str | None = None   # the server's token for the map held here (None: none yet)
        self._version = 0
        self._domain = ""
        self._self: MapNode | None = None
        self._peers: dict[int, MapNode] = {}
        # The peers as the NetMap holds them (sorted by id), kept while no frame touches a peer: a
        # filter-only or DNS-only delta (a policy or record change reaching every node) then costs
        # microseconds, not a sort of 10,000 peers.
        self._peer_tuple: tuple[MapNode, ...] | None = None
        self._dns = DnsConfig()
        self._filter: tuple[Mapping[str, Any], ...] = ()
        self._derp: Mapping[str, Any] = MappingProxyType({})
        self._ca = ""
        self._derp_map: RelayMap | None = None
        self._tka_head: str | None = None
        self._flow_logs = False
        # Records parsed before (record_key -> Record): a DNS delta carries every record, and parsing
        # one costs ~0.1 ms (dnslib's zone lexer), so only new ones are parsed.
        self._records: dict[tuple, Record] = {}
        # Prefix sets (id -> list of prefix texts) the filter names: a rule's `"src_set": id` stands
        # for `"src": [...]`, so a policy change over the same groups sends each long list once.
        self._sets: dict[str, list] = {}
        self.last_type = ""   # the type of the last frame applied ("full", "delta", "keepalive")

    def apply_sealed(self, chan: Channel, sealed: bytes) -> NetMap | None:
        """One stream frame as it arrives (what the stream's read loop calls per frame): open it with
        the channel, decode, apply. Raises `ProtocolError` (does not open), `NetMapError`, `KeyError`,
        `TypeError` or `ValueError` (a bad frame; the assembler should then be dropped)."""
        if len(sealed) < _GC_PAUSE_BYTES:   # a delta: not worth the context manager's ~1 us
            # The server's own frames: sealed, so trusted to be sane JSON; the strict parser would
            # cost seconds on a 10k-node map.
            return self.apply(json.loads(chan.open_bytes(sealed)))
        with gc_paused(len(sealed) // 256):  # roughly one peer per 256 bytes
            return self.apply(json.loads(chan.open_bytes(sealed)))

    def apply(self, msg: dict[str, Any]) -> NetMap | None:
        """Apply one decoded frame; returns the new map, or None for a keepalive."""
        kind = msg.get("type")
        self.last_type = kind if isinstance(kind, str) else ""
        if kind == "keepalive":
            return None
        if kind == "full":
            self._sets = {}
            netmap = msg.get("netmap")
            if isinstance(netmap, dict) and "packet_filter" in netmap:
                netmap = {**netmap, "packet_filter": self._expand(msg, netmap["packet_filter"])}
            nm = NetMap.from_json(netmap)
            self._records = {}   # only this map's records: the cache never outgrows what a map holds
            self._remember_records(msg["netmap"].get("dns"), nm)
            self.resume = msg.get("resume") if isinstance(msg.get("resume"), str) else None
            self._version, self._domain, self._self = nm.version, nm.domain, nm.self_node
            self._peers = {p.id: p for p in nm.peers}
            # The server sends peers by id; kept only if so (what a delta would rebuild, exactly).
            peers = nm.peers
            in_order = len(self._peers) == len(peers) and all(a.id < b.id for a, b in zip(peers, peers[1:]))
            self._peer_tuple = peers if in_order else None
            self._dns, self._filter, self._derp, self._derp_map = nm.dns, nm.packet_filter, nm.derp, nm.derp_map
            self._ca = nm.tailnet_ca
            self._tka_head, self._flow_logs = nm.tka_head, nm.flow_logs
            return nm
        if kind != "delta":
            raise NetMapError(f"unknown frame type {kind!r}")
        if self._self is None:
            raise NetMapError("a delta arrived before any full map")
        self._version = int(msg["version"])
        if isinstance(msg.get("resume"), str):
            self.resume = msg["resume"]
        if "domain" in msg:
            self._domain = str(msg["domain"])
        if "self" in msg:
            self._self = MapNode.from_json(msg["self"], self._domain)
        # Peers replaced in place (changed or patched, none added or removed) keep their places in the
        # sorted tuple: an endpoint change seen by every node costs each a copy, not a sort.
        replaced: list[int] = []
        if "domain" in msg or any(k in msg for k in ("peers_removed", "peers_present", "peers_online")):
            self._peer_tuple = None   # a new domain changes every peer's fqdn too
        elif "peers_changed" in msg or "peers_patch" in msg:
            try:
                replaced = [int(p["id"]) for p in (msg.get("peers_changed") or ())]
                replaced += [int(p["id"]) for p in (msg.get("peers_patch") or ())]
            except (TypeError, KeyError, ValueError):
                replaced = []
                self._peer_tuple = None   # malformed: the code below says why, as before
            if any(pid not in self._peers for pid in replaced):
                replaced = []
                self._peer_tuple = None
        # Until this frame is fully applied the tuple is unknown (a frame that fails halfway must not
        # leave a stale one for the next delta).
        before, self._peer_tuple = self._peer_tuple, None
        for pid in msg.get("peers_removed") or ():
            self._peers.pop(int(pid), None)
        for p in msg.get("peers_changed") or ():
            node = MapNode.from_json(p, self._domain)
            self._peers[node.id] = node
        for patch in msg.get("peers_patch") or ():
            self._patch(patch)
        if "peers_present" in msg:
            self._keep_only(msg["peers_present"])
        if "peers_online" in msg:
            online = {int(i) for i in msg["peers_online"]}
            for pid, peer in self._peers.items():
                if peer.online != (pid in online):
                    self._peers[pid] = replace(peer, online=pid in online)
        if "dns" in msg:
            self._dns = DnsConfig.from_json(msg["dns"], self._domain, self._records)
            if len(self._records) > 2 * len(self._dns.records) + 64:   # keep only what the map holds
                self._records = {}
                self._remember_records(msg["dns"], None, self._dns)
        if "packet_filter" in msg:
            self._filter = tuple(MappingProxyType(r) for r in self._expand(msg, msg["packet_filter"]))
        if "tailnet_ca" in msg:
            self._ca = str(msg["tailnet_ca"] or "")
        if "derp_map" in msg:
            try:
                self._derp_map = RelayMap.from_json(msg["derp_map"]) if msg["derp_map"] is not None else None
            except RelayMapError as exc:
                raise NetMapError(str(exc)) from None
        if "tka_head" in msg:
            self._tka_head = str(msg["tka_head"]) if msg["tka_head"] else None
        if "flow_logs" in msg:
            self._flow_logs = bool(msg["flow_logs"])
        peers = before
        if peers is not None and replaced:
            in_place = list(peers)
            for pid in replaced:
                in_place[bisect.bisect_left(in_place, pid, key=_peer_id)] = self._peers[pid]
            peers = tuple(in_place)
        if peers is None:
            peers = tuple(sorted(self._peers.values(), key=lambda p: p.id))
        self._peer_tuple = peers
        nm = NetMap(self._version, self._domain, self._self, peers, self._dns, self._filter, self._derp,
                      self._derp_map, tailnet_ca=self._ca, tka_head=self._tka_head,
                      flow_logs=self._flow_logs)
        return nm

    def _expand(self, msg: dict[str, Any], rules: Any) -> Any:
        """`rules` with each `src_set`/`dst_set` reference replaced by its list, from the frame's
        `prefix_sets` or those an earlier frame sent; the sets kept are then exactly those the new
        filter names (what the server assumes). Raises NetMapError for a set it never got."""
        new = msg.get("prefix_sets")
        if new is not None:
            if not isinstance(new, dict) or not all(isinstance(v, list) for v in new.values()):
                raise NetMapError("prefix_sets: expected an object of lists")
            self._sets.update(new)
        if not isinstance(rules, list):
            return rules   # NetMap says what is wrong with it
        named: dict[str, list] = {}
        out = []
        for rule in rules:
            if isinstance(rule, dict) and ("src_set" in rule or "dst_set" in rule):
                rule = dict(rule)
                for ref_key, key in (("src_set", "src"), ("dst_set", "dst")):
                    if ref_key in rule:
                        ref = rule.pop(ref_key)
                        prefixes = self._sets.get(ref) if isinstance(ref, str) else None
                        if prefixes is None:
                            raise NetMapError(f"packet_filter: prefix set {ref!r} was never sent")
                        rule[key] = named[ref] = prefixes
            out.append(rule)
        self._sets = named
        return out

    def _remember_records(self, dns_obj: Any, nm: NetMap | None, dns: DnsConfig | None = None) -> None:
        """Seed the record cache from a `dns` object and the records parsed from it (same order)."""
        records = (nm.dns if nm is not None else dns).records  # type: ignore[union-attr]
        objs = dns_obj.get("records") if isinstance(dns_obj, dict) else None
        if not isinstance(objs, list) or len(objs) != len(records):
            return
        domain = nm.domain if nm is not None else self._domain
        for obj, rec in zip(objs, records):
            key = record_key(obj, domain) if isinstance(obj, dict) else None
            if key is not None:
                self._records[key] = rec

    def _patch(self, patch: Any) -> None:
        """Change only the fields a `peers_patch` entry names (null: the field is dropped)."""
        if not isinstance(patch, dict):
            raise NetMapError("peers_patch: expected objects")
        pid = int(patch["id"])
        old = self._peers.get(pid)
        if old is None:
            # The server thought we held this peer: our map is not what it believes, so start over.
            raise NetMapError(f"peers_patch: peer {pid} is not in the map")
        fast = _patched(old, patch)
        if fast is not None:
            self._peers[pid] = fast
            return
        obj = old.to_json(self._domain)
        for key, value in patch.items():
            if key == "id":
                continue
            if value is None:
                obj.pop(key, None)
            else:
                obj[key] = value
        self._peers[pid] = MapNode.from_json(obj, self._domain)

    def _keep_only(self, present: Any) -> None:
        """A resumed stream lists every peer this node sees: drop the others, and refuse a list that
        names one we do not hold (the resume went wrong: better a full map than a wrong one)."""
        ids = {int(i) for i in present}
        missing = ids - self._peers.keys()
        if missing:
            raise NetMapError(f"resumed map names {len(missing)} peer(s) this node does not hold")
        for pid in list(self._peers):
            if pid not in ids:
                del self._peers[pid]


def _peer_id(peer: MapNode) -> int:
    return peer.id


# Above this a frame is a (big) full map: decode it with the cyclic GC paused (gc_paused).
_GC_PAUSE_BYTES = 256 * 1000

# The fields an endpoint, presence, relay or disco change patches, with what `MapNode.from_json`
# makes of each value (None: the field dropped, i.e. its default). A patch naming only these is
# applied to the peer as it is; any other field goes the general way (to_json, change, from_json).
_FAST_PATCH: dict[str, Callable[[Any], Any]] = {
    "endpoints": lambda v: tuple(v or ()),
    "online": lambda v: bool(v) if v is not None else False,
    "last_seen": lambda v: float(v) if v is not None else None,
    "disco_key": lambda v: str(v or ""),
}


def _patched(old: MapNode, patch: dict[str, Any]) -> MapNode | None:
    """`old` with a patch of only `_FAST_PATCH` fields (and home_region) applied, exactly as the
    general path would make it; None when the patch names any other field."""
    changes: dict[str, Any] = {}
    for key, value in patch.items():
        if key == "id":
            continue
        conv = _FAST_PATCH.get(key)
        if conv is not None:
            if key == "endpoints" and value is not None and not isinstance(value, (list, tuple)):
                return None   # e.g. a string: the general path says what is wrong with it
            try:
                changes[key] = conv(value)
            except (TypeError, ValueError):
                return None
        elif key == "home_region":
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                return None   # refused by from_json, with its message
            changes[key] = value
        else:
            return None
    return replace(old, **changes) if changes else old


@dataclass(frozen=True)
class StreamState:
    """The map stream as operators see it: up, or broken since when and why."""

    connected: bool
    since: float | None   # unix time of the last change between up and broken
    error: str | None     # why it is not up

    def to_json(self) -> dict[str, object]:
        return {"connected": self.connected, "since": self.since, "error": self.error}


class ControlClient:
    """A node's connection to a control server: one URL, or several replicas of one tailnet
    ("URL1,URL2", tried in order: the client stays on the one that answers and moves to the next when
    it cannot be reached; replicas share the server key, so the pinned key holds for all), or a host
    name with several addresses (each tried in turn, the one that answered kept: hostresolve.py).
    Host names are resolved through the system's original resolvers, never through our own DNS."""

    def __init__(self, server_url: str, machine_key_private: str, node_key_private: str, *,
                 server_public_key: str | None = None, timeout: float = 15.0,
                 resolver: HostResolver | None = None) -> None:
        self.server_urls = tuple(u.strip().rstrip("/") for u in server_url.split(",") if u.strip())
        self._current = 0
        self.machine_key_private = machine_key_private
        self.machine_key_public = public_key_of(machine_key_private)
        self.node_key_private = node_key_private
        self.node_key_public = public_key_of(node_key_private)
        self.server_public_key = server_public_key  # pinned after the first GET /key
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self.resolver = resolver if resolver is not None else HostResolver()
        self._channel: Channel | None = None
        self.stream_since: float | None = None  # when the map stream last came up or broke
        self.stream_error: str | None = None    # why it is down (None while connected)
        # The map held, kept across reconnects: its resume token asks the server for only what changed.
        self._assembler = MapAssembler()
        self.resumes = 0   # streams whose first frame was a delta on the map held (not a full map)

    @property
    def server_url(self) -> str:
        """The URL in use now."""
        return self.server_urls[self._current]

    def _next_server(self) -> bool:
        """Move to the next URL; False when there is only one."""
        if len(self.server_urls) < 2:
            return False
        self._current = (self._current + 1) % len(self.server_urls)
        log.info("control: trying %s", self.server_url)
        return True

    async def __aenter__(self) -> "ControlClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session (ends any running map stream)."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self.resolver.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # aiohttp's own DNS cache is off: it rotates a name's addresses on every connection,
            # where the node must keep to the one that answers (the resolver orders them).
            connector = aiohttp.TCPConnector(resolver=self.resolver, use_dns_cache=False)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_read=None))
        return self._session

    async def server_addresses(self) -> tuple[str, ...]:
        """Every address of every control URL (through the same resolver as the connections), for
        routes that must keep the control servers reachable outside the tunnel (an exit node).
        A name that does not resolve now is left out rather than failing the others."""
        out: list[str] = []
        for url in self.server_urls:
            host = urllib.parse.urlsplit(url).hostname
            if not host:
                continue
            try:
                out.extend(str(a) for a in await self.resolver.addresses(host))
            except OSError as exc:
                log.warning("control: cannot resolve %s: %s", host, exc)
        return tuple(dict.fromkeys(out))

    def _answered(self, resp: aiohttp.ClientResponse) -> None:
        """The address that answered for a host name is the one to try first next time."""
        host = resp.url.host
        if not host or is_address(host):
            return
        # A short answer read in full has released its connection already: the protocol still
        # names the transport (aiohttp's `_protocol`; pinned by tests/unit/test_hostresolve.py).
        conn = resp.connection
        transport = conn.transport if conn is not None else getattr(getattr(resp, "_protocol", None),
                                                                    "transport", None)
        if transport is None:
            return
        peer = transport.get_extra_info("peername")
        if peer:
            self.resolver.prefer(host, str(peer[0]))

    async def fetch_server_key(self) -> str:
        """GET /key (from the first server that can be reached); pins the key on first use and
        refuses a different one later."""
        for attempt in range(len(self.server_urls)):
            try:
                return await self._fetch_server_key_once()
            except ControlError as exc:
                if exc.status or attempt == len(self.server_urls) - 1 or not self._next_server():
                    raise
        raise AssertionError("unreachable")

    async def _fetch_server_key_once(self) -> str:
        try:
            async with self._http().get(self.server_url + "/key",
                                        timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
                self._answered(resp)
                if resp.status != 200:
                    raise ControlError(ErrorCode.INTERNAL, f"GET /key answered {resp.status}", resp.status)
                body = await resp.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
            raise _unreachable(self.server_url, exc) from None
        key = str(body.get("public_key", ""))
        if self.server_public_key is not None and key != self.server_public_key:
            raise ControlError(ErrorCode.BAD_SEAL, "the server key changed since it was pinned;"
                               " refusing to talk to a possibly different server", final=True)
        self.server_public_key = key
        return key

    async def _diagnosed(self, err: ControlError) -> ControlError:
        """An unsealed 401 may mean our pinned key is no longer the server's (reinstalled server):
        ask GET /key, and if it differs, say so as a final error naming the way out. Never re-pins:
        an impostor can publish any key, so this only changes the words, not the login state."""
        if err.sealed or err.status != 401 or self.server_public_key is None:
            return err
        try:
            await self.fetch_server_key()
        except ControlError as exc:
            if exc.final:
                return exc
        return err

    async def _chan(self) -> Channel:
        if self._channel is None:
            if self.server_public_key is None:
                await self.fetch_server_key()
            assert self.server_public_key is not None
            self._channel = Channel(self.machine_key_private, self.server_public_key)
        return self._channel

    async def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """One sealed request and its sealed answer, from the first server that can be reached."""
        for attempt in range(len(self.server_urls)):
            try:
                return await self._post_once(path, payload)
            except ControlError as exc:
                if exc.status or exc.sealed or attempt == len(self.server_urls) - 1 or not self._next_server():
                    raise
        raise AssertionError("unreachable")

    async def _post_once(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        chan = await self._chan()
        payload = dict(payload, ts=time.time())
        sealed = chan.seal(payload)
        try:
            async with self._http().post(self.server_url + path, data=sealed,
                                         headers={MACHINE_KEY_HEADER: self.machine_key_public},
                                         timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
                self._answered(resp)
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _unreachable(self.server_url, exc) from None
        if status != 200:
            raise await self._diagnosed(_error_from(status, body, chan, sealed))
        try:
            return chan.open(body)[1]
        except ProtocolError as exc:
            raise ControlError(exc.code, f"answer from server: {exc.message}") from None

    async def register(self, authkey: str | None = None, hostname: str | None = None, os: str | None = None,
                       advertise_routes: Iterable[str] = (), advertise_tags: Iterable[str] = (),
                       advertise_exit_node: bool = False, ephemeral: bool = False,
                       endpoints: Iterable[str] = (), disco_key: str = "",
                       interactive: bool = False, key_signature: str | None = None) -> RegisterResult:
        """Register this machine (or log it in again: same machine key -> same node, name, addresses).

        `authkey` is needed for a new machine or a logged-out one. `key_signature` (base64) is the
        Tailnet Lock signature of our node key, e.g. a rotation signature after a new node key
        (node/lock.py). Raises `ControlError` with the server's reason (e.g. AUTHKEY_USED,
        AUTHKEY_EXPIRED, TAG_NOT_ALLOWED).
        """
        await self._chan()
        assert self.server_public_key is not None
        if authkey and "--TL" in authkey:
            # A pre-signed auth key (`meshnode lock sign AUTHKEY`): sign our node key with its
            # credential, as tailscaled does, and send the plain key (meshnode/tka/nodesig.py).
            from ..tka.errors import TKAError
            from ..tka.nodesig import sign_by_credential, unwrap_authkey

            try:
                wrapped = unwrap_authkey(authkey)
                assert wrapped is not None
                key_signature = base64.b64encode(sign_by_credential(
                    wrapped, base64.b64decode(self.node_key_public)).serialize()).decode()
            except TKAError as exc:
                raise ControlError(ErrorCode.BAD_REQUEST, f"the pre-signed auth key is not valid: {exc}") from None
            authkey = wrapped.authkey
        ts = time.time()
        payload = {
            "authkey": authkey, "hostname": hostname or socket.gethostname(),
            "os": os if os is not None else platform.system().lower(),
            "node_key": self.node_key_public,
            "node_key_proof": node_key_proof(self.node_key_private, self.server_public_key,
                                             self.machine_key_public, ts),
            "proof_ts": ts,
            "advertise_routes": list(advertise_routes), "advertise_tags": list(advertise_tags),
            "advertise_exit_node": advertise_exit_node, "ephemeral": ephemeral,
            "endpoints": list(endpoints),
        }
        if disco_key:
            payload["disco_key"] = disco_key
        if key_signature:
            payload["key_signature"] = key_signature
        if interactive:
            payload["interactive"] = True
        body = await self._post("/machine/register", payload)
        if interactive and "node" not in body:
            raise LoginRequired(str(body.get("auth_url") or ""))
        try:
            node = MapNode.from_json(body.get("node"))
        except NetMapError as exc:
            raise ControlError(ErrorCode.BAD_REQUEST, f"bad registration answer: {exc}") from None
        return RegisterResult(node.id, node.name, node.fqdn, node.user, node.addresses, node.tags,
                              node.approved_routes, node.exit_node, node.ephemeral, self.server_public_key)

    async def login_interactive(self, on_url: Callable[[str], None], timeout: float = 600.0,
                                **register_kw: Any) -> RegisterResult:
        """Register without an auth key: the server gives a URL (`on_url` is called with each new
        one) where a signed-in user confirms this machine; returns once they did. The server holds
        each request until the confirmation, so this joins within a round trip of it."""
        deadline = time.monotonic() + timeout
        shown = ""
        backoff = 0.2
        while True:
            try:
                return await self.register(interactive=True, **register_kw)
            except LoginRequired as need:
                backoff = 0.2
                if need.url and need.url != shown:
                    shown = need.url
                    on_url(need.url)
            except ControlError as exc:
                # A restarting or unreachable server: the confirmation is stored there, so keep
                # asking (with backoff) until the deadline; a refusal ends the login.
                if not exc.retryable or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            if time.monotonic() > deadline:
                raise ControlError(ErrorCode.AUTHKEY_REQUIRED, f"nobody confirmed {shown} within {timeout:g}s")

    async def update_endpoints(self, endpoints: Iterable[str], disco_key: str = "",
                               home_region: int | None = None) -> None:
        """Report the UDP endpoints (`ip:port`) peers can reach this node at (and the disco key of
        this run, which peers seal their path probes to, and the relay region it homes on)."""
        body: dict[str, Any] = {"node_key": self.node_key_public, "endpoints": list(endpoints)}
        if disco_key:
            body["disco_key"] = disco_key
        if home_region is not None:
            body["home_region"] = home_region
        await self._post("/machine/endpoints", body)

    async def tka(self, verb: str, body: dict[str, Any]) -> dict[str, Any]:
        """One Tailnet Lock request (`/machine/tka/VERB`: init, bootstrap, sync/offer, sync/send, sign,
        disable), sealed like every node request; see meshnode/control/lock.py."""
        return await self._post(f"/machine/tka/{verb}", dict(body, node_key=self.node_key_public))

    async def upload_flows(self, body: dict[str, Any]) -> dict[str, Any]:
        """Connection-log windows (`/machine/flows`, meshnode/control/flows.py); answers {ack}."""
        return await self._post("/machine/flows", dict(body, node_key=self.node_key_public))

    async def request_cert(self, csr_pem: str) -> tuple[str, str]:
        """Ask for a certificate for this node's names (control/ca.py): the CSR proves we hold the
        key, the server decides the names. Returns (certificate PEM, CA certificate PEM)."""
        answer = await self._post("/machine/cert", {"node_key": self.node_key_public, "csr": csr_pem})
        cert, ca = answer.get("cert"), answer.get("ca")
        if not isinstance(cert, str) or not isinstance(ca, str):
            raise ControlError(ErrorCode.INTERNAL, "answer from server: no certificate in it")
        return cert, ca

    async def logout(self) -> None:
        """Log this node out: it leaves every map; a new `register` with an auth key brings it back."""
        await self._post("/machine/logout", {"node_key": self.node_key_public})

    async def fetch_map(self) -> NetMap:
        """One full map, without streaming."""
        async for nm in self.stream_map(reconnect=False, once=True):
            return nm
        raise ControlError(ErrorCode.INTERNAL, "the map stream ended before the first map")

    def _stream_up(self, error: str | None) -> None:
        """Record the map stream's state for operators: connected (error None) or broken since when."""
        if (error is None) != (self.stream_error is None) or self.stream_since is None:
            self.stream_since = time.time()
        self.stream_error = error

    @property
    def stream_state(self) -> StreamState:
        return StreamState(self.stream_since is not None and self.stream_error is None,
                           self.stream_since, self.stream_error)

    async def stream_map(self, *, reconnect: bool = True, once: bool = False,
                         max_backoff: float = 10.0) -> AsyncIterator[NetMap]:
        """Full `NetMap`s as the server pushes changes; the first one arrives at once.

        On a dropped connection, a server error or any answer not sealed by the pinned server key it
        reconnects with capped exponential backoff and jitter (the next map after a reconnect is a full
        one). Only a sealed login refusal (node deleted, expired, logged out, key mismatch; see
        `ControlError.logs_out`) ends the stream with `ControlError`.
        """
        backoff, tried = 0.1, 0
        while True:
            try:
                async for nm in self._stream_once():
                    backoff, tried = 0.1, 0
                    if self.stream_error is not None:
                        log.info("map stream: connected again")
                    self._stream_up(None)
                    yield nm
                    if once:
                        return
                err = ControlError(ErrorCode.INTERNAL, "the server closed the map stream")
            except ControlError as exc:
                if exc.logs_out:
                    raise
                err = exc
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
                err = _unreachable(self.server_url, exc)
            # Said once when the stream breaks (or the reason changes), not at every backoff.
            if err.message != self.stream_error:
                log.warning("map stream: %s; reconnecting with backoff", err.message)
            log.debug("map stream: %s (%s); reconnecting in %.1fs", err.message, err.detail, backoff)
            self._stream_up(err.message)
            if not reconnect:
                raise err
            if not err.status and not err.sealed and self._next_server():
                tried += 1
                if tried < len(self.server_urls):
                    continue   # another replica at once; back off only after trying them all
            tried = 0
            await asyncio.sleep(backoff * (0.5 + random.random() / 2))
            backoff = min(max_backoff, backoff * 2)

    async def _stream_once(self) -> AsyncIterator[NetMap]:
        chan = await self._chan()
        request: dict[str, Any] = {"node_key": self.node_key_public, "ts": time.time(), "stream": True,
                                   "patches": True, "prefix_sets": True}
        assembler = self._assembler
        if assembler.resume is not None:
            request["resume"] = assembler.resume
        body = chan.seal(request)
        # sock_read bounds silence: the server sends a keepalive every KEEPALIVE_SECONDS.
        timeout = aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_read=self.timeout * 4)
        async with self._http().post(self.server_url + "/machine/map", data=body,
                                     headers={MACHINE_KEY_HEADER: self.machine_key_public},
                                     timeout=timeout) as resp:
            self._answered(resp)
            if resp.status != 200:
                err = _error_from(resp.status, await resp.content.read(1 << 16), chan, body)
                raise await self._diagnosed(err)
            reader = FrameReader()
            first = True
            async for chunk in resp.content.iter_any():
                try:
                    frames = reader.feed(chunk)
                except ProtocolError as exc:
                    raise ControlError(exc.code, exc.message) from None
                for sealed in frames:
                    try:
                        nm = assembler.apply_sealed(chan, sealed)   # all of a frame's work on the node
                        if first and nm is not None:
                            first = False
                            self.resumes += assembler.last_type == "delta"
                    except ProtocolError as exc:
                        self._assembler = MapAssembler()
                        raise ControlError(exc.code, f"map frame: {exc.message}", 0) from None
                    except (NetMapError, KeyError, TypeError, ValueError) as exc:
                        # What we hold is no longer trusted: the next stream asks for a full map.
                        self._assembler = MapAssembler()
                        raise ControlError(ErrorCode.BAD_REQUEST, f"bad map frame: {exc}", 0) from None
                    if nm is not None:
                        yield nm


def _unreachable(url: str, exc: BaseException) -> ControlError:
    """The server could not be asked: what failed, where, and what to try, in words."""
    return ControlError(ErrorCode.INTERNAL, control_unreachable(url, exc), detail=detail(exc))


def _error_from(status: int, body: bytes, chan: Channel | None = None, request: bytes = b"") -> ControlError:
    """The error an HTTP answer carries; `sealed` only when it opens under the pinned server key and
    names `request` (the sealed request it answers) by its nonce."""
    if chan is not None and request:
        try:
            obj = json.loads(chan.open_bytes(body))
            if obj.get("re") == base64.b64encode(request[:24]).decode():
                return ControlError(ErrorCode(obj.get("error")), str(obj.get("message", "")), status, sealed=True)
        except (ProtocolError, ValueError, TypeError, AttributeError):
            pass
    try:
        obj = json.loads(body)
        code = ErrorCode(obj.get("error"))
        message = str(obj.get("message", ""))
    except (ValueError, AttributeError, TypeError):
        code, message = ErrorCode.INTERNAL, body[:200].decode(errors="replace")
    return ControlError(code, f"{message} (HTTP {status}, not sealed by the server key)", status)
