"""The coordination server over HTTP (aiohttp): node protocol, map streams, admin API, metrics.

Node endpoints (bodies sealed, see `protocol.py`):
  GET  /key                 the server's public key (JSON)
  POST /machine/register    register or log in again          -> sealed {"node": MapNode}
  POST /machine/map         the map stream: length-prefixed sealed frames (full, delta, keepalive)
  POST /machine/endpoints   report UDP endpoints              -> sealed {"ok": true}
  POST /machine/logout      leave the tailnet                 -> sealed {"ok": true}
  POST /machine/cert        {"csr"}: a certificate for the node's names from the tailnet CA
                                                              -> sealed {"cert": PEM, "ca": PEM}
Admin endpoints (header `Authorization: Bearer <admin token>`; the token's SHA-256 is in the DB):
  GET /admin/nodes, POST /admin/nodes/{ref}/rename {"name"}, DELETE /admin/nodes/{ref},
  GET|PUT /admin/policy, POST /admin/authkeys {"user", "reusable", "ephemeral", "tags", "expiry"},
  GET /admin/audit?since=UNIX&actor=A&target=T&limit=N (the audit log, oldest first),
  GET /admin/audit/verify (the hash chain's state)
GET /metrics (Prometheus text) needs the admin token too, or is served without one on its own
listener (`start_metrics`, `control serve --metrics HOST:PORT`), never to nodes by default.
Unauthenticated: GET /healthz.
With an embedded relay (`relay=`): GET /derp (DERP upgrade), /derp/probe, /generate_204; the relay
admits exactly the active nodes' keys and drops a node as soon as a snapshot no longer has it.

Errors are JSON `{"error": code, "message": text}` with a 4xx/5xx status; a handler never takes
the server down.

Change propagation: every write through this server marks the tailnet dirty; a poller notices
writes by other processes (the admin CLI, `magicdns records --db`) through the store's change
counter and the records version. A publisher coalesces dirty marks, builds one snapshot, persists
the next map version, and brings every stream it concerns up to it: a stream that keeps up gets its
delta written by the publisher itself (one HTTP/1.1 chunk straight to its transport); one that is
behind, stuck or due a full map is woken and its own task sends the frame under the deadline watch.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import gc
import math
import dataclasses
import hmac
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from aiohttp import web

from ..derp.admission import TailnetKeys, node_keys
from ..derp.derpmap import RelayMap, RelayMapFile
from ..derp.server import RelayServer
from ..netmap import gc_paused
from ..policy import DEFAULT_POLICY_TEXT, Policy, PolicyError, parse_policy
from . import authkeys, ca as tailnet_ca, naming
from .access import TagNotAllowed, authorize, set_policy
from ..policy import idpgroups
from .jobs import Job, JobLocks
from .mapbuilder import (RESUMABLE_ACTIONS, SELF_REACH_ACTIONS, NodeGone, ResumeToken, Snapshot, StreamState,
                         build_snapshot, concerned, fast_forward, map_node, next_frame, resumable, resume_frame, with_version)
from .protocol import (KEEPALIVE_SECONDS, MACHINE_KEY_HEADER, MAX_REQUEST_BYTES, SEALED_HEADER, Channel,
                       ErrorCode, ProtocolError, ReplayGuard, TokenBucket, check_timestamp, decode_key, frame,
                       parse_json, public_key_of, verify_node_key_proof)
from .store import (REPLICA_DEAD_AFTER, REPLICA_HEARTBEAT, ChangeLogGap, Conflict, ControlStore, ControlStoreError,
                    InvalidValue,
                    Node, NotFound, Registration,
                    check_tag, normalize_cidr)

log = logging.getLogger("meshnode.control.server")

ADMIN_ACTOR = "admin-token"   # who the audit log names for changes through the admin API
PRESENCE_FINAL = 1e9          # heartbeat interval written by a cleanly stopped server: its word stands
RESUME_MAX_CHANGES = 20_000   # a node further behind than this gets a full map: reading the log costs more

_STATUS = {
    ErrorCode.BAD_REQUEST: 400, ErrorCode.UNAUTHORIZED: 401, ErrorCode.BAD_SEAL: 401, ErrorCode.REPLAY: 401,
    ErrorCode.AUTHKEY_REQUIRED: 401, ErrorCode.AUTHKEY_UNKNOWN: 401, ErrorCode.AUTHKEY_EXPIRED: 403,
    ErrorCode.AUTHKEY_USED: 403, ErrorCode.AUTHKEY_REVOKED: 403, ErrorCode.NOT_REGISTERED: 403,
    ErrorCode.NODE_EXPIRED: 403, ErrorCode.NODE_KEY_MISMATCH: 403, ErrorCode.BAD_NODE_KEY_PROOF: 403,
    ErrorCode.TAG_NOT_ALLOWED: 403, ErrorCode.RATE_LIMITED: 429, ErrorCode.NOT_FOUND: 404, ErrorCode.CONFLICT: 409, ErrorCode.INTERNAL: 500,
}


class _GcClock:
    """The cyclic GC's collections in this process by generation, and the seconds they took
    (`gc.callbacks`): a full collection walks the whole heap (~300 MB at 10,000 nodes), and when one
    lands inside a change's build or fan-out, that change waits for it (/metrics)."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            g = info["generation"]
            self.count[g] += 1
            self.seconds[g] += time.perf_counter() - self._t0

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)


GC_CLOCK = _GcClock()


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Tunables; the defaults suit production, tests shorten the timers."""

    poll_interval: float = 0.05         # how often to look for changes by other processes
    coalesce: float = 0.02              # gather changes this long before publishing a snapshot
    keepalive: float = KEEPALIVE_SECONDS
    ephemeral_grace: float = 300.0      # an offline ephemeral node is deleted after this long
    reap_interval: float = 5.0
    # Requests from machine keys no node has (registrations, strangers): anyone can mint such keys,
    # so they share one budget and cannot crowd out the tailnet's own nodes.
    stream_deadline: float = 30.0       # a map stream that takes no bytes for this long is closed
    full_map_slot: float = 1.0          # how long a slow reader may hold one of the full-map slots
    max_streams_per_node: int = 2
    presence_coalesce: float = 0.2      # streams that come or go within this long: one presence write
    audit_prune_interval: float = 3600.0
    expiry_interval: float = 5.0        # how often expired logins are looked for (control/jobs.py)
    unregistered_rate: float = 200.0    # a second
    unregistered_burst: float = 1000.0
    presence_interval: float = 15.0     # how often the online set is written for `control nodes ls`
    # One of several replicas serving the same (PostgreSQL) database: its id, what it listens on, how
    # often it heartbeats and how long a silent replica counts as alive.
    replica_id: str | None = None
    replica_listen: str = ""
    replica_heartbeat: float = REPLICA_HEARTBEAT
    replica_dead_after: float = REPLICA_DEAD_AFTER


_CHAN = web.RequestKey("meshnode.channel", Channel)
_NONCE = web.RequestKey("meshnode.nonce", str)
_NODE = web.RequestKey("meshnode.node", object)   # the machine's node as `_open` read it (or None)


def _error(code: ErrorCode, message: str, request: web.Request | None = None) -> web.Response:
    """An error answer. To a node whose request opened, it is sealed to its machine key and names the
    request's nonce: the node acts on a refusal only when it is sealed so (an impostor or a captive
    portal answering on the control URL cannot log it out, nor replay an old refusal)."""
    chan = request.get(_CHAN) if request is not None else None
    if chan is not None:
        body = chan.seal({"error": code.value, "message": message, "re": request[_NONCE]})  # type: ignore[index]
        return web.Response(body=body, status=_STATUS[code], content_type="application/octet-stream",
                            headers={SEALED_HEADER: "1"})
    return web.json_response({"error": code.value, "message": message}, status=_STATUS[code])


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                  ) -> web.StreamResponse:
    """Turn precise exceptions into statuses at the edge; anything unexpected is a logged 500."""
    try:
        return await handler(request)
    except ProtocolError as exc:
        return _error(exc.code, exc.message, request)
    except authkeys.AuthKeyRefused as exc:
        return _error(ErrorCode(exc.reason.value), str(exc), request)
    except TagNotAllowed as exc:
        return _error(ErrorCode.TAG_NOT_ALLOWED, str(exc), request)
    except NotFound as exc:
        return _error(ErrorCode.NOT_FOUND, str(exc), request)
    except (Conflict, naming.NameTaken) as exc:
        return _error(ErrorCode.CONFLICT, str(exc), request)
    except (InvalidValue, naming.NameInvalid, PolicyError) as exc:
        return _error(ErrorCode.BAD_REQUEST, str(exc), request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = ErrorCode.NOT_FOUND if exc.status == 404 else ErrorCode.BAD_REQUEST
        resp = _error(code, exc.reason)
        resp.set_status(exc.status)
        return resp
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return _error(ErrorCode.INTERNAL, "internal error (see the server log)", request)


class ControlServer:
    """One coordination server bound to one store."""

    def __init__(self, store: ControlStore, config: ServerConfig = ServerConfig(), *,
                 relay: RelayServer | None = None, relay_map: RelayMap | None = None,
                 relay_map_file: RelayMapFile | None = None) -> None:
        self.store = store
        self.config = config
        self.private_key = store.server_private_key()
        self.public_key = public_key_of(self.private_key)
        self.replay = ReplayGuard(load=store.replay_mark)
        self.ca = _ensure_ca(store, time.time())
        self._cert_buckets: dict[int, TokenBucket] = {}
        self._unregistered = TokenBucket(config.unregistered_rate, config.unregistered_burst)
        self._channels: OrderedDict[str, Channel] = OrderedDict()
        self.online: dict[int, int] = {}          # node id -> open streams
        self.remote_online: frozenset[int] = frozenset()   # nodes streaming from the other live replicas
        self.doorbell: Any = None                 # doorbell.Doorbell on a PostgreSQL store
        self.snapshot: Snapshot | None = None
        # Every open stream (only streams a snapshot concerns get a frame: an endpoint change goes to
        # the nodes that see that node, not the whole tailnet).
        self._streams: dict[int, _Stream] = {}
        self._dirty = asyncio.Event()
        self._presence_changed = asyncio.Event()  # a stream came or went: write presence now
        self._seen_pending: set[int] = set()      # nodes whose streams ended: last-seen to write
        self._full_maps = asyncio.Semaphore(8)
        self._node_streams: dict[int, list[tuple[asyncio.Task[Any] | None, web.Request]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        # Jobs that run once per tailnet: on PostgreSQL under per-job advisory locks (jobs.py).
        self.jobs = JobLocks(getattr(store.db, "url", None))
        self._seen_counter = -1
        self._built_counter = -1
        self._seen_records = -1
        self._records: tuple | None = None
        self._policy_cache: tuple[str | None, Policy | None] = ("\0", None)
        self.stats = {"registrations": 0, "refusals": 0, "snapshots": 0, "frames": 0, "streams": 0,
                      "slow_streams_closed": 0, "resumed": 0, "full_maps": 0,
                      "frames_direct": 0,   # frames written by the publisher itself (`_write_now`)
                      "fanout_cpu": 0.0}    # the publisher's CPU seconds bringing streams up to date
        self._changes_memo: dict[tuple[int, int], list[Any]] = {}   # (since, upto) -> change log
        self.resume_refusals: dict[str, int] = {}   # why a resume token got a full map (reason -> count)
        # Where the time of a change goes (wall clock, for /metrics and bench/scale.sh), for each of
        # the last few snapshots: when the change was noticed (doorbell, poll or a local write), when
        # the build began and the snapshot was published, and when the last frame went out.
        self._dirty_at = 0.0
        self._fanout_wall = 0.0   # wall seconds the last publish spent writing frames (see _publisher)
        self.phases: collections.deque[dict[str, float]] = collections.deque(maxlen=8)
        self._epoch = store.tailnet_epoch()
        self.app = web.Application(middlewares=[_errors], client_max_size=MAX_REQUEST_BYTES)
        self.app.add_routes([
            web.get("/key", self._key), web.get("/healthz", self._health), web.get("/metrics", self._metrics),
            web.post("/machine/register", self._register), web.post("/machine/map", self._map),
            web.post("/machine/endpoints", self._endpoints), web.post("/machine/logout", self._logout),
            web.post("/machine/cert", self._cert),
            web.get("/admin/nodes", self._admin_nodes), web.post("/admin/nodes/{ref}/rename", self._admin_rename),
            web.delete("/admin/nodes/{ref}", self._admin_delete), web.get("/admin/policy", self._admin_policy_get),
            web.put("/admin/policy", self._admin_policy_set), web.post("/admin/authkeys", self._admin_authkey),
            web.get("/admin/audit", self._admin_audit), web.get("/admin/audit/verify", self._admin_audit_verify),
        ])
        # The relay map in the network map: `relay_map` (the embedded relay's region), then the
        # --derp-map file, then the policy's "derpMap" section, each on top of the one before.
        self.relay, self.relay_map, self.relay_map_file = relay, relay_map, relay_map_file
        self.relay_keys = TailnetKeys()
        if relay is not None:
            relay.admit = self.relay_keys
            relay.attach(self.app)
        from .lock import ControlLock  # Tailnet Lock: the chain, signatures and /machine/tka/* endpoints
        self.tka = ControlLock(self)
        self.tka.attach(self.app)
        from .flows import ControlFlows  # connection logs: POST /machine/flows
        ControlFlows(self).attach(self.app)
        self.app.on_startup.append(self._on_startup)
        self.app.on_shutdown.append(self._on_shutdown)
        self._runner: web.AppRunner | None = None
        # Set by the admin console (console/web.py `mount`): OIDC group members for the policy's groups
        # ({"group:eng": users}), and the browser login of a machine without an auth key:
        # async (machine_key, node_key, hostname, os) -> (authkey, auth URL).
        self.policy_groups: Callable[[], dict[str, tuple[str, ...]]] | None = None
        self.interactive_login: Callable[[str, str, str, str], Awaitable[tuple[str | None, str | None]]] | None = None
        self._metrics_runner: web.AppRunner | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def _on_startup(self, _app: web.Application) -> None:
        self._publish()
        url = getattr(self.store.db, "url", None)
        if url is not None:   # PostgreSQL: changes ring at once; the poll stays as the fallback
            from .doorbell import Doorbell
            loop = asyncio.get_running_loop()
            self.doorbell = Doorbell(url, lambda: loop.call_soon_threadsafe(self.mark_dirty))
            self.doorbell.start()
        if self.relay is not None:
            await self.relay.start()
        for coro in (self._publisher(), self._poller(), self._reaper(), self._audit_pruner(),
                     self._expiry_sweeper(), self._presence()):
            self._tasks.append(asyncio.create_task(coro))

    async def _on_shutdown(self, _app: web.Application) -> None:
        if self.doorbell is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.doorbell.stop)
            self.doorbell = None
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
        self._tasks.clear()
        await asyncio.get_running_loop().run_in_executor(None, self.jobs.close)
        self._wake_streams()

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 = any free port); returns the port."""
        GC_CLOCK.install()
        # handler_cancellation: a map stream whose client went away must end at once (it marks the
        # node offline), not at the next keepalive write.
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=4096)
        await site.start()
        sockets = site._server.sockets  # type: ignore[union-attr]
        return int(sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._write_seen()   # the streams the shutdown ended
            try:  # nobody is online on a stopped server: `control nodes ls` says so at once, and
                # keeps saying so (no heartbeat will follow) until a server starts and writes again
                if self.config.replica_id:
                    self.store.remove_replica(self.config.replica_id)
                else:
                    self.store.set_presence((), time.time(), PRESENCE_FINAL)
            except ControlStoreError:
                log.exception("recording presence failed")

    async def _presence(self) -> None:
        """Write who is online now and then (and at once when it changes), so `control nodes ls`
        shows ONLINE and a LAST SEEN that keeps moving while a node stays connected. A replica
        heartbeats instead, and learns from the other replicas' heartbeats who streams from them."""
        interval = self.config.replica_heartbeat if self.config.replica_id else self.config.presence_interval
        while True:
            self._presence_changed.clear()
            self._write_seen()
            try:
                if self.config.replica_id:
                    self._heartbeat()
                else:
                    self.store.set_presence(list(self.online), time.time(), self.config.presence_interval)
            except Exception:
                log.exception("recording presence failed")
            # Not wait_for: on Python 3.11 it swallows a cancellation that arrives as the event is
            # set (streams closing at shutdown set it), and this loop then ran on and stop() hung.
            waiter = asyncio.ensure_future(self._presence_changed.wait())
            try:
                done, _ = await asyncio.wait({waiter}, timeout=interval)
            finally:
                waiter.cancel()
            if done:
                # Streams came or went: gather the others arriving with them before writing. In a
                # reconnect storm (a dead replica's nodes arriving by the thousand) this loop wrote
                # a heartbeat, a blocking round trip with every online id, after each arrival.
                await asyncio.sleep(self.config.presence_coalesce)

    def _write_seen(self) -> None:
        """Record the last-seen time of the nodes whose streams ended since the last call."""
        if not self._seen_pending:
            return
        ids, self._seen_pending = sorted(self._seen_pending), set()
        try:
            self.store.touch(ids, time.time())
        except Exception:   # never the presence loop's end: it also keeps this replica alive
            log.exception("recording last-seen of %d node(s) failed", len(ids))
        self.mark_dirty()

    def _heartbeat(self) -> None:
        now = time.time()
        me = self.config.replica_id
        self.store.heartbeat_replica(me or "", self.config.replica_listen, list(self.online), self._seen_counter, now)
        remote = frozenset().union(*(r.online for r in self.store.list_replicas()
                                     if r.id != me and r.alive(now, self.config.replica_dead_after)))
        if remote != self.remote_online:
            self.remote_online = remote
            self.mark_dirty()   # peers' online flags changed

    def _online_everywhere(self) -> dict[int, int]:
        if not self.remote_online:
            return self.online
        merged = dict.fromkeys(self.remote_online, 1)
        merged.update(self.online)
        return merged

    # -- change propagation ---------------------------------------------------------------------

    def mark_dirty(self) -> None:
        if not self._dirty.is_set():
            self._dirty_at = time.time()
        self._dirty.set()

    def _policy(self) -> tuple[str | None, Policy | None]:
        """(cache key: the text, plus the provider's group members when the console adds them; policy)."""
        text = self.store.policy_text()
        extra = self.policy_groups() if self.policy_groups is not None else {}
        key = idpgroups.cache_key(text, extra)
        if key != self._policy_cache[0]:
            try:
                parsed = parse_policy(text) if text is not None else None
                self._policy_cache = (key, idpgroups.merge(parsed, extra))
            except PolicyError:
                # Stored policies were checked on `set`; a newer parser refusing one must not take
                # every map down: keep the last good one and say so.
                log.exception("stored policy no longer parses; keeping the previous one")
                self._policy_cache = (key, self._policy_cache[1])
        return self._policy_cache

    def _publish(self) -> None:
        """Build a snapshot from the store; if it differs, persist a new version and wake streams.

        With the cyclic GC paused from the store read to the last frame written here: the
        allocations of a build (and the row tuples of a 10,000-node read) set off full collections,
        which walk the whole heap (0.5 s at 10,000 nodes, seen in the middle of a build and holding
        a change back by as much). Paused, the collection that is due runs once the frames are out."""
        snap = self.snapshot
        with gc_paused(len(self._streams) + (len(snap.rows) if snap is not None else 0)):
            self._publish_paused()

    def _publish_paused(self) -> None:
        started = time.time()
        self._seen_counter = self.store.change_counter()
        records_version = self.store.records.version()
        if records_version != self._seen_records or self._records is None:
            # Parsing every record (dnslib) on each snapshot would dominate for big record sets.
            records_version, records = self.store.records.snapshot()
            # A tuple: the snapshot builder reuses the last DNS text while it is handed the same one.
            self._records = tuple(records)
        records = self._records
        self._seen_records = records_version
        text, policy = self._policy()
        prev = self.snapshot
        counter = self._seen_counter
        if prev is not None and counter == self._built_counter:
            # Only online flags changed (streams came or went): no need to read 10k rows again.
            nodes = list(prev.rows.values())
        else:
            nodes = self.store.list_nodes()
        self._built_counter = counter
        # A policy compile over 10,000 nodes makes ~100k young objects; full collections walking the
        # whole heap in the middle of it cost more than the build (~1 s seen at 10,000 nodes). (Paused
        # already when `_publish` found a big tailnet; this covers the first build of one.)
        with gc_paused(len(nodes)):
            snap, differs = self._build(prev, nodes, text, policy, records, counter)
        if self.relay is not None and self.relay_keys.update(node_keys(snap.rows.values(), time.time())):
            gone = self.relay.recheck()
            if gone:
                log.info("relay: disconnected %d node(s) no longer in the tailnet", gone)
        if not differs:
            if prev is not None and counter > prev.tailnet_version:
                # Nothing a node sees changed, but the snapshot stands for the newer store version,
                # so a node resuming from that version is not sent a full map.
                self.snapshot = dataclasses.replace(prev, tailnet_version=counter)
            return
        if prev is not None or snap.version == 0:
            snap = with_version(snap, self.store.bump_map_version())
        self.snapshot = snap
        self.stats["snapshots"] += 1
        self.phases.append({"version": snap.version, "store_version": snap.tailnet_version,
                            "noticed": min(self._dirty_at, started), "build_start": started,
                            "published": time.time(), "last_frame": 0.0})
        self._wake_streams(prev, snap)

    def _build(self, prev: Snapshot | None, nodes: list[Node], text: str | None, policy: Policy | None,
               records: tuple, counter: int) -> tuple[Snapshot, bool]:
        return build_snapshot(prev, version=prev.version if prev else self.store.map_version(),
                              domain=self.store.domain(), nodes=nodes,
                              online=self._online_everywhere(), now=time.time(), policy_text=text,
                              policy=policy,
                              dns=self.store.dns_settings(), records=records,
                              derp_map_text=self._relay_map_text(policy),
                              ca_pem=self._current_ca().cert_pem,
                              tka_head=self.tka.head, signatures=self.tka.signatures(),
                              lock_keys=self.tka.lock_keys(), flow_logs=self.store.flow_logs_enabled(),
                              tailnet_version=counter, epoch=self._epoch)

    def _relay_map_text(self, policy: Policy | None) -> str:
        rmap = self.relay_map or RelayMap()
        if self.relay_map_file is not None and self.relay_map_file.current is not None:
            rmap = rmap.merged(self.relay_map_file.current)
        if policy is not None and policy.derp_map is not None:
            rmap = rmap.merged(policy.derp_map)
        return rmap.dumps() if rmap.regions else "null"

    def _wake_streams(self, prev: Snapshot | None = None, snap: Snapshot | None = None) -> None:
        """Bring the streams `snap` concerns up to it (wake them all, without snapshots); the others,
        when they hold `prev`'s map, are marked as holding `snap`'s without a frame.

        A stream whose task is parked (no write of its own in flight) and whose connection has
        room gets its frame written right here, in this loop: waking a task per stream (its event,
        its keepalive timer re-armed, aiohttp's write coroutine) cost ~4x the frame itself when a
        policy change concerns every stream of a replica. The others (a full map due, a reader that
        is behind, a write in flight) are woken and take the task path with its deadline watch."""
        nodes = concerned(prev, snap) if prev is not None and snap is not None else None
        written = self.stats["frames"]
        now = asyncio.get_running_loop().time() if snap is not None and self._streams else 0.0
        cpu0, wall0 = time.thread_time(), time.monotonic()   # the thread's: not the doorbell's or the executor's
        # A few young objects per frame: over thousands of frames that set off full collections
        # walking the whole heap (py-spy put a third of the frames phase in them). Nothing here
        # forms cycles.
        with gc_paused(len(self._streams)):
            for stream in self._streams.values():
                state = stream.state
                if nodes is None or state.node_id in nodes or not fast_forward(prev, snap, state):  # type: ignore[arg-type]
                    if snap is None or not self._write_now(stream, snap, now):
                        stream.wake.set()
        self.stats["fanout_cpu"] += time.thread_time() - cpu0
        self._fanout_wall += time.monotonic() - wall0
        if self.stats["frames"] != written:
            self._framed()

    def _write_now(self, stream: _Stream, snap: Snapshot, now: float) -> bool:
        """Write `stream`'s frame for `snap` from the publisher, if that cannot block or reorder
        anything; False when its task must do it (the stream is then untouched, or holds the frame
        in `pending` for the task to write under the deadline watch)."""
        state = stream.state
        if not stream.parked or stream.wake.is_set() or state.full or stream.pending is not None:
            return False
        transport = _chunk_sink(stream.request, stream.resp)
        if transport is None or not _fits(transport, 0):
            return False   # behind (or closing): its task writes under the deadline watch
        try:
            text = next_frame(snap, state)
        except NodeGone:
            return False   # the task finds out too and ends the stream
        except Exception:
            log.exception("building a frame for node %d failed", state.node_id)
            return False
        if text is None:
            return True
        data = frame(stream.chan.seal_bytes(text.encode()))
        if not _fits(transport, len(data)):
            # `state` already counts this frame as sent: its task must write exactly these bytes.
            stream.pending = data
            return False
        # One HTTP/1.1 chunk, exactly as aiohttp's chunked writer frames it (_chunk_sink checked
        # that the response is chunked, its headers are out and nothing else rewrites the body).
        transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        stream.last_write = now
        self.stats["frames"] += 1
        self.stats["frames_direct"] += 1
        return True

    async def _publisher(self) -> None:
        spent = 0.0
        while True:
            await self._dirty.wait()
            # Let a burst of changes land as one snapshot; waiting as long as the last build took (up
            # to 100 ms, so a change still reaches nodes well within a second) keeps publishing from
            # starving registrations and streams on a large, busy tailnet.
            await asyncio.sleep(max(self.config.coalesce, min(spent, 0.1)))
            self._dirty.clear()
            t0 = time.monotonic()
            self._fanout_wall = 0.0
            try:
                self._publish()
            except Exception:
                log.exception("building the network map failed; will retry on the next change")
            # The build's time, not the frames the publisher then wrote itself: those were written
            # by the streams' tasks before and never held the next change back.
            spent = time.monotonic() - t0 - self._fanout_wall

    async def _poller(self) -> None:
        """Notice writes by other processes: the CLI (change counter) and `magicdns records` (version)."""
        while True:
            await asyncio.sleep(self.config.poll_interval)
            try:
                if (self.store.change_counter() != self._seen_counter
                        or self.store.records.version() != self._seen_records
                        or (self.relay_map_file is not None and self.relay_map_file.reload())):
                    self.mark_dirty()
                    self.store.fold_pending_audit()
            except Exception:
                log.exception("polling the store failed")

    async def _runs(self, job: Job) -> bool:
        """Whether this server runs `job` now (always on SQLite; on PostgreSQL, the replica holding
        its advisory lock). The lock query blocks: off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, self.jobs.holds, job)

    async def _reaper(self) -> None:
        while True:
            await asyncio.sleep(min(self.config.reap_interval, self.config.ephemeral_grace))
            try:
                if not await self._runs(Job.EPHEMERAL):
                    continue
                # Nodes streaming from other replicas are online too; the deletion itself runs under
                # the database's write lock, so replicas reaping at once cannot delete twice.
                gone = self.store.delete_stale_ephemeral(set(self.online) | self.remote_online,
                                                         time.time() - self.config.ephemeral_grace)
            except Exception:
                log.exception("removing stale ephemeral nodes failed")
                continue
            if gone:
                log.info("removed %d offline ephemeral node(s): %s", len(gone), ", ".join(n.name for n in gone))
                self.mark_dirty()

    async def _expiry_sweeper(self) -> None:
        """Expired logins leave every map when they expire (not at the next unrelated change), with one
        audit entry each."""
        while True:
            await asyncio.sleep(self.config.expiry_interval)
            try:
                if not await self._runs(Job.KEY_EXPIRY):
                    continue
                gone = self.store.sweep_expired(time.time())
            except Exception:
                log.exception("looking for expired logins failed")
                continue
            if gone:
                log.info("login expired: %s", ", ".join(n.name for n in gone))
                self.mark_dirty()

    async def _audit_pruner(self) -> None:
        """Apply the audit log's, change log's and flow logs' retention at start and then hourly (the
        pruning is itself logged). A replica that does not hold the job looks again every minute, so
        it takes over soon after the holder dies."""
        while True:
            interval = self.config.audit_prune_interval
            try:
                if await self._runs(Job.RETENTION):
                    removed = self.store.prune_audit()
                    if removed:
                        log.info("audit: removed %d entries older than %g days", removed,
                                 self.store.audit_retention_days())
                    # The change log keeps the newest 100,000 versions: enough for any reader that is
                    # minutes behind; an older one starts again from a full snapshot (ChangeLogGap).
                    self.store.prune_changes()
                    flows = self.store.prune_flows()
                    if flows:
                        log.info("flow logs: removed %d records past retention", flows)
                else:
                    interval = min(interval, 60.0)
            except Exception:
                log.exception("pruning the audit log failed")
            await asyncio.sleep(interval)

    # -- node protocol --------------------------------------------------------------------------

    def _channel(self, machine_key: str) -> Channel:
        chan = self._channels.get(machine_key)
        if chan is None:
            chan = Channel(self.private_key, machine_key)  # precomputes the shared key once
            self._channels[machine_key] = chan
            if len(self._channels) > 50_000:
                self._channels.popitem(last=False)
        else:
            self._channels.move_to_end(machine_key)
        return chan

    async def _open(self, request: web.Request) -> tuple[str, Channel, dict[str, Any]]:
        """Authenticate a node request: (machine key, its channel, the decrypted payload)."""
        header = request.headers.get(MACHINE_KEY_HEADER)
        if not header:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"missing {MACHINE_KEY_HEADER} header")
        decode_key(header, "machine key")
        body = await request.read()
        if not body:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "empty body: expected a sealed request")
        node = self.store.node_by_machine_key(header)
        known = node is not None
        request[_NODE] = node   # read once per request: `_node_for` takes it from here
        if not known and not self._unregistered.allow(time.monotonic()):
            raise ProtocolError(ErrorCode.RATE_LIMITED, "too many requests from unregistered machines; retry later")
        chan = self._channel(header)
        nonce, payload = chan.open(body)
        # From here on, refusals are sealed to this machine (see `_error`).
        request[_CHAN], request[_NONCE] = chan, base64.b64encode(nonce).decode()
        ts = self.replay.check(header, nonce, payload.get("ts"), time.time())
        if known:
            # Persisted in the same transaction as the change the request makes (or before, by any
            # earlier one), so a replay after a restart or crash is refused.
            self.store.note_replay_mark(header, ts)
        return header, chan, payload

    def _sealed(self, chan: Channel, payload: dict[str, Any]) -> web.Response:
        return web.Response(body=chan.seal(payload), content_type="application/octet-stream")

    def _node_for(self, machine_key: str, payload: dict[str, Any], request: web.Request | None = None) -> Node:
        # The node `_open` read for this very request (no await between them in any handler), else
        # read now: one blocking database round trip fewer per request, which counts when a dead
        # replica's nodes arrive by the thousand.
        node = request[_NODE] if request is not None and _NODE in request else self.store.node_by_machine_key(machine_key)
        if node is None or node.logged_out:
            raise ProtocolError(ErrorCode.NOT_REGISTERED, "this machine is not registered; log in with an auth key")
        if node.expired(time.time()):
            raise ProtocolError(ErrorCode.NODE_EXPIRED, f"the login of {node.name} expired; log in again")
        if payload.get("node_key") != node.node_key:
            raise ProtocolError(ErrorCode.NODE_KEY_MISMATCH, "node_key is not this machine's current node key")
        return node

    async def _register(self, request: web.Request) -> web.Response:
        machine_key, chan, p = await self._open(request)
        node_key = _str(p, "node_key", 64)
        decode_key(node_key, "node_key")
        proof_ts = check_timestamp(p.get("proof_ts"))
        if abs(proof_ts - p["ts"]) > 5:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "proof_ts must be the request's time")
        verify_node_key_proof(p.get("node_key_proof"), node_key, self.private_key, machine_key, float(proof_ts))
        authkey = p.get("authkey")
        if authkey is not None and not isinstance(authkey, str):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "authkey must be a string")
        authkey, key_signature = self.tka.registration(authkey, node_key, p)  # Tailnet Lock (lock.py)
        reg = Registration(
            machine_key=machine_key, node_key=node_key, hostname=_str(p, "hostname", 256),
            os=_str(p, "os", 64, required=False), authkey=authkey or None,
            advertise_routes=tuple(sorted({normalize_cidr(r) for r in _strs(p, "advertise_routes")})),
            advertise_tags=tuple(sorted({check_tag(t) for t in _strs(p, "advertise_tags")})),
            advertise_exit_node=_bool(p, "advertise_exit_node"), ephemeral=_bool(p, "ephemeral"),
            endpoints=tuple(_strs(p, "endpoints")), disco_key=_disco_key(p) or "")
        if reg.authkey is None and p.get("interactive") is True and self.interactive_login is not None:
            existing = self.store.node_by_machine_key(machine_key)
            if existing is None or not existing.active(time.time()):
                key, url = await self.interactive_login(machine_key, node_key, reg.hostname, reg.os)
                if key is None:
                    return self._sealed(chan, {"auth_url": url})
                reg = dataclasses.replace(reg, authkey=key)
        _, policy = self._policy()
        known = self.store.node_by_machine_key(machine_key)
        self.store.note_replay_mark(machine_key, float(p["ts"]))   # written by the registration itself
        try:
            # The actor is passed, not set with `acting_as`: that would look for record changes to
            # chain before and after, two more statements the registration does itself once.
            node = self.store.register(reg, lambda *a: authorize(policy, *a),
                                       actor=f"node:{known.name if known else reg.hostname}", known=known)
        except BaseException as exc:
            if known is None:
                self.store.drop_replay_mark(machine_key)   # no row for a machine that never got in
            if isinstance(exc, authkeys.AuthKeyRefused):
                self.stats["refusals"] += 1
            raise
        self.stats["registrations"] += 1
        if key_signature is not None:
            self.tka.store_registration_signature(node, node_key, key_signature)
        log.info("registered node %d %s (user %s, tags %s)", node.id, node.name, node.user, ",".join(node.tags))
        self.mark_dirty()
        return self._sealed(chan, {"node": map_node(node, self.store.domain(), node.id in self.online).to_json()})

    async def _endpoints(self, request: web.Request) -> web.Response:
        machine_key, chan, p = await self._open(request)
        node = self._node_for(machine_key, p, request)
        home = p.get("home_region")
        if home is not None and (isinstance(home, bool) or not isinstance(home, int) or not 0 < home < 1 << 31):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "home_region must be a positive integer")
        self.store.set_endpoints(node.id, _strs(p, "endpoints"), _disco_key(p), home)
        self.mark_dirty()
        return self._sealed(chan, {"ok": True})

    def _current_ca(self) -> tailnet_ca.TailnetCa:
        if self.ca.domain != self.store.domain():
            self.ca = _ensure_ca(self.store, time.time())
        return self.ca

    async def _cert(self, request: web.Request) -> web.Response:
        machine_key, chan, p = await self._open(request)
        node = self._node_for(machine_key, p, request)
        bucket = self._cert_buckets.setdefault(node.id, TokenBucket(rate=1 / 60, burst=5))
        if not bucket.allow(time.monotonic()):
            raise ProtocolError(ErrorCode.RATE_LIMITED, "too many certificate requests; retry in a minute")
        try:
            public_key = tailnet_ca.public_key_from_csr(p.get("csr"))  # type: ignore[arg-type]
        except tailnet_ca.CertError as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST, str(exc)) from None
        ca = self._current_ca()
        names = tailnet_ca.node_names(node.name, self.store.domain(), node.addresses)
        cert = tailnet_ca.issue(ca, public_key, names, time.time())
        log.info("issued a certificate to node %d %s for %s", node.id, node.name,
                 ", ".join(names.dns_names + names.ip_addresses))
        return self._sealed(chan, {"cert": cert, "ca": ca.cert_pem})

    async def _logout(self, request: web.Request) -> web.Response:
        machine_key, chan, p = await self._open(request)
        node = self._node_for(machine_key, p, request)
        with self.store.acting_as(f"node:{node.name}"):
            self.store.logout(node.id)
        log.info("node %d %s logged out", node.id, node.name)
        self.mark_dirty()
        return self._sealed(chan, {"ok": True})

    async def _map(self, request: web.Request) -> web.StreamResponse:
        machine_key, chan, p = await self._open(request)
        node = self._node_for(machine_key, p, request)
        if self.snapshot is None or node.id not in self.snapshot.nodes:
            self._publish()  # just registered or logged in again: do not wait for the publisher
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                           "Cache-Control": "no-store"})
        await resp.prepare(request)
        state = StreamState(node.id, patches=p.get("patches") is True, sets=p.get("prefix_sets") is True)
        # A node needs one stream (two while it reconnects): older ones are closed, so one machine
        # cannot pile up streams that each hold a map in memory.
        mine = self._node_streams.setdefault(node.id, [])
        handle = (asyncio.current_task(), request)
        mine.append(handle)
        while len(mine) > self.config.max_streams_per_node:
            old_task, old_request = mine.pop(0)
            _abort(old_request)
            if old_task is not None:
                old_task.cancel()
        self.online[node.id] = self.online.get(node.id, 0) + 1
        self.stats["streams"] += 1
        self.mark_dirty()
        self._presence_changed.set()
        try:
            token = ResumeToken.parse(p.get("resume"))
            if token is None or await self._resume(request, resp, chan, state, token):
                await self._serve_stream(request, resp, chan, state)
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            if handle in mine:
                mine.remove(handle)
            if not mine and self._node_streams.get(node.id) is mine:
                del self._node_streams[node.id]
            self.stats["streams"] -= 1
            left = self.online.get(node.id, 1) - 1
            if left:
                self.online[node.id] = left
            else:
                self.online.pop(node.id, None)
            # Written with the next presence write (within `presence_coalesce`), for every stream
            # that ended meanwhile in one transaction: a replica stopping, or a network blip, ends
            # thousands at once, and one write each held the database's write lock thousands of times.
            self._seen_pending.add(node.id)
            self.mark_dirty()
            self._presence_changed.set()
        return resp

    async def _resume(self, request: web.Request, resp: web.StreamResponse, chan: Channel, state: StreamState,
                      token: ResumeToken) -> bool:
        """Send a node that reconnects with the version it holds only what changed since, if the
        change log can say exactly what that is; otherwise leave `state` for a full map. False when
        the stream must end."""
        snap = self.snapshot
        if snap is not None and snap.epoch == token.epoch and token.version > snap.tailnet_version:
            self._publish()   # it saw a newer version on another replica: catch up before judging
            snap = self.snapshot
        if snap is None or not 0 <= snap.tailnet_version - token.version <= RESUME_MAX_CHANGES:
            return self._refused("no map yet" if snap is None else
                                 "version from the future" if token.version > snap.tailnet_version else "too far behind")
        try:
            changes = self._changes_between(token.version, snap.tailnet_version)
        except ChangeLogGap:
            return self._refused("change log pruned")
        nodes = resumable(snap, token, state.node_id, changes)
        if nodes is None:
            return self._refused(_why_not_resumable(snap, token, state.node_id, changes))
        try:
            text = resume_frame(snap, state, nodes)
        except NodeGone:
            return False
        self.stats["resumed"] += 1
        return await self._write(request, resp, frame(chan.seal_bytes(text.encode())))

    def _changes_between(self, since: int, upto: int) -> list[Any]:
        """The change log from `since` (exclusive) to `upto`, read once per pair: after a replica
        dies its nodes arrive here by the thousand holding a handful of versions, and each read is a
        blocking round trip to the database on the event loop. The log below `upto` never changes
        (pruning aside, which only costs a full map later), so an answer stays true."""
        if since == upto:
            return []
        key = (since, upto)
        changes = self._changes_memo.get(key)
        if changes is None:
            changes = self.store.changes_since(since, limit=upto - since)
            if changes and changes[-1].version >= upto:   # a short answer is not kept
                if len(self._changes_memo) >= 64:
                    self._changes_memo.clear()
                self._changes_memo[key] = changes
        return changes

    def _refused(self, why: str) -> bool:
        """Count (by reason, for /metrics) a resume token that could not be honoured: the stream goes
        on with a full map. A reconnect storm that gets full maps says here why."""
        self.resume_refusals[why] = self.resume_refusals.get(why, 0) + 1
        log.debug("resume refused: %s", why)
        return True

    async def _serve_stream(self, request: web.Request, resp: web.StreamResponse, chan: Channel,
                            state: StreamState) -> None:
        stream = _Stream(state, asyncio.Event(), request, resp, chan, last_write=asyncio.get_running_loop().time())
        self._streams[id(state)] = stream
        try:
            await self._stream_loop(stream, frame(chan.seal({"type": "keepalive"})))
        finally:
            del self._streams[id(state)]

    async def _stream_loop(self, stream: _Stream, keepalive: bytes) -> None:
        request, resp, chan, state, wake = stream.request, stream.resp, stream.chan, stream.state, stream.wake
        loop = asyncio.get_running_loop()
        while True:
            wake.clear()   # before reading the snapshot: a publish after the read sets it again
            if stream.pending is not None:
                # A frame the publisher built but could not hand over without waiting (`_write_now`).
                data, stream.pending = stream.pending, None
                if not await self._write(request, resp, data):
                    return
                stream.last_write = loop.time()
            snap = self.snapshot
            if snap is not None and snap.seq != state.seq:
                # Frames are computed from the newest snapshot when the previous one was taken, so
                # a slow reader gets one delta covering every change it missed (coalesced), and each
                # stream has at most one frame queued: its own, never anyone else's.
                if not await self._send(request, resp, chan, snap, state):
                    return
                stream.last_write = loop.time()
            if not self._tasks:  # shutting down
                return
            # Parked: from here until the task runs again the publisher may write this stream's
            # frames itself (`_write_now`); nothing of the task's own is in flight.
            stream.parked = True
            try:
                # Not wait_for: on Python 3.11 it wraps the wait in a task of its own, every wait of
                # every stream (a policy change wakes them all at once: 3,333 tasks more per replica).
                # The keepalive is due `keepalive` after the last frame, whoever wrote it.
                async with asyncio.timeout_at(stream.last_write + self.config.keepalive):
                    await wake.wait()
            except TimeoutError:
                stream.parked = False
                if loop.time() < stream.last_write + self.config.keepalive:
                    continue   # the publisher wrote a frame meanwhile: the stream is not idle
                if not await self._write(request, resp, keepalive, count=False):
                    return
                stream.last_write = loop.time()
            finally:
                stream.parked = False

    async def _send(self, request: web.Request, resp: web.StreamResponse, chan: Channel, snap: Snapshot,
                    state: StreamState) -> bool:
        """Write the frame that brings this stream up to `snap`; False when the stream must end."""
        if not state.full:
            try:
                text = next_frame(snap, state)
            except NodeGone:
                return False  # deleted, logged out or expired: the client learns why when it reconnects
            return text is None or await self._write(request, resp, frame(chan.seal_bytes(text.encode())))
        # A full map of a 10k-node tailnet is megabytes: a bounded number are built and handed to the
        # kernel at once, which keeps a reconnect storm from costing gigabytes. A reader too slow to
        # take its map within `full_map_slot` gives its slot up and finishes on its own deadline.
        async with self._full_maps:
            try:
                text = next_frame(snap, state)
            except NodeGone:
                return False
            if text is None:
                return True
            self.stats["full_maps"] += 1
            write = asyncio.ensure_future(resp.write(frame(chan.seal_bytes(text.encode()))))
            write.add_done_callback(_retrieved)
            await asyncio.wait({write}, timeout=self.config.full_map_slot)
        return await self._write(request, resp, write)

    async def _write(self, request: web.Request, resp: web.StreamResponse,
                     data: bytes | asyncio.Future[None], count: bool = True) -> bool:
        """One frame (or a write already started). A stream whose node takes nothing of it for
        `stream_deadline` is closed (the node reconnects and gets a full map); a slow link that keeps
        taking bytes is not: a full map over a slow line may well take longer than the deadline."""
        transport = request.transport
        if isinstance(data, bytes) and transport is not None and _fits(transport, len(data)):
            # The common case (a delta to a node that keeps up): the bytes go into a send buffer far
            # from its high-water mark, so the write completes without waiting for the peer and needs
            # no task, timer or deadline watch (those cost more than the frame when a policy change
            # wakes 3,400 streams at once).
            await resp.write(data)
            if count:
                self.stats["frames"] += 1
                self._framed()
            return True
        write = data if isinstance(data, asyncio.Future) else asyncio.ensure_future(resp.write(data))
        write.add_done_callback(_retrieved)
        loop = asyncio.get_running_loop()
        deadline = self.config.stream_deadline
        last_size, last_progress = -1, loop.time()
        try:
            while True:
                done, _ = await asyncio.wait({write}, timeout=min(1.0, deadline))
                if done:
                    write.result()   # a connection error ends the stream as before
                    break
                size = transport.get_write_buffer_size() if transport is not None else 0
                now = loop.time()
                if last_size < 0 or size < last_size:
                    last_progress = now
                last_size = size
                if now - last_progress >= deadline:
                    self.stats["slow_streams_closed"] += 1
                    log.info("map stream of %s took nothing for %.0fs; closing it", request.remote, deadline)
                    _abort(request)
                    return False
        finally:
            if not write.done():
                write.cancel()
        if count:
            self.stats["frames"] += 1
            self._framed()
        return True

    def _framed(self) -> None:
        if self.phases:
            self.phases[-1]["last_frame"] = time.time()

    # -- admin API ------------------------------------------------------------------------------

    def _admin(self, request: web.Request) -> None:
        auth = request.headers.get("Authorization", "")
        expected = self.store.admin_token_hash()
        if not auth.startswith("Bearer ") or expected is None or not hmac.compare_digest(
                authkeys.hash_secret(auth[7:].strip()), expected):
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "admin API needs 'Authorization: Bearer <admin token>'")

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        body = parse_json(await request.read())
        if not isinstance(body, dict):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "the body must be a JSON object")
        return body

    async def _admin_nodes(self, request: web.Request) -> web.Response:
        self._admin(request)
        domain = self.store.domain()
        return web.json_response({"nodes": [map_node(n, domain, n.id in self.online).to_json()
                                            for n in self.store.list_nodes()]})

    async def _admin_rename(self, request: web.Request) -> web.Response:
        self._admin(request)
        body = await self._json_body(request)
        with self.store.acting_as(ADMIN_ACTOR):
            node = self.store.rename_node(request.match_info["ref"], _str(body, "name", 63))
        self.mark_dirty()
        return web.json_response({"id": node.id, "name": node.name})

    async def _admin_delete(self, request: web.Request) -> web.Response:
        self._admin(request)
        with self.store.acting_as(ADMIN_ACTOR):
            node = self.store.delete_node(request.match_info["ref"])
        self.mark_dirty()
        return web.json_response({"deleted": node.id, "name": node.name})

    async def _admin_policy_get(self, request: web.Request) -> web.Response:
        self._admin(request)
        return web.Response(text=self.store.policy_text() or DEFAULT_POLICY_TEXT, content_type="text/plain")

    async def _admin_policy_set(self, request: web.Request) -> web.Response:
        self._admin(request)
        text = await request.text()
        with self.store.acting_as(ADMIN_ACTOR):
            change = set_policy(self.store, text)
        self.mark_dirty()
        return web.json_response({"ok": True, "tags_removed": {name: list(tags) for name, tags in change.tags_removed}})

    async def _admin_authkey(self, request: web.Request) -> web.Response:
        self._admin(request)
        body = await self._json_body(request)
        expiry = body.get("expiry")
        expires = time.time() + authkeys.parse_duration(str(expiry)) if expiry else None
        with self.store.acting_as(ADMIN_ACTOR):
            text, key = self.store.create_authkey(_str(body, "user", 128), _bool(body, "reusable"),
                                                  _bool(body, "ephemeral"), _strs(body, "tags"), expires)
        return web.json_response({"key": text, "id": key.id, "expires": key.expires})

    async def _admin_audit(self, request: web.Request) -> web.Response:
        self._admin(request)
        q = request.query
        try:
            since = float(q["since"]) if "since" in q else None
            limit = int(q["limit"]) if "limit" in q else None
        except ValueError:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "since must be unix seconds and limit a number") from None
        if since is not None and not math.isfinite(since) or limit is not None and not 0 < limit <= 100_000:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "since must be finite and limit between 1 and 100000")
        entries = self.store.audit_entries(since, q.get("actor") or None, q.get("target") or None, limit)
        return web.json_response({"entries": [e.to_json() for e in entries]})

    async def _admin_audit_verify(self, request: web.Request) -> web.Response:
        self._admin(request)
        v = self.store.verify_audit()
        return web.json_response({"ok": v.ok, "entries": v.entries, "problem": v.problem, "first_id": v.first_id,
                                  "last_id": v.last_id, "head": v.head})

    async def _key(self, _request: web.Request) -> web.Response:
        from ..version import version  # lets `meshnode version` compare node and server
        return web.json_response({"public_key": self.public_key, "protocol": 1, "version": version()})

    async def _health(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "version": self.snapshot.version if self.snapshot else 0})

    async def _metrics(self, request: web.Request) -> web.Response:
        self._admin(request)
        return self._metrics_text()

    async def start_metrics(self, host: str, port: int) -> int:
        """Serve GET /metrics without a token on its own listener (for a Prometheus scraper on a
        management address); returns the port."""
        app = web.Application(middlewares=[_errors])
        app.router.add_get("/metrics", self._metrics_web)
        self._metrics_runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._metrics_runner.setup()
        site = web.TCPSite(self._metrics_runner, host, port)
        await site.start()
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def _metrics_web(self, _request: web.Request) -> web.Response:
        return self._metrics_text()

    def _metrics_text(self) -> web.Response:
        snap = self.snapshot
        lines = [
            "# TYPE meshnode_control_nodes gauge", f"meshnode_control_nodes {len(snap.nodes) if snap else 0}",
            "# TYPE meshnode_control_nodes_online gauge", f"meshnode_control_nodes_online {len(self.online)}",
            "# TYPE meshnode_control_streams gauge", f"meshnode_control_streams {self.stats['streams']}",
            "# TYPE meshnode_control_map_version gauge",
            f"meshnode_control_map_version {snap.version if snap else 0}",
            "# TYPE meshnode_control_registrations_total counter",
            f"meshnode_control_registrations_total {self.stats['registrations']}",
            "# TYPE meshnode_control_registration_refusals_total counter",
            f"meshnode_control_registration_refusals_total {self.stats['refusals']}",
            "# TYPE meshnode_control_snapshots_total counter",
            f"meshnode_control_snapshots_total {self.stats['snapshots']}",
            "# TYPE meshnode_control_frames_total counter", f"meshnode_control_frames_total {self.stats['frames']}",
            "# TYPE meshnode_control_frames_direct_total counter",
            f"meshnode_control_frames_direct_total {self.stats['frames_direct']}",
            "# TYPE meshnode_control_fanout_cpu_seconds_total counter",
            f"meshnode_control_fanout_cpu_seconds_total {self.stats['fanout_cpu']:.6f}",
            "# TYPE meshnode_control_gc_collections_total counter",
        ] + [f'meshnode_control_gc_collections_total{{generation="{g}"}} {GC_CLOCK.count[g]}' for g in range(3)] + [
            "# TYPE meshnode_control_gc_seconds_total counter",
        ] + [f'meshnode_control_gc_seconds_total{{generation="{g}"}} {GC_CLOCK.seconds[g]:.6f}' for g in range(3)] + [
            "# TYPE meshnode_control_slow_streams_closed_total counter",
            f"meshnode_control_slow_streams_closed_total {self.stats['slow_streams_closed']}",
            "# TYPE meshnode_control_streams_resumed_total counter",
            f"meshnode_control_streams_resumed_total {self.stats['resumed']}",
            "# TYPE meshnode_control_full_maps_total counter",
            f"meshnode_control_full_maps_total {self.stats['full_maps']}",
            "# TYPE meshnode_control_resume_refused_total counter",
        ] + [f'meshnode_control_resume_refused_total{{reason="{why}"}} {n}'
             for why, n in sorted(self.resume_refusals.items())] + [
            "# TYPE meshnode_control_publish_timestamp_seconds gauge",   # where a change's time went
        ] + [f'meshnode_control_publish_timestamp_seconds{{version="{p["version"]:.0f}",'
             f'store_version="{p["store_version"]:.0f}",phase="{k}"}} {v:.6f}'
             for p in self.phases for k, v in p.items() if k not in ("version", "store_version")] + [
            "# TYPE meshnode_control_job_running gauge",   # 1: this server runs the once-per-tailnet job
        ] + [f'meshnode_control_job_running{{job="{job.value}"}} {int(self.jobs.url is None or job in self.jobs.held)}'
             for job in Job]
        if self.relay is not None:
            lines += self.relay.metrics_lines()
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


def _why_not_resumable(snap: Snapshot, token: ResumeToken, node_id: int, changes: list[Any]) -> str:
    """Why `resumable` said no, in a few words (a /metrics label; the first reason found)."""
    if token.epoch != snap.epoch:
        return "another database"
    if token.node_id != node_id:
        return "another node"
    last = token.version
    for change in changes:
        if change.version != last + 1:
            return "hole in the change log"
        last = change.version
        actions = {action for action, _target in change.items}
        odd = sorted(actions - RESUMABLE_ACTIONS)
        if odd:
            return f"change {odd[0]}"
        if node_id in change.nodes and actions & SELF_REACH_ACTIONS:
            return f"own {sorted(actions & SELF_REACH_ACTIONS)[0]}"
    return "change log behind the map"


def _ensure_ca(store: ControlStore, now: float) -> tailnet_ca.TailnetCa:
    """The tailnet CA, created on the first start (and again if the tailnet's domain changed, since
    the CA is name-constrained to its domain)."""
    domain = store.domain()
    row = store.tailnet_ca()
    if row is not None and row[0] == domain:
        return tailnet_ca.TailnetCa(row[1], row[2], row[0])
    ca = tailnet_ca.create_ca(domain, now)
    store.save_tailnet_ca(domain, ca.key_pem, ca.cert_pem, now)
    log.info("created the tailnet certificate authority for %s", domain)
    return ca


@dataclass(slots=True, eq=False)
class _Stream:
    """One open map stream, as its task and the publisher share it."""

    state: StreamState
    wake: asyncio.Event
    request: web.Request
    resp: web.StreamResponse
    chan: Channel
    parked: bool = False           # its task waits on `wake` with no write of its own in flight
    pending: bytes | None = None   # a frame `state` counts as sent that the task must still write
    last_write: float = 0.0        # loop time of its last frame or keepalive (the keepalive is due after it)


def _chunk_sink(request: web.Request, resp: web.StreamResponse) -> asyncio.Transport | None:
    """The transport a frame may be written to directly as one HTTP/1.1 chunk, bypassing aiohttp's
    `StreamResponse.write` (a coroutine and a chunk header per frame): only while aiohttp's writer
    would itself write exactly that, i.e. the body is chunked, uncompressed, not ended and its
    headers are out. None otherwise (another aiohttp, a closing connection): the task path."""
    writer = getattr(resp, "_payload_writer", None)
    transport = request.transport
    if (writer is None or transport is None or transport.is_closing() or not getattr(writer, "chunked", False)
            or getattr(writer, "_compress", None) is not None or getattr(writer, "_eof", True)
            or getattr(writer, "_headers_buf", None) is not None or getattr(writer, "length", None) is not None):
        return None
    return transport  # type: ignore[return-value]


def _retrieved(write: asyncio.Future[Any]) -> None:
    """A frame write whose stream was cancelled (its node went away) may still fail afterwards: that
    error is expected, and must not be logged as "never retrieved"."""
    if not write.cancelled():
        write.exception()


def _fits(transport: asyncio.BaseTransport, size: int) -> bool:
    """Whether writing `size` bytes now cannot make a writer wait: the transport is not paused (its
    buffer is at or below the low-water mark, where asyncio resumes writing) and stays at or below
    the high-water mark after them (above it, it pauses and aiohttp's write waits for the peer)."""
    try:
        buffered = transport.get_write_buffer_size()  # type: ignore[attr-defined]
        low, high = transport.get_write_buffer_limits()  # type: ignore[attr-defined]
    except (AttributeError, NotImplementedError):
        return False
    return buffered <= low and buffered + size + 512 <= high   # 512: chunked framing, headers


def _abort(request: web.Request) -> None:
    """Drop a connection now, whatever it has buffered (a stuck stream would otherwise linger)."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def _str(obj: dict[str, Any], key: str, max_len: int, required: bool = True) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value) or len(value) > max_len:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{key} must be a non-empty string of at most {max_len} characters")
    return value


def _strs(obj: dict[str, Any], key: str, max_items: int = 256) -> list[str]:
    value = obj.get(key) or []
    if not isinstance(value, list) or len(value) > max_items or not all(
            isinstance(v, str) and len(v) <= 256 for v in value):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{key} must be a list of at most {max_items} strings")
    return value


def _bool(obj: dict[str, Any], key: str) -> bool:
    value = obj.get(key, False)
    if not isinstance(value, bool):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{key} must be true or false")
    return value


def _disco_key(obj: dict[str, Any]) -> str | None:
    """The optional `disco_key` (base64 of 32 bytes); None when the request carries none."""
    if obj.get("disco_key") in (None, ""):
        return None
    value = _str(obj, "disco_key", 64)
    decode_key(value, "disco_key")
    return value
