"""The control database: the one module that reads and writes the coordination server's tables.

SQLite through sqlite-utils, WAL mode, every change one IMMEDIATE transaction that also bumps
`change_counter`, so a server polling the counter sees every change made by another process (the
admin CLI) and never half of one. A kill -9 at any moment loses nothing committed: WAL commits are
written to the log before COMMIT returns (synchronous=NORMAL keeps that for process crashes; only an
OS crash or power loss may drop the last transactions).

DNS records live in the same file, owned by `magicdns.store.RecordStore` (`self.records`).
Schema changes are numbered migrations (`MIGRATIONS`); `control_schema` in `control_meta` says
which have run.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import logging
import os
import secrets
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import sqlite_utils

from magicdns import sqldb
from magicdns.names import NameError_, normalize_domain
from magicdns.store import RecordStore, StoreError as RecordStoreError
from magicdns.upstream import UpstreamError, parse_upstream

from . import addresses, audit, authkeys, naming
from .protocol import generate_private_key

log = logging.getLogger("meshnode.control.store")

DEFAULT_DB = os.environ.get("MESHNODE_CONTROL_DB", "/var/lib/meshnode/control.db")
DEFAULT_DOMAIN = "tailnet"


class ControlStoreError(RuntimeError):
    """The store cannot do what was asked; subclasses say why."""


class NotFound(ControlStoreError):
    """No such user, node or key."""


class Conflict(ControlStoreError):
    """The change clashes with what is stored (name taken, user has nodes, ...)."""


class StaleChain(Conflict):
    """The Tailnet Lock chain was written by someone else (another replica) since this copy was read."""


class InvalidValue(ControlStoreError, ValueError):
    """A value that cannot be stored (bad name, bad CIDR, bad resolver)."""


class SchemaTooNew(ControlStoreError):
    """The file was written by a newer version of this program."""


@dataclass(frozen=True, slots=True)
class User:
    id: int
    name: str
    created: float


@dataclass(frozen=True, slots=True)
class Node:
    """A node as stored. `tags` non-empty means the node is owned by its tags, not its user."""

    id: int
    machine_key: str
    node_key: str
    name: str
    hostname: str
    user: str
    tags: tuple[str, ...]
    os: str
    endpoints: tuple[str, ...]
    advertised_routes: tuple[str, ...]
    approved_routes: tuple[str, ...]
    advertises_exit_node: bool
    exit_node_approved: bool
    ephemeral: bool
    created: float
    last_seen: float | None
    expiry: float | None
    logged_out: bool
    offset: int
    authkey_id: str | None
    disco_key: str = ""  # this run's disco public key (base64), for path discovery
    home_region: int | None = None  # the relay region the node homes on (its endpoint report)

    @property
    def addresses(self) -> tuple[str, str]:
        return _address_texts(self.offset)

    def expired(self, now: float) -> bool:
        return self.expiry is not None and now >= self.expiry

    def active(self, now: float) -> bool:
        """Present in maps: logged in and not expired."""
        return not self.logged_out and not self.expired(now)


@dataclass(frozen=True, slots=True)
class UserRole:
    """A user's console role and what their identity provider last said about them."""

    name: str
    role: str
    email: str
    groups: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    id_hash: str
    user: str
    csrf: str
    created: float
    last_active: float


@dataclass(frozen=True, slots=True)
class RegisterRequest:
    """A machine's browser login: pending until a signed-in user approves it, then used once."""

    id_hash: str
    machine_key: str
    node_key: str
    hostname: str
    os: str
    created: float
    expires: float
    user: str
    authkey: str
    state: str


@dataclass(frozen=True, slots=True)
class Change:
    """One committed write transaction: the tailnet version it made and what it changed, as
    (kind, target) pairs ("node.rename", "node:web"), ("dns.records", "records"), ..."""

    version: int
    time: float
    items: tuple[tuple[str, str], ...]
    nodes: tuple[int, ...] = ()   # ids of the nodes whose rows it wrote (added, changed or deleted)


REPLICA_HEARTBEAT = 3.0     # seconds between a replica's heartbeats
REPLICA_DEAD_AFTER = 10.0   # a replica silent this long is dead: its nodes are shown offline


@dataclass(frozen=True, slots=True)
class Replica:
    """A control replica as it last reported itself."""

    id: str
    listen: str
    nodes: int
    version: int
    heartbeat_at: float
    online: frozenset[int]

    def alive(self, now: float, dead_after: float = REPLICA_DEAD_AFTER) -> bool:
        return now - self.heartbeat_at < dead_after


class ChangeLogGap(ControlStoreError):
    """The changes after the asked version were pruned: the reader must start from a full snapshot."""


@dataclass(frozen=True, slots=True)
class DnsSettings:
    """Tailnet-wide DNS settings (resolvers as `HOST[:PORT]` text)."""

    nameservers: tuple[str, ...] = ()
    routes: tuple[tuple[str, tuple[str, ...]], ...] = ()   # (domain, resolvers); () = answer locally
    search_domains: tuple[str, ...] = ()
    # Nodes send queries for well-known public resolvers over their DoH endpoint (magicdns/publicdns.py).
    upgrade_public_dns: bool = False


@dataclass(frozen=True, slots=True)
class Registration:
    """What a machine asks for when it registers (already authenticated by the protocol layer)."""

    machine_key: str
    node_key: str
    hostname: str
    os: str
    authkey: str | None
    advertise_routes: tuple[str, ...] = ()
    advertise_tags: tuple[str, ...] = ()
    advertise_exit_node: bool = False
    ephemeral: bool = False
    endpoints: tuple[str, ...] = ()
    disco_key: str = ""


@dataclass(frozen=True, slots=True)
class Grant:
    """The policy's decision on a registration: final tags and what is approved at once."""

    tags: tuple[str, ...]
    approved_routes: tuple[str, ...]
    exit_node_approved: bool


# authorize(user, key_tags, registration, existing) -> Grant, run inside the registration transaction.
Authorizer = Callable[[str, tuple[str, ...], Registration, "Node | None"], Grant]


def tighten(path: Path, mode: int = 0o600) -> bool:
    """Narrow `path` to `mode` if it is wider (the database holds the server's private key; token
    files are secrets); logs what it fixed. True when it changed something."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    if st.st_mode & 0o777 & ~mode:
        os.chmod(path, mode)
        log.warning("%s had mode %o, readable beyond its owner; set it to %o", path, st.st_mode & 0o777, mode)
        return True
    return False


def _prepare_path(path: Path) -> None:
    """The database file exists 0600 before SQLite opens it (SQLite gives its -wal and -shm files the
    database's mode), in a directory created 0700, whatever the umask."""
    parent = path.parent
    if not parent.exists():
        parent.mkdir(parents=True, exist_ok=True)
        os.chmod(parent, 0o700)
    elif parent.stat().st_mode & 0o077 and not parent.stat().st_mode & 0o1000:
        log.warning("the control database's directory %s is open to other users (mode %o); 0700 is"
                    " recommended", parent, parent.stat().st_mode & 0o777)
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    for suffix in ("", "-wal", "-shm"):
        tighten(path.with_name(path.name + suffix))


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=10.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def _m1_core(db: sqlite_utils.Database) -> None:
    db["users"].create({"id": int, "name": str, "created": float}, pk="id", not_null={"name"})
    db["users"].create_index(["name"], unique=True)
    db["nodes"].create({
        "id": int, "machine_key": str, "node_key": str, "name": str, "hostname": str, "user_id": int,
        "tags": str, "os": str, "endpoints": str, "advertised_routes": str, "approved_routes": str,
        "advertises_exit_node": int, "exit_node_approved": int, "ephemeral": int, "created": float,
        "last_seen": float, "expiry": float, "logged_out": int, "offset": int, "authkey_id": str,
    }, pk="id", not_null={"machine_key", "node_key", "name", "user_id", "offset"},
        foreign_keys=[("user_id", "users", "id")])
    db["nodes"].create_index(["machine_key"], unique=True)
    db["nodes"].create_index(["name"], unique=True)
    # A lease outlives its node so a re-registered machine gets its old addresses back.
    db["leases"].create({"machine_key": str, "offset": int}, pk="machine_key", not_null={"offset"})
    db["leases"].create_index(["offset"], unique=True)
    db["authkeys"].create({
        "id": str, "secret_hash": str, "user_id": int, "reusable": int, "ephemeral": int, "tags": str,
        "created": float, "expires": float, "used_count": int, "revoked": int,
    }, pk="id", not_null={"secret_hash", "user_id"}, foreign_keys=[("user_id", "users", "id")])
    db["policy"].create({"id": int, "text": str, "updated": float}, pk="id")


def _m2_dns(db: sqlite_utils.Database) -> None:
    # kind: 'nameserver' | 'route' | 'search'; `domain` is set for routes ('' value = local route).
    db["dns_settings"].create({"id": int, "kind": str, "domain": str, "value": str, "position": int},
                              pk="id", not_null={"kind", "value", "position"})
    db["nodes"].create_index(["user_id"])


def _m3_disco(db: sqlite_utils.Database) -> None:
    db["nodes"].add_column("disco_key", str)


def _m4_security(db: sqlite_utils.Database) -> None:
    # The newest request timestamp accepted from each registered machine (protocol.ReplayGuard), so a
    # request captured before a restart is refused after it.
    db["replay_marks"].create({"machine_key": str, "ts": float}, pk="machine_key", not_null={"ts"})
    # The hash-chained audit log (audit.py owns its rows).
    db["audit"].create({"id": int, "time": float, "actor": str, "action": str, "target": str,
                        "old": str, "new": str, "prev_hash": str, "hash": str},
                       pk="id", not_null={"time", "actor", "action", "target", "prev_hash", "hash"})
    db["audit"].create_index(["time"])
    db["audit_pending"].create({"id": int, "time": float, "action": str, "target": str, "old": str, "new": str},
                               pk="id")
    # Tags an admin applied (`nodes tag`): they stand whatever tagOwners says, unlike tags a node's
    # user applied, which a policy change can take away.
    db["nodes"].add_column("admin_tags", str)


def _m5_console(db: sqlite_utils.Database) -> None:
    # The admin console (meshnode/control/console): a role and the identity provider's facts per user,
    # server-side sessions (only the SHA-256 of the cookie is stored), and browser logins of machines.
    db["user_roles"].create({"user_id": int, "role": str, "email": str, "groups": str, "updated": float},
                            pk="user_id", not_null={"role"}, foreign_keys=[("user_id", "users", "id")])
    db["console_sessions"].create({"id_hash": str, "user_id": int, "csrf": str, "created": float,
                                   "last_active": float}, pk="id_hash", not_null={"user_id", "csrf"},
                                  foreign_keys=[("user_id", "users", "id")])
    db["register_requests"].create({"id_hash": str, "machine_key": str, "node_key": str, "hostname": str,
                                    "os": str, "created": float, "expires": float, "user": str,
                                    "authkey": str, "state": str}, pk="id_hash",
                                   not_null={"machine_key", "node_key", "state"})


def _m6_tailnet_ca(db: sqlite_utils.Database) -> None:
    # The tailnet certificate authority (ca.py): one row per CA ever made, the newest in use. The
    # private key lives only here (the database file is made 0600 when a CA is stored).
    db["tailnet_ca"].create({"id": int, "created": float, "domain": str, "key_pem": str, "cert_pem": str},
                            pk="id", not_null={"key_pem", "cert_pem"})


def _m7_tka_flows(db: sqlite_utils.Database) -> None:
    # Tailnet Lock (control/lock.py): node-key signatures made by trusted keys on the nodes, keyed by
    # the node key they sign (a re-keyed node needs a new one). The chain itself is beside the DB.
    db["tka_signatures"].create({"node_key": str, "signature": str, "created": float}, pk="node_key",
                                not_null={"signature"})
    # Connection (flow) logs (control/flows.py): one row per connection and window, and per node run
    # (boot_id) the last batch stored, so a batch re-sent after a lost acknowledgement counts once.
    db["flow_logs"].create({"id": int, "node_id": int, "node": str, "peer": str, "start": float, "end": float,
                            "proto": int, "src": str, "dst": str, "sport": int, "dport": int, "kind": str,
                            "tx_packets": int, "tx_bytes": int, "rx_packets": int, "rx_bytes": int,
                            "dropped": int, "rule": str}, pk="id", not_null={"node_id", "start", "end"})
    db["flow_logs"].create_index(["start"])
    db["flow_logs"].create_index(["node", "start"])
    db["flow_batches"].create({"node_id": int, "boot_id": str, "seq": int, "lost": int},
                              pk=("node_id", "boot_id"), not_null={"seq"})



def _m8_changelog(db: sqlite_utils.Database) -> None:
    # The versioned change log: one row per write transaction that changed the tailnet, keyed by the
    # tailnet version it produced (`change_counter`), listing what it changed (see `changes_since`).
    db["changes"].create({"version": int, "time": float, "items": str}, pk="version", not_null={"time", "items"})
    # Control replicas serving one database (PostgreSQL): each writes its row every heartbeat, with the
    # nodes streaming from it; a row whose heartbeat is old belongs to a dead replica.
    db["replicas"].create({"id": str, "listen": str, "nodes": int, "version": int, "heartbeat_at": float,
                           "online": str}, pk="id", not_null={"heartbeat_at"})


def _m9_tka_lock_keys(db: sqlite_utils.Database) -> None:
    # Tailnet Lock: each node's lock public key (`tlpub:HEX`) as the node reported it, keyed by its
    # node key, so the map can carry it and `lock init KEY...` can sign the nodes those keys belong to.
    db["tka_lock_keys"].create({"node_key": str, "lock_key": str, "updated": float}, pk="node_key",
                               not_null={"lock_key"})



def _m10_home_region(db: sqlite_utils.Database) -> None:
    db["nodes"].add_column("home_region", int)


def _m11_tka_chain(db: sqlite_utils.Database) -> None:
    # Tailnet Lock's chain (control/lock.py `StoreChain`) lives in the store, so every replica of one
    # database serves the same chain: one row per verified AUM (its canonical bytes), keyed by its hash
    # text. `tka_generation` in control_meta grows with every write of the chain (replicas compare it
    # to know theirs is stale), `tka_ancestor` is the last active ancestor.
    db["tka_aums"].create({"hash": str, "parent": str, "aum": bytes, "created": float}, pk="hash",
                          not_null={"aum", "created"})
    _import_tka_dir(db)


def _import_tka_dir(db: sqlite_utils.Database) -> None:
    """A SQLite deployment from before kept its chain in `<database>.tka/`: copy it in (once: this runs
    inside the migration). The directory is left where it is, unread from now on, as a backup."""
    if sqldb.dialect(db) != "sqlite":
        return
    path = next((row[2] for row in db.conn.execute("PRAGMA database_list") if row[1] == "main" and row[2]), None)
    directory = Path(str(path) + ".tka") if path else None
    if directory is None or not (directory / "aums").is_dir():
        return
    from ..tka.errors import TKAError
    from ..tka.store import FileStore   # the old layout's reader (parses and checks every AUM)
    try:
        old = FileStore(directory)
    except TKAError as exc:
        # Refuse to start rather than drop the chain: without it the tailnet's lock would look off.
        raise sqlite3.DatabaseError(f"the Tailnet Lock chain in {directory} cannot be read ({exc}); restore it,"
                                    " or move it away to start without it") from None
    aums = [old.aum(h) for h in old.all_hashes()]
    db.conn.executemany("INSERT OR IGNORE INTO tka_aums(hash, parent, aum, created) VALUES (?, ?, ?, ?)",
                        [(str(a.hash), str(a.parent) if a.parent is not None else None, a.serialized,
                          old.commit_time(a.hash)) for a in aums if a is not None])
    ancestor = old.last_active_ancestor()
    rows = [("tka_generation", "1")] + ([("tka_ancestor", str(ancestor))] if ancestor is not None else [])
    db.conn.executemany("INSERT OR REPLACE INTO control_meta(key, value) VALUES (?, ?)", rows)
    log.info("tailnet lock: moved the chain of %d AUM(s) from %s into the database (the directory is"
             " no longer read and may be removed)", len(aums), directory)


def _m12_resume(db: sqlite_utils.Database) -> None:
    # Which node rows each change wrote (a JSON list of ids): a node resuming its map stream from the
    # version it holds is sent those peers again, not the whole map (mapbuilder.resume_frame).
    db["changes"].add_column("nodes", str)
    # This database's identity in resume tokens, so a version from another tailnet is never taken
    # for one of ours (a migration runs once per database, under the migration transaction).
    db.execute("INSERT INTO control_meta(key, value) VALUES (?, ?)", ["tailnet_epoch", secrets.token_hex(8)])


MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (_m1_core, _m2_dns, _m3_disco, _m4_security,
                                                                  _m5_console, _m6_tailnet_ca, _m7_tka_flows,
                                                                  _m8_changelog, _m9_tka_lock_keys,
                                                                  _m10_home_region, _m11_tka_chain, _m12_resume)
SCHEMA_VERSION = len(MIGRATIONS)


def _j(values: Sequence[str]) -> str:
    return json.dumps(list(values))


_SET_MARK = ("INSERT INTO replay_marks(machine_key, ts) VALUES (?, ?) ON CONFLICT(machine_key)"
             " DO UPDATE SET ts = MAX(replay_marks.ts, excluded.ts)")


def _t(text: str | None) -> tuple[str, ...]:
    # Most nodes' tags and routes are "[]": reading 10,000 nodes decoded 40,000 JSON lists, 60% of it.
    return tuple(json.loads(text)) if text and text != "[]" else ()


_NODE_COLS = ("n.id, n.machine_key, n.node_key, n.name, n.hostname, u.name, n.tags, n.os, n.endpoints,"
              " n.advertised_routes, n.approved_routes, n.advertises_exit_node, n.exit_node_approved,"
              " n.ephemeral, n.created, n.last_seen, n.expiry, n.logged_out, n.offset, n.authkey_id, n.disco_key,"
              " n.home_region")


# The nodes columns of _NODE_COLS, for RETURNING (no join there: the user's id stands where its name goes).
_NODE_ROW_COLS = _NODE_COLS.replace("u.name", "user_id").replace("n.", "")
_NAME_PROBES = 8          # name candidates looked up in one query (base, base-1, ... base-7)
_UNREAD = object()        # `register(known=...)` not given
_REGISTER_ATTEMPTS = 3    # a registration a unique constraint refused is tried again (see `register`)


@functools.lru_cache(maxsize=1 << 16)
def _address_texts(offset: int) -> tuple[str, str]:
    # Formatting IPv6 text is slow; maps of 10k nodes ask for every node's addresses on each change.
    return addresses.pair_for(offset).texts


def _node(row: tuple) -> Node:
    return Node(row[0], row[1], row[2], row[3], row[4] or "", row[5], _t(row[6]), row[7] or "", _t(row[8]),
                _t(row[9]), _t(row[10]), bool(row[11]), bool(row[12]), bool(row[13]), row[14], row[15],
                row[16], bool(row[17]), row[18], row[19], row[20] or "",
                int(row[21]) if row[21] is not None else None)


class _Leases:
    """`in` test over leased offsets: above the highest lease nothing is taken (no query, the common
    case); below it (after a wrap-around) one indexed query per probe."""

    def __init__(self, conn: sqlite3.Connection, top: int) -> None:
        self.conn, self.top = conn, top

    def __contains__(self, offset: object) -> bool:
        if isinstance(offset, int) and offset > self.top:
            return False
        return self.conn.execute("SELECT 1 FROM leases WHERE offset = ?", [offset]).fetchone() is not None


class _Names:
    def __init__(self, conn: sqlite3.Connection, except_id: int | None = None) -> None:
        self.conn, self.except_id = conn, except_id

    def __contains__(self, name: object) -> bool:
        row = self.conn.execute("SELECT id FROM nodes WHERE name = ?", [name]).fetchone()
        return row is not None and row[0] != self.except_id


class ControlStore:
    """Users, nodes, leases, auth keys, policy, DNS settings and (via RecordStore) records."""

    def __init__(self, db: "str | Path | sqlite_utils.Database | sqldb.PgDatabase", domain: str | None = None) -> None:
        self._node_cache: dict[int, tuple[tuple, Node]] = {}
        # Who the audit log names for changes made through this store (see `acting_as`).
        self.actor = "system"
        self._marks: dict[str, float] = {}   # replay marks to persist with the next transaction
        self._notes: list[tuple[str, str]] = []   # what the open transaction changed, for the change log
        self._chain: audit.Chain | None = None      # the open transaction's audit entries, written at COMMIT
        self._folded = False
        self._node_ids: set[int] = set()          # node rows the open transaction wrote, for the change log
        self._postgres = False
        try:
            if isinstance(db, (sqlite_utils.Database, sqldb.PgDatabase)):
                self.db = db
            elif sqldb.is_postgres(db):
                self.db = sqldb.PgDatabase(str(db))
            else:
                path = Path(db)
                _prepare_path(path)
                self.db = sqlite_utils.Database(_connect(path))
                for suffix in ("-wal", "-shm"):
                    tighten(path.with_name(path.name + suffix))
            self.conn = self.db.conn
            self._postgres = sqldb.dialect(self.db) == "postgres"
            self._migrate()
            if domain is not None:
                self.set_domain(domain)
            self.records = RecordStore(self.db, self.domain())
            self._install_record_triggers()
        except sqlite3.DatabaseError as exc:
            where = sqldb.redact(db) if isinstance(db, str) else db
            raise ControlStoreError(f"cannot open control database {where}: {exc}") from None
        except RecordStoreError as exc:
            raise ControlStoreError(str(exc)) from None

    # -- plumbing -------------------------------------------------------------------------------

    @contextmanager
    def _tx(self, bump: bool = True) -> Iterator[None]:
        """One IMMEDIATE transaction; a write also bumps the change counter servers poll.

        The audit entries of the transaction are chained in memory and written, with the replay marks
        and the change-log row, as one batch just before COMMIT (on PostgreSQL one pipeline, COMMIT
        included): the writer lock is held for as few round trips as the reads need."""
        self.conn.execute("BEGIN IMMEDIATE")
        self._notes = []
        self._chain = audit.Chain(self.conn)
        self._folded = False
        self._node_ids = set()
        try:
            yield
            steps = self._chain.statements()
            if self._marks:
                steps.append((_SET_MARK, list(self._marks.items())))
                self._marks.clear()
            if bump:
                now = time.time()
                items = json.dumps(self._notes or [("tailnet", "")])
                steps.append(("UPDATE control_meta SET value = CAST(value AS INTEGER) + 1"
                              " WHERE key = 'change_counter'", [()]))
                # Under the write lock, so versions commit in order: a reader never sees N+1 before N.
                steps.append(("INSERT INTO changes(version, time, items, nodes) SELECT CAST(value AS INTEGER),"
                              " ?, ?, ? FROM control_meta WHERE key = 'change_counter'",
                              [(now, items, json.dumps(sorted(self._node_ids)) if self._node_ids else None)]))
                if self._postgres:   # the replicas' doorbell (doorbell.py), delivered on COMMIT
                    steps.append(("SELECT pg_notify('meshnode_changes', '')", [()]))
            if self._postgres:
                self.conn.write_batch(steps, commit=True)
                return
            for sql, rows in steps:
                self.conn.executemany(sql, rows)
        except BaseException:
            self._chain = None
            self.conn.execute("ROLLBACK")
            raise
        else:
            self._chain = None
            self.conn.execute("COMMIT")

    @contextmanager
    def acting_as(self, actor: str) -> Iterator["ControlStore"]:
        """Changes made inside are audited as `actor` ("admin-token", "node:laptop", "cli:root@host").
        Store calls are synchronous, so this is safe on the server's one event loop thread."""
        self.fold_pending_audit()   # record changes from before keep their own actor
        previous, self.actor = self.actor, actor
        try:
            yield self
        finally:
            try:
                # Records written inside (through `self.records`, e.g. by the console) are this actor's.
                self.fold_pending_audit(actor)
            finally:
                self.actor = previous

    def _audit(self, action: str, target: str, old: Any = None, new: Any = None) -> None:
        """One audit entry in the current transaction (audit.py); also a change-log item."""
        self._notes.append((action, target))
        if not self._folded:   # record changes made before this transaction come first, once
            self._fold_pending()
            self._folded = True
        self._chain.append(self.actor, action, target, old, new)

    # DNS records are written by `magicdns.store.RecordStore` (also by `magicdns records --db`, which
    # knows nothing of meshnode): triggers note each change in `audit_pending` within the change's own
    # transaction, and the next audited change, the server's poller or `audit ls/verify` chain them.
    _RECORD_TRIGGERS = {
        "audit_records_insert": "AFTER INSERT ON records BEGIN INSERT INTO audit_pending(time, action, target,"
        " old, new) VALUES ((julianday('now') - 2440587.5) * 86400.0, 'dns.record.add', 'record:' || NEW.name,"
        " NULL, json_object('type', NEW.type, 'value', NEW.value, 'ttl', NEW.ttl)); END",
        "audit_records_delete": "AFTER DELETE ON records BEGIN INSERT INTO audit_pending(time, action, target,"
        " old, new) VALUES ((julianday('now') - 2440587.5) * 86400.0, 'dns.record.remove', 'record:' ||"
        " OLD.name, json_object('type', OLD.type, 'value', OLD.value, 'ttl', OLD.ttl), NULL); END",
        "audit_records_update": "AFTER UPDATE ON records BEGIN INSERT INTO audit_pending(time, action, target,"
        " old, new) VALUES ((julianday('now') - 2440587.5) * 86400.0, 'dns.record.change', 'record:' ||"
        " NEW.name, json_object('type', OLD.type, 'value', OLD.value, 'ttl', OLD.ttl),"
        " json_object('type', NEW.type, 'value', NEW.value, 'ttl', NEW.ttl)); END",
    }
    # A records transaction (one bump of `records_version`) is a tailnet change too: the same version
    # sequence and change log, whichever process made it.
    _RECORD_TRIGGERS["changelog_records"] = (
        "AFTER UPDATE ON meta WHEN NEW.key = 'records_version' BEGIN UPDATE control_meta SET value ="
        " CAST(value AS INTEGER) + 1 WHERE key = 'change_counter'; INSERT INTO changes(version, time, items)"
        " SELECT CAST(value AS INTEGER), (julianday('now') - 2440587.5) * 86400.0, '[[\"dns.records\", \"records\"]]'"
        " FROM control_meta WHERE key = 'change_counter'; END")
    RECORDS_ACTOR = "records-store"   # the actor of record changes made directly on the records table

    # The same three notes in PostgreSQL's trigger language (one function, one row trigger).
    _PG_RECORD_TRIGGER = """
CREATE OR REPLACE FUNCTION audit_records_change() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO audit_pending(time, action, target, old, new) VALUES (extract(epoch FROM clock_timestamp()),
      'dns.record.add', 'record:' || NEW.name, NULL,
      json_build_object('type', NEW.type, 'value', NEW.value, 'ttl', NEW.ttl)::text);
  ELSIF TG_OP = 'DELETE' THEN
    INSERT INTO audit_pending(time, action, target, old, new) VALUES (extract(epoch FROM clock_timestamp()),
      'dns.record.remove', 'record:' || OLD.name,
      json_build_object('type', OLD.type, 'value', OLD.value, 'ttl', OLD.ttl)::text, NULL);
  ELSE
    INSERT INTO audit_pending(time, action, target, old, new) VALUES (extract(epoch FROM clock_timestamp()),
      'dns.record.change', 'record:' || NEW.name,
      json_build_object('type', OLD.type, 'value', OLD.value, 'ttl', OLD.ttl)::text,
      json_build_object('type', NEW.type, 'value', NEW.value, 'ttl', NEW.ttl)::text);
  END IF;
  RETURN NULL;
END $body$"""
    _PG_CHANGELOG_TRIGGER = """
CREATE OR REPLACE FUNCTION changelog_records() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
  IF NEW.key = 'records_version' THEN
    UPDATE control_meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'change_counter';
    INSERT INTO changes(version, time, items) SELECT CAST(value AS INTEGER), extract(epoch FROM clock_timestamp()),
      '[["dns.records", "records"]]' FROM control_meta WHERE key = 'change_counter';
    PERFORM pg_notify('meshnode_changes', '');
  END IF;
  RETURN NULL;
END $body$"""

    def _install_record_triggers(self) -> None:
        if sqldb.dialect(self.db) == "postgres":
            if self.conn.execute("SELECT COUNT(*) FROM pg_trigger WHERE tgname IN ('audit_records',"
                                 " 'changelog_records')").fetchone()[0] == 2:
                return
            with self._tx(bump=False):
                self.conn.execute(self._PG_RECORD_TRIGGER)
                self.conn.execute("CREATE OR REPLACE TRIGGER audit_records AFTER INSERT OR UPDATE OR DELETE"
                                  " ON records FOR EACH ROW EXECUTE FUNCTION audit_records_change()")
                self.conn.execute(self._PG_CHANGELOG_TRIGGER)
                self.conn.execute("CREATE OR REPLACE TRIGGER changelog_records AFTER UPDATE ON meta"
                                  " FOR EACH ROW EXECUTE FUNCTION changelog_records()")
            return
        have = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
        if have >= set(self._RECORD_TRIGGERS):
            return
        with self._tx(bump=False):
            for name, body in self._RECORD_TRIGGERS.items():
                self.conn.execute(f"CREATE TRIGGER IF NOT EXISTS {name} {body}")

    def _fold_pending(self, actor: str | None = None) -> None:
        rows = self.conn.execute("SELECT id, time, action, target, old, new FROM audit_pending ORDER BY id").fetchall()
        for _id, when, action, target, old, new in rows:
            self._chain.append(actor or self.RECORDS_ACTOR, action, target, json.loads(old) if old else None,
                               json.loads(new) if new else None, now=when)
        if rows:
            self.conn.execute("DELETE FROM audit_pending WHERE id <= ?", [rows[-1][0]])

    def fold_pending_audit(self, actor: str | None = None) -> int:
        """Chain the record changes the triggers noted (as `actor`, default RECORDS_ACTOR); returns
        how many."""
        if self.conn.execute("SELECT 1 FROM audit_pending LIMIT 1").fetchone() is None:
            return 0
        with self._tx(bump=False):
            count = self.conn.execute("SELECT COUNT(*) FROM audit_pending").fetchone()[0]
            self._fold_pending(actor)
        return int(count)

    # -- audit log ------------------------------------------------------------------------------

    def audit_entries(self, since: float | None = None, actor: str | None = None, target: str | None = None,
                      limit: int | None = None) -> list[audit.Entry]:
        self.fold_pending_audit()
        return audit.entries(self.conn, since, actor, target, limit)

    def verify_audit(self) -> audit.Verification:
        self.fold_pending_audit()
        self.conn.execute("BEGIN")   # one consistent view of the entries and the head
        try:
            return audit.verify(self.conn)
        finally:
            self.conn.execute("COMMIT")

    def audit_retention_days(self) -> float:
        value = self._meta("audit_retention_days")
        return float(value) if value else audit.DEFAULT_RETENTION_DAYS

    def set_audit_retention(self, days: float) -> None:
        if not days > 0 or days > 36500:
            raise InvalidValue("the audit retention must be between 0 and 36500 days")
        with self._tx(bump=False):
            old = self.audit_retention_days()
            self._set_meta("audit_retention_days", repr(float(days)))
            self._audit("audit.retention", "audit", {"days": old}, {"days": float(days)})

    def prune_audit(self, now: float | None = None) -> int:
        """Remove entries older than the retention (from the start of the chain); returns how many."""
        with self._tx(bump=False):
            return audit.prune(self.conn, time.time() if now is None else now,
                               self.audit_retention_days() * 86400, self.actor)

    def _meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM control_meta WHERE key = ?", [key]).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT INTO control_meta(key, value) VALUES (?, ?)"
                          " ON CONFLICT(key) DO UPDATE SET value = excluded.value", [key, value])

    # -- Tailnet Lock (control/lock.py verifies; the store only keeps) ---------------------------

    def tka_signatures(self) -> dict[str, str]:
        """node key (base64) -> its Tailnet Lock signature (base64)."""
        return {str(k): str(v) for k, v in self.conn.execute("SELECT node_key, signature FROM tka_signatures")}

    def set_tka_signature(self, node_key: str, signature: str) -> None:
        with self._tx():
            self.conn.execute("INSERT INTO tka_signatures(node_key, signature, created) VALUES (?, ?, ?)"
                              " ON CONFLICT(node_key) DO UPDATE SET signature = excluded.signature,"
                              " created = excluded.created", [node_key, signature, time.time()])
            self._audit("tka.sign", f"nodekey:{node_key}", None, {"signature": _sha(signature)})

    def tka_lock_keys(self) -> dict[str, str]:
        """node key (base64) -> the lock public key (`tlpub:HEX`) its node reported."""
        return {str(k): str(v) for k, v in self.conn.execute("SELECT node_key, lock_key FROM tka_lock_keys")}

    def set_tka_lock_key(self, node_key: str, lock_key: str) -> bool:
        """Remember a node's lock key; returns whether it changed (a public key: not audited)."""
        row = self.conn.execute("SELECT lock_key FROM tka_lock_keys WHERE node_key = ?", [node_key]).fetchone()
        if row is not None and str(row[0]) == lock_key:
            return False
        with self._tx():
            self.conn.execute("INSERT INTO tka_lock_keys(node_key, lock_key, updated) VALUES (?, ?, ?)"
                              " ON CONFLICT(node_key) DO UPDATE SET lock_key = excluded.lock_key,"
                              " updated = excluded.updated", [node_key, lock_key, time.time()])
        return True

    def tka_generation(self) -> int:
        """Grows with every write of the Tailnet Lock chain (by any replica)."""
        return int(self._meta("tka_generation") or 0)

    def tka_chain(self) -> tuple[int, list[tuple[bytes, float]], str | None]:
        """The Tailnet Lock chain as one consistent read: (generation, [(AUM bytes, commit time)],
        last active ancestor hash text)."""
        self.conn.execute("BEGIN")
        try:
            generation = self.tka_generation()
            rows = [(bytes(r[0]), float(r[1])) for r in
                    self.conn.execute("SELECT aum, created FROM tka_aums ORDER BY created, hash")]
            return generation, rows, self._meta("tka_ancestor")
        finally:
            self.conn.execute("COMMIT")

    def tka_chain_write(self, expect: int, add: Sequence[tuple[str, str | None, bytes, float]] = (),
                        purge: Sequence[str] = (), ancestor: str | None = None, clear: bool = False) -> int:
        """Write the chain if nobody has since generation `expect` (else `StaleChain`: the caller reads
        it again and retries), so replicas never build two chains from two stale views. `add` holds
        verified AUMs as (hash, parent hash, bytes, commit time). Returns the new generation."""
        with self._tx():
            generation = self.tka_generation()
            if generation != expect:
                raise StaleChain(f"the Tailnet Lock chain changed (generation {generation}, expected {expect})")
            if clear:
                self.conn.execute("DELETE FROM tka_aums")
                self.conn.execute("DELETE FROM control_meta WHERE key = 'tka_ancestor'")
            for h in purge:
                self.conn.execute("DELETE FROM tka_aums WHERE hash = ?", [h])
            for h, parent, raw, when in add:
                self.conn.execute("INSERT INTO tka_aums(hash, parent, aum, created) VALUES (?, ?, ?, ?)"
                                  " ON CONFLICT(hash) DO NOTHING", [h, parent, raw, when])
            if ancestor is not None:
                self._set_meta("tka_ancestor", ancestor)
            self._set_meta("tka_generation", str(generation + 1))
            self._notes.append(("tka.chain", "tailnet-lock"))
        return generation + 1

    def tka_disablement_secret(self) -> str | None:
        """The disablement secret (hex) that turned the lock off, handed to nodes so they follow."""
        return self._meta("tka_disablement_secret")

    def tka_changed(self, action: str, head: str | None, secret: str | None = None) -> None:
        """Record a change of the chain (init, sync, disable) in the audit log and bump the change
        counter, so every server's next map carries the new head. Disabling drops the signatures."""
        with self._tx():
            if action == "tka.disable":
                self.conn.execute("DELETE FROM tka_signatures")
                self._set_meta("tka_disablement_secret", secret or "")
            elif action == "tka.init":
                self.conn.execute("DELETE FROM control_meta WHERE key = 'tka_disablement_secret'")
            self._audit(action, "tailnet-lock", None, {"head": head})

    # -- connection (flow) logs (control/flows.py) ---------------------------------------------

    def flow_logs_enabled(self) -> bool:
        return self._meta("flow_logs") == "on"

    def set_flow_logs(self, on: bool) -> None:
        with self._tx():
            old = self.flow_logs_enabled()
            self._set_meta("flow_logs", "on" if on else "off")
            self._audit("settings.flow_logs", "settings", {"flow_logs": old}, {"flow_logs": on})

    def flow_retention_days(self) -> float:
        return float(self._meta("flow_retention_days") or 30)

    def set_flow_retention(self, days: float) -> None:
        if not 0 < days <= 3650:
            raise InvalidValue("flow log retention must be between 0 and 3650 days")
        with self._tx():
            old = self.flow_retention_days()
            self._set_meta("flow_retention_days", repr(float(days)))
            self._audit("settings.flow_retention", "settings", {"days": old}, {"days": days})

    FLOW_COLS = ("start", "end", "proto", "src", "dst", "sport", "dport", "peer", "kind", "tx_packets",
                 "tx_bytes", "rx_packets", "rx_bytes", "dropped", "rule")

    def store_flows(self, node: Node, boot_id: str, batches: Sequence[tuple[int, Sequence[Mapping[str, Any]]]],
                    lost: int = 0) -> int:
        """Store the batches of one node run newer than the last one stored, in one transaction;
        returns the highest sequence number now stored (what the node may forget)."""
        with self._tx(bump=False):
            row = self.conn.execute("SELECT seq FROM flow_batches WHERE node_id = ? AND boot_id = ?",
                                    [node.id, boot_id]).fetchone()
            done = int(row[0]) if row else 0
            rows = []
            for seq, records in sorted(batches, key=lambda b: b[0]):
                if seq <= done:
                    continue
                for r in records:
                    rows.append([node.id, node.name] + [r.get(c) for c in self.FLOW_COLS])
                done = seq
            self.conn.executemany(
                f"INSERT INTO flow_logs(node_id, node, {', '.join(self.FLOW_COLS)}) VALUES"
                f" ({', '.join('?' * (len(self.FLOW_COLS) + 2))})", rows)
            self.conn.execute("INSERT INTO flow_batches(node_id, boot_id, seq, lost) VALUES (?, ?, ?, ?)"
                              " ON CONFLICT(node_id, boot_id) DO UPDATE SET seq = excluded.seq,"
                              " lost = excluded.lost", [node.id, boot_id, done, lost])
            return done

    def flows(self, node: str | None = None, peer: str | None = None, since: float | None = None,
              dropped: bool = False, limit: int = 1000, newest_first: bool = False) -> list[dict[str, Any]]:
        where, args = [], []
        for col, val in (("node", node), ("peer", peer)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        if since is not None:
            where.append("end >= ?")
            args.append(since)
        if dropped:
            where.append("dropped = 1")
        sql = (f"SELECT node, {', '.join(self.FLOW_COLS)} FROM flow_logs"
               + (" WHERE " + " AND ".join(where) if where else "")
               + (" ORDER BY start DESC, id DESC LIMIT ?" if newest_first else " ORDER BY start, id LIMIT ?"))
        cols = ("node",) + self.FLOW_COLS
        return [dict(zip(cols, r)) for r in self.conn.execute(sql, [*args, limit])]

    def prune_flows(self, now: float | None = None) -> int:
        cutoff = (time.time() if now is None else now) - self.flow_retention_days() * 86400
        with self._tx(bump=False):
            return self.conn.execute("DELETE FROM flow_logs WHERE end < ?", [cutoff]).rowcount

    def _migrate(self) -> None:
        with self._tx(bump=False):
            if "control_meta" not in self.db.table_names():
                self.db["control_meta"].create({"key": str, "value": str}, pk="key")
            current = int(self._meta("control_schema") or 0)
            if current > SCHEMA_VERSION:
                raise SchemaTooNew(f"the control database has schema {current}; this program knows"
                                   f" up to {SCHEMA_VERSION}: upgrade meshnode")
            for step in MIGRATIONS[current:]:
                step(self.db)
            self._set_meta("control_schema", str(SCHEMA_VERSION))
            for key, default in (("change_counter", "0"), ("map_version", "0"), ("domain", DEFAULT_DOMAIN)):
                self.conn.execute("INSERT OR IGNORE INTO control_meta(key, value) VALUES (?, ?)", [key, default])

    def schema_version(self) -> int:
        return int(self._meta("control_schema") or 0)

    def close(self) -> None:
        self.conn.close()

    def change_counter(self) -> int:
        """Grows with every committed change by any process (records excepted: see `records.version()`)."""
        return int(self._meta("change_counter") or 0)

    def version(self) -> int:
        """The tailnet's version: the newest entry of the change log (0 for a new tailnet)."""
        return self.change_counter()

    def changes_since(self, version: int, limit: int = 10_000) -> list[Change]:
        """The changes after `version`, oldest first, at most `limit`; `ChangeLogGap` when some of them
        were pruned (the reader then starts again from a full snapshot)."""
        current = self.version()   # read first: a change committed after it only adds rows below
        rows = self.conn.execute("SELECT version, time, items, nodes FROM changes WHERE version > ?"
                                 " ORDER BY version LIMIT ?", [version, limit]).fetchall()
        if version < current and (not rows or rows[0][0] != version + 1):
            raise ChangeLogGap(f"the change log no longer holds version {version + 1}")
        return [Change(int(v), float(t), tuple((str(k), str(g)) for k, g in json.loads(items)),
                       tuple(int(i) for i in json.loads(nodes)) if nodes else ())
                for v, t, items, nodes in rows]

    def tailnet_epoch(self) -> str:
        """This database's identity (random, made by its migration): resume tokens carry it."""
        return self._meta("tailnet_epoch") or ""

    def prune_changes(self, keep: int = 100_000) -> int:
        """Forget all but the newest `keep` changes; returns how many went."""
        with self._tx(bump=False):
            return self.conn.execute("DELETE FROM changes WHERE version <= ?", [self.version() - keep]).rowcount

    def map_version(self) -> int:
        return int(self._meta("map_version") or 0)

    def bump_map_version(self) -> int:
        """Next map version, persisted before any node sees it (so it never goes backwards)."""
        with self._tx(bump=False):
            version = int(self._meta("map_version") or 0) + 1
            self._set_meta("map_version", str(version))
        return version

    def domain(self) -> str:
        return self._meta("domain") or DEFAULT_DOMAIN

    def set_domain(self, domain: str) -> None:
        try:
            domain = normalize_domain(domain)
        except NameError_ as exc:
            raise InvalidValue(f"domain: {exc}") from None
        if domain != self.domain():
            with self._tx():
                old = self.domain()
                self._set_meta("domain", domain)
                self._audit("tailnet.domain", "domain", old, domain)
            if hasattr(self, "records"):
                self.records.domain = domain

    def server_private_key(self) -> str:
        """The server's long-term Curve25519 key, created on first use."""
        key = self._meta("server_private_key")
        if key is None:
            with self._tx(bump=False):
                key = self._meta("server_private_key")
                if key is None:
                    key = generate_private_key()
                    self._set_meta("server_private_key", key)
        return key

    def tailnet_ca(self) -> tuple[str, str, str] | None:
        """The CA in use: (domain, key PEM, certificate PEM), or None before the first one exists."""
        row = self.conn.execute("SELECT domain, key_pem, cert_pem FROM tailnet_ca ORDER BY id DESC LIMIT 1").fetchone()
        return None if row is None else (str(row[0] or ""), str(row[1]), str(row[2]))

    def save_tailnet_ca(self, domain: str, key_pem: str, cert_pem: str, now: float) -> None:
        """Store a new CA (it becomes the one in use); the database file is made owner-only first."""
        self._restrict_file_mode()
        with self._tx():
            self.conn.execute("INSERT INTO tailnet_ca(created, domain, key_pem, cert_pem) VALUES (?, ?, ?, ?)",
                              [now, domain, key_pem, cert_pem])

    def _restrict_file_mode(self) -> None:
        # The CA key (and the server key) sit in this file: nobody but the owner may read it.
        if sqldb.dialect(self.db) == "postgres":
            return   # no file here: PostgreSQL's own roles and grants guard the rows
        row = self.conn.execute("PRAGMA database_list").fetchone()
        path = row[2] if row else ""
        for suffix in ("", "-wal", "-shm"):
            if path and os.path.exists(path + suffix):
                os.chmod(path + suffix, 0o600)

    def ensure_admin_token(self) -> str | None:
        """Create the admin API token if there is none; returns it (once) or None if one exists."""
        if self._meta("admin_token_hash") is not None:
            return None
        token = "msadm-" + os.urandom(32).hex()
        with self._tx(bump=False):
            if self._meta("admin_token_hash") is not None:
                return None
            self._set_meta("admin_token_hash", authkeys.hash_secret(token))
            self._audit("admin_token.create", "admin-token")
        return token

    def rotate_admin_token(self) -> str:
        """Replace the admin API token (the old one stops working at once); returns the new one."""
        token = "msadm-" + os.urandom(32).hex()
        with self._tx(bump=False):
            self._set_meta("admin_token_hash", authkeys.hash_secret(token))
            self._audit("admin_token.rotate", "admin-token")
        return token

    # -- replay marks (protocol.ReplayGuard) -----------------------------------------------------

    def replay_mark(self, machine_key: str) -> float | None:
        """The newest request timestamp accepted from `machine_key` by any run of the server."""
        row = self.conn.execute("SELECT ts FROM replay_marks WHERE machine_key = ?", [machine_key]).fetchone()
        return None if row is None else float(row[0])

    def save_replay_mark(self, machine_key: str, ts: float) -> None:
        """Raise the persisted mark now (never lowers it); not a tailnet change, so no counter bump."""
        self.note_replay_mark(machine_key, ts)
        with self._tx(bump=False):
            pass

    def note_replay_mark(self, machine_key: str, ts: float) -> None:
        """Persist the mark with the next transaction of this store, so a request's mark is written
        atomically with the change it makes (one commit instead of two)."""
        if ts > self._marks.get(machine_key, float("-inf")):
            self._marks[machine_key] = ts
        if len(self._marks) > 10_000:
            with self._tx(bump=False):
                pass

    def drop_replay_mark(self, machine_key: str) -> None:
        """Forget a noted mark not yet written (a failed registration of an unknown machine)."""
        self._marks.pop(machine_key, None)


    def admin_token_hash(self) -> str | None:
        return self._meta("admin_token_hash")

    # -- users ----------------------------------------------------------------------------------

    def _user_id(self, name: str, create: bool = False) -> int:
        row = self.conn.execute("SELECT id FROM users WHERE name = ?", [name]).fetchone()
        if row:
            return int(row[0])
        if not create:
            raise NotFound(f"no user {name!r}")
        uid = int(self.conn.execute("INSERT INTO users(name, created) VALUES (?, ?)",
                                    [name, time.time()]).lastrowid)
        self._audit("user.create", f"user:{name}", None, {"name": name})
        return uid

    @staticmethod
    def _check_user_name(name: str) -> str:
        name = name.strip()
        if not name or len(name) > 128 or any(c.isspace() for c in name):
            raise InvalidValue(f"user name {name!r} must be 1-128 characters without spaces")
        return name

    def create_user(self, name: str) -> User:
        name = self._check_user_name(name)
        with self._tx():
            if self.conn.execute("SELECT 1 FROM users WHERE name = ?", [name]).fetchone():
                raise Conflict(f"user {name!r} already exists")
            self._user_id(name, create=True)
        return self.get_user(name)

    def get_user(self, name: str) -> User:
        row = self.conn.execute("SELECT id, name, created FROM users WHERE name = ?", [name]).fetchone()
        if row is None:
            raise NotFound(f"no user {name!r}")
        return User(*row)

    def list_users(self) -> list[User]:
        return [User(*r) for r in self.conn.execute("SELECT id, name, created FROM users ORDER BY name")]

    def delete_user(self, name: str) -> None:
        """Delete a user with no nodes; their unused auth keys go with them."""
        with self._tx():
            uid = self._user_id(name)
            count = self.conn.execute("SELECT COUNT(*) FROM nodes WHERE user_id = ?", [uid]).fetchone()[0]
            if count:
                raise Conflict(f"user {name!r} still owns {count} node(s); delete them first")
            keys = [r[0] for r in self.conn.execute("SELECT id FROM authkeys WHERE user_id = ?", [uid])]
            self.conn.execute("DELETE FROM authkeys WHERE user_id = ?", [uid])
            self.conn.execute("DELETE FROM console_sessions WHERE user_id = ?", [uid])
            self.conn.execute("DELETE FROM user_roles WHERE user_id = ?", [uid])
            self.conn.execute("DELETE FROM users WHERE id = ?", [uid])
            self._audit("user.delete", f"user:{name}", {"name": name, "authkeys": keys}, None)

    # -- auth keys ------------------------------------------------------------------------------

    def create_authkey(self, user: str, reusable: bool = False, ephemeral: bool = False,
                       tags: Sequence[str] = (), expires: float | None = None) -> tuple[str, authkeys.AuthKey]:
        """A new pre-auth key for `user` (created if missing); returns (key text, stored key)."""
        user = self._check_user_name(user)
        for tag in tags:
            check_tag(tag)
        new = authkeys.generate()
        with self._tx():
            uid = self._user_id(user, create=True)
            self.conn.execute(
                "INSERT INTO authkeys(id, secret_hash, user_id, reusable, ephemeral, tags, created, expires,"
                " used_count, revoked) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, 0)",
                [new.id, new.secret_hash, uid, int(reusable), int(ephemeral), _j(sorted(set(tags))),
                 time.time(), expires])
            self._audit("authkey.create", f"authkey:{new.id}", None,
                        {"user": user, "reusable": reusable, "ephemeral": ephemeral, "tags": sorted(set(tags)),
                         "expires": expires})
        return new.text, self.get_authkey(new.id)

    _AK_COLS = ("k.id, u.name, k.reusable, k.ephemeral, k.tags, k.created, k.expires, k.used_count,"
                " k.revoked, k.secret_hash")

    @staticmethod
    def _ak(row: tuple) -> authkeys.AuthKey:
        return authkeys.AuthKey(row[0], row[1], bool(row[2]), bool(row[3]), _t(row[4]), row[5], row[6],
                                row[7], bool(row[8]), row[9])

    def get_authkey(self, key_id: str) -> authkeys.AuthKey:
        row = self.conn.execute(f"SELECT {self._AK_COLS} FROM authkeys k JOIN users u ON u.id = k.user_id"
                                " WHERE k.id = ?", [key_id]).fetchone()
        if row is None:
            raise NotFound(f"no auth key {key_id!r}")
        return self._ak(row)

    def list_authkeys(self) -> list[authkeys.AuthKey]:
        return [self._ak(r) for r in self.conn.execute(
            f"SELECT {self._AK_COLS} FROM authkeys k JOIN users u ON u.id = k.user_id ORDER BY k.created")]

    def revoke_authkey(self, key_id: str) -> None:
        with self._tx():
            row = self.conn.execute("SELECT revoked FROM authkeys WHERE id = ?", [key_id]).fetchone()
            if row is None:
                raise NotFound(f"no auth key {key_id!r}")
            self.conn.execute("UPDATE authkeys SET revoked = 1 WHERE id = ?", [key_id])
            self._audit("authkey.revoke", f"authkey:{key_id}", {"revoked": bool(row[0])}, {"revoked": True})

    # -- nodes ----------------------------------------------------------------------------------

    def _select_nodes(self, where: str = "", args: Sequence[Any] = ()) -> list[Node]:
        out = []
        cache = self._node_cache
        for r in self.conn.execute(
                f"SELECT {_NODE_COLS} FROM nodes n JOIN users u ON u.id = n.user_id {where} ORDER BY n.id", args):
            hit = cache.get(r[0])
            if hit is not None and hit[0] == r:
                out.append(hit[1])  # same row as last time: same (immutable) Node, no JSON decoding
                continue
            node = _node(r)
            if len(cache) > 200_000:
                cache.clear()
            cache[r[0]] = (r, node)
            out.append(node)
        return out

    def list_nodes(self) -> list[Node]:
        return self._select_nodes()

    def get_node(self, node_id: int) -> Node:
        nodes = self._select_nodes("WHERE n.id = ?", [node_id])
        if not nodes:
            raise NotFound(f"no node with id {node_id}")
        return nodes[0]

    def find_node(self, ref: str) -> Node:
        """A node by id, name, FQDN or address, as an admin types it."""
        ref = ref.strip().lower().rstrip(".")
        suffix = "." + self.domain()
        if ref.endswith(suffix):
            ref = ref[: -len(suffix)]
        nodes = self._select_nodes("WHERE n.name = ?", [ref])
        if not nodes and ref.isdigit():
            nodes = self._select_nodes("WHERE n.id = ?", [int(ref)])
        if not nodes:
            nodes = [n for n in self.list_nodes() if ref in n.addresses]
        if not nodes:
            raise NotFound(f"no node {ref!r} (give its name, id or address)")
        return nodes[0]

    def node_by_machine_key(self, machine_key: str) -> Node | None:
        nodes = self._select_nodes("WHERE n.machine_key = ?", [machine_key])
        return nodes[0] if nodes else None

    def register(self, reg: Registration, authorize: Authorizer, now: float | None = None,
                 actor: str | None = None, known: "Node | None | object" = _UNREAD) -> Node:
        """Register a machine, or log it in again; the whole decision and write is one transaction.

        A known, logged-in, unexpired machine may re-register without a key (node-key rotation, new
        advertisements); otherwise `reg.authkey` must pass `authkeys.check`, and it is consumed here, in
        the same transaction, so two racing registrations cannot both spend a single-use key.
        `actor` names who the audit log credits (default: the store's current actor). `known` is the
        machine's node as the caller read it just before (a hint that saves reading it again: a known
        machine is re-read under the lock anyway, and a new one's INSERT is checked by its constraint).

        What can be done before the writer lock is: the key's secret, revocation and expiry checked
        (a refused key never waits for the lock), the name candidates derived. Under it, a new node
        costs the key's spending (which brings back the audit head), one read of names and leases, the
        lease and node INSERTs, and one batched tail (audit rows, replay mark, change log, COMMIT: one
        pipeline on PostgreSQL).
        The unique constraints on names, addresses and machine keys are the last guard: a violation
        (only possible if a writer bypassed the lock) retries the whole transaction.
        """
        now = time.time() if now is None else now
        key: authkeys.AuthKey | None = None
        secret = ""
        if reg.authkey:
            key_id, secret = authkeys.split(reg.authkey)
            key = self._authkey_or_none(key_id)
            authkeys.check(key, secret, now)
        previous = self.actor
        if actor is not None:
            self.actor = actor
        try:
            for attempt in range(_REGISTER_ATTEMPTS):
                # Record changes noted before now are chained first (under their own actor), as
                # `acting_as` does; looked at here, not under the lock (one noted in between is chained
                # by the next write or the server's poller), as is whether the machine is known (a new
                # one is not read again under the lock: its INSERT's constraint decides).
                pending = self.conn.execute("SELECT 1 FROM audit_pending LIMIT 1").fetchone() is not None
                if known is _UNREAD or attempt:
                    known = self.node_by_machine_key(reg.machine_key)
                candidates = () if known is not None else self._name_candidates(reg.hostname)
                try:
                    return self._register_tx(reg, authorize, now, key, secret, candidates, pending,
                                             known is not None, trust_head=attempt == 0)
                except sqlite3.IntegrityError:
                    if attempt == _REGISTER_ATTEMPTS - 1:
                        raise
            raise AssertionError("unreachable")
        finally:
            self.actor = previous

    def _register_tx(self, reg: Registration, authorize: Authorizer, now: float, key: authkeys.AuthKey | None,
                     secret: str, candidates: Sequence[str], pending: bool, known: bool,
                     trust_head: bool) -> Node:
        with self._tx():
            self._folded = not pending
            # Without a key only a known machine gets in: read it here even if the hint said unknown,
            # so a stale hint cannot refuse it.
            existing = self.node_by_machine_key(reg.machine_key) if known or key is None else None
            if key is not None:
                # The check and the spending in one statement: a single-use key is spent once however
                # many registrations race for it; a key revoked since the check above is refused.
                # It also brings back the audit head, which the entries below need anyway (one round
                # trip fewer under the lock).
                row = self.conn.execute(
                    "UPDATE authkeys SET used_count = used_count + 1 WHERE id = ? AND revoked = 0"
                    " AND (reusable = 1 OR used_count = 0) RETURNING used_count, user_id,"
                    " (SELECT value FROM control_meta WHERE key = 'audit_head')", [key.id]).fetchone()
                if row is None:
                    authkeys.check(self._authkey_or_none(key.id), secret, now)   # raises with the reason
                    raise authkeys.AuthKeyRefused(authkeys.RefusalReason.UNKNOWN, "auth key not recognised")
                used_before, uid = int(row[0]) - 1, int(row[1])
                if trust_head:   # not after a failed attempt: a head edited by hand could be why
                    self._chain.prime(row[2])
            elif existing is None or not existing.active(now):
                raise authkeys.AuthKeyRefused(authkeys.RefusalReason.UNKNOWN,
                                              "an auth key is needed to register this machine")
            user = key.user if key else existing.user  # type: ignore[union-attr]
            key_tags = key.tags if key else ()
            grant = authorize(user, key_tags, reg, existing)
            ephemeral = (key.ephemeral if key else existing.ephemeral) or reg.ephemeral  # type: ignore[union-attr]
            fields: dict[str, Any] = {
                "node_key": reg.node_key, "hostname": reg.hostname, "tags": _j(grant.tags),
                "os": reg.os, "endpoints": _j(reg.endpoints), "advertised_routes": _j(reg.advertise_routes),
                "approved_routes": _j(grant.approved_routes), "advertises_exit_node": int(reg.advertise_exit_node),
                "exit_node_approved": int(grant.exit_node_approved), "ephemeral": int(ephemeral),
                "last_seen": now, "logged_out": 0,
            }
            if existing is not None and not reg.endpoints:
                # A login again (`meshnode up` on a registered node) that carries no endpoints
                # must not erase the ones the node reported: peers would lose their way to it.
                del fields["endpoints"]
            if reg.disco_key or existing is None:
                fields["disco_key"] = reg.disco_key
            if key is not None:
                fields["user_id"] = uid
                fields["authkey_id"] = key.id
                fields["expiry"] = None  # a fresh login clears an admin expiry
            if existing is not None:
                sets = ", ".join(f"{k} = ?" for k in fields)
                row = self.conn.execute(f"UPDATE nodes SET {sets} WHERE id = ? RETURNING {_NODE_ROW_COLS}",
                                        [*fields.values(), existing.id]).fetchone()
                node = self._node_from_row(row, user)
                self._node_ids.add(node.id)
                before, after = _summary(existing), _summary(node)
                if before != after or key is not None:
                    self._audit("node.login", f"node:{node.name}", before, after)
            else:
                name, offset = self._place(reg.machine_key, candidates or self._name_candidates(reg.hostname))
                fields.update(machine_key=reg.machine_key, name=name, created=now, offset=offset)
                # DO NOTHING rather than a failing INSERT: PostgreSQL would need a savepoint round trip
                # around it; no row back means a unique constraint said no (retried by `register`).
                row = self.conn.execute(
                    f"INSERT INTO nodes({', '.join(fields)}) VALUES ({', '.join('?' * len(fields))})"
                    f" ON CONFLICT DO NOTHING RETURNING {_NODE_ROW_COLS}", list(fields.values())).fetchone()
                if row is None:
                    raise sqlite3.IntegrityError(f"node name {fields['name']!r} or machine key taken meanwhile")
                node = self._node_from_row(row, user)
                self._node_ids.add(node.id)
                self._audit("node.register", f"node:{node.name}", None, _summary(node))
            if key is not None:
                self._audit("authkey.use", f"authkey:{key.id}", {"used": used_before},
                            {"used": used_before + 1, "node": node.name})
            return node

    def _node_from_row(self, row: tuple, user: str) -> Node:
        """A Node from `RETURNING _NODE_ROW_COLS` (the user's id where a join would put the name)."""
        full = (*row[:5], user, *row[6:])
        node = _node(full)
        self._node_cache[full[0]] = (full, node)
        return node

    def _authkey_or_none(self, key_id: str) -> authkeys.AuthKey | None:
        try:
            return self.get_authkey(key_id)
        except NotFound:
            return None

    def _name_candidates(self, hostname: str) -> list[str]:
        return naming.candidates(naming.derive_name(hostname, self.domain()), _NAME_PROBES)

    def _place(self, machine_key: str, candidates: Sequence[str]) -> tuple[str, int]:
        """A new node's name and address offset, read in one query: which candidates are taken, the
        machine's old lease and the highest lease (rows of (name, NULL, NULL) and one (NULL, lease, top))."""
        marks = ", ".join("?" * len(candidates))
        rows = self.conn.execute(
            f"SELECT name, NULL, NULL FROM nodes WHERE name IN ({marks}) UNION ALL SELECT NULL,"
            " (SELECT offset FROM leases WHERE machine_key = ?), (SELECT MAX(offset) FROM leases)",
            [*candidates, machine_key]).fetchall()
        taken = {r[0] for r in rows if r[0] is not None}
        mine, top = next((r[1], r[2]) for r in rows if r[0] is None)
        name = next((c for c in candidates if c not in taken), None)
        if name is None:   # all the candidates are taken: probe on, one query each
            name = naming.unique_name(candidates[0], _Names(self.conn))
        return name, self._lease(machine_key, mine, top)

    def _lease(self, machine_key: str, mine: int | None, top: int | None) -> int:
        """The machine's address offset: its old lease, else the next free one after the highest."""
        if mine is not None:
            return int(mine)
        pair = addresses.allocate(_Leases(self.conn, int(top or 0)), int(top or 0) + 1)
        if self.conn.execute("INSERT INTO leases(machine_key, offset) VALUES (?, ?) ON CONFLICT DO NOTHING",
                             [machine_key, pair.offset]).rowcount != 1:
            raise sqlite3.IntegrityError(f"address offset {pair.offset} leased meanwhile")
        return pair.offset

    def rename_node(self, ref: str, new_name: str) -> Node:
        """Admin rename; `naming.NameInvalid` or `naming.NameTaken` if it cannot be."""
        name = naming.validate_name(new_name)
        with self._tx():
            node = self.find_node(ref)
            if name in _Names(self.conn, except_id=node.id):
                raise naming.NameTaken(f"name {name!r} is taken by another node")
            self.conn.execute("UPDATE nodes SET name = ? WHERE id = ?", [name, node.id])
            self._node_ids.add(node.id)
            if name != node.name:
                self._audit("node.rename", f"node:{name}", {"name": node.name}, {"name": name})
        return self.get_node(node.id)

    def delete_node(self, ref: str) -> Node:
        """Delete a node; its name is free at once. Ephemeral nodes give their lease back too."""
        with self._tx():
            node = self.find_node(ref)
            self._delete(node)
            self._audit("node.delete", f"node:{node.name}", _summary(node), None)
        return node

    def _delete(self, node: Node) -> None:
        self.conn.execute("DELETE FROM nodes WHERE id = ?", [node.id])
        self._node_ids.add(node.id)
        if node.ephemeral:
            self.conn.execute("DELETE FROM leases WHERE machine_key = ?", [node.machine_key])

    def delete_stale_ephemeral(self, online_ids: set[int], older_than: float) -> list[Node]:
        """Delete ephemeral nodes that are offline and were last seen before `older_than`."""
        def stale() -> list[Node]:
            return [n for n in self._select_nodes("WHERE n.ephemeral = 1")
                    if n.id not in online_ids and (n.last_seen or n.created) < older_than]
        # Looked for first, outside any transaction: a tick that finds nothing writes nothing. It
        # used to commit an empty write every tick, a new tailnet version whose change named nothing,
        # which made every node holding an older version start over with a full map when it
        # reconnected (a replica's nodes after it died, at scale: tests/integration/test_control_resume.py).
        if not stale():
            return []
        with self._tx():
            gone = stale()   # again, under the write lock: another replica may have reaped them
            for n in gone:
                self._delete(n)
                self._audit("node.delete", f"node:{n.name}", _summary(n), {"reason": "ephemeral node offline"})
        return gone

    def sweep_expired(self, now: float) -> list[Node]:
        """Nodes whose login expired since the last sweep (`expiry_swept` in control_meta): each is
        audited once (`node.expired`), and the change counter moves so every replica's maps drop them
        at once rather than at the next unrelated change. The first sweep only sets the mark."""
        mark = self._meta("expiry_swept")
        if mark is not None and not self._select_nodes("WHERE n.expiry > ? AND n.expiry <= ? AND n.logged_out = 0",
                                                         [float(mark), now]):
            return []   # nothing to do: nothing written (the mark may stay behind)
        with self._tx(bump=mark is not None):
            mark = self._meta("expiry_swept")   # again, under the write lock: another sweep may have run
            gone = [] if mark is None else self._select_nodes(
                "WHERE n.expiry > ? AND n.expiry <= ? AND n.logged_out = 0", [float(mark), now])
            for n in gone:
                self._audit("node.expired", f"node:{n.name}", None, {"expiry": n.expiry})
            self._set_meta("expiry_swept", repr(max(now, float(mark or 0))))
        return gone

    def set_tags(self, ref: str, tags: Sequence[str]) -> Node:
        for tag in tags:
            check_tag(tag)
        with self._tx():
            node = self.find_node(ref)
            self.conn.execute("UPDATE nodes SET tags = ?, admin_tags = ? WHERE id = ?",
                              [_j(sorted(set(tags))), _j(sorted(set(tags))), node.id])
            self._node_ids.add(node.id)
            self._audit("node.tags", f"node:{node.name}", {"tags": list(node.tags)}, {"tags": sorted(set(tags))})
        return self.get_node(node.id)

    def tag_grants(self, node: Node) -> frozenset[str]:
        """Tags `node` holds whatever the policy says: applied by an admin, or carried by the auth key
        it registered with. Its other tags stand only while tagOwners lets its user apply them."""
        row = self.conn.execute("SELECT n.admin_tags, k.tags FROM nodes n LEFT JOIN authkeys k"
                                " ON k.id = n.authkey_id WHERE n.id = ?", [node.id]).fetchone()
        return frozenset(_t(row[0]) + _t(row[1])) if row else frozenset()

    def expire_node(self, ref: str, when: float | None = None) -> Node:
        """Expire a node's login now (or at `when`): it leaves every map until it logs in again."""
        with self._tx():
            node = self.find_node(ref)
            expiry = time.time() if when is None else when
            self.conn.execute("UPDATE nodes SET expiry = ? WHERE id = ?", [expiry, node.id])
            self._node_ids.add(node.id)
            self._audit("node.expire", f"node:{node.name}", {"expiry": node.expiry}, {"expiry": expiry})
        return self.get_node(node.id)

    def approve_routes(self, ref: str, routes: Sequence[str]) -> Node:
        """Set exactly the approved routes (each must be advertised): 0.0.0.0/0 or ::/0 approve the
        exit node, and leaving them out withdraws that approval, like any unlisted route's."""
        with self._tx():
            node = self.find_node(ref)
            wanted, exit_flag = [], False
            for r in routes:
                cidr = normalize_cidr(r)
                if cidr in ("0.0.0.0/0", "::/0"):
                    exit_flag = True
                    continue
                if cidr not in node.advertised_routes:
                    raise InvalidValue(f"{node.name} does not advertise {cidr}")
                wanted.append(cidr)
            if exit_flag and not node.advertises_exit_node:
                raise InvalidValue(f"{node.name} does not advertise itself as an exit node")
            self.conn.execute("UPDATE nodes SET approved_routes = ?, exit_node_approved = ? WHERE id = ?",
                              [_j(sorted(set(wanted))), int(exit_flag), node.id])
            self._node_ids.add(node.id)
            self._audit("node.routes", f"node:{node.name}",
                        {"approved_routes": list(node.approved_routes), "exit_node": node.exit_node_approved},
                        {"approved_routes": sorted(set(wanted)), "exit_node": exit_flag})
        return self.get_node(node.id)

    def set_endpoints(self, node_id: int, endpoints: Sequence[str], disco_key: str | None = None,
                      home_region: int | None = None) -> None:
        """The node's reported endpoints (and, when given, its disco key of this run and its home
        relay region)."""
        with self._tx():
            self._notes.append(("node.endpoints", f"node-id:{node_id}"))
            self._node_ids.add(node_id)
            if home_region is not None:
                self.conn.execute("UPDATE nodes SET home_region = ? WHERE id = ?", [home_region, node_id])
            if disco_key is None:
                self.conn.execute("UPDATE nodes SET endpoints = ? WHERE id = ?", [_j(endpoints), node_id])
            else:
                self.conn.execute("UPDATE nodes SET endpoints = ?, disco_key = ? WHERE id = ?",
                                  [_j(endpoints), disco_key, node_id])

    def logout(self, node_id: int) -> None:
        """The node leaves maps; it keeps its name and addresses for its next login (with a key)."""
        with self._tx():
            node = self.get_node(node_id)
            self.conn.execute("UPDATE nodes SET logged_out = 1 WHERE id = ?", [node_id])
            self._node_ids.add(node_id)
            self._audit("node.logout", f"node:{node.name}", {"logged_out": node.logged_out}, {"logged_out": True})

    def touch(self, node_ids: Sequence[int], now: float) -> None:
        """Record last-seen times (peers see them in their maps, so this counts as a change)."""
        with self._tx():
            self._notes.extend(("node.seen", f"node-id:{i}") for i in node_ids)
            self._node_ids.update(node_ids)
            self.conn.executemany("UPDATE nodes SET last_seen = ? WHERE id = ?", [(now, i) for i in node_ids])

    def set_presence(self, node_ids: Sequence[int], now: float, interval: float) -> None:
        """What a running server sees online, for `control nodes ls` (another process). Not a change
        of the tailnet: the counter servers poll is left alone, so no map is rebuilt for it."""
        with self._tx(bump=False):
            self._set_meta("presence", json.dumps({"at": now, "interval": interval,
                                                   "ids": sorted(int(i) for i in node_ids)}))

    def presence(self) -> tuple[float, float, frozenset[int]] | None:
        """(written at, heartbeat interval, online node ids) as the server last wrote them, or None.
        With replicas: the nodes streaming from every live replica, as of the newest heartbeat."""
        replicas = [r for r in self.list_replicas() if r.alive(time.time())]
        if replicas:
            return (max(r.heartbeat_at for r in replicas), REPLICA_HEARTBEAT,
                    frozenset().union(*(r.online for r in replicas)))
        raw = self._meta("presence")
        try:
            obj = json.loads(raw) if raw else None
            return (float(obj["at"]), float(obj["interval"]), frozenset(int(i) for i in obj["ids"])) if obj else None
        except (ValueError, KeyError, TypeError):
            return None

    # -- replicas -------------------------------------------------------------------------------

    def heartbeat_replica(self, replica_id: str, listen: str, online: Sequence[int], version: int,
                          now: float) -> None:
        """A replica says it lives, who streams from it and which tailnet version it serves.
        Not a tailnet change: no version, no change-log entry."""
        with self._tx(bump=False):
            self.conn.execute("INSERT INTO replicas(id, listen, nodes, version, heartbeat_at, online)"
                              " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET listen = excluded.listen,"
                              " nodes = excluded.nodes, version = excluded.version,"
                              " heartbeat_at = excluded.heartbeat_at, online = excluded.online",
                              [replica_id, listen, len(online), version, now, json.dumps(sorted(online))])

    def list_replicas(self) -> list[Replica]:
        return [Replica(r[0], r[1] or "", int(r[2] or 0), int(r[3] or 0), float(r[4]),
                        frozenset(int(i) for i in json.loads(r[5] or "[]")))
                for r in self.conn.execute("SELECT id, listen, nodes, version, heartbeat_at, online FROM replicas"
                                           " ORDER BY id")]

    def remove_replica(self, replica_id: str) -> None:
        """A replica that stops cleanly takes its row (and its nodes' presence) with it."""
        with self._tx(bump=False):
            self.conn.execute("DELETE FROM replicas WHERE id = ?", [replica_id])

    # -- policy ---------------------------------------------------------------------------------

    def policy_text(self) -> str | None:
        """The admin's policy text, or None when none was ever set (the allow-all default applies)."""
        row = self.conn.execute("SELECT text FROM policy WHERE id = 1").fetchone()
        return row[0] if row else None

    def set_policy_text(self, text: str, decide: Callable[[str, list[Node]], dict[int, tuple[str, ...]] | None],
                        all_nodes: bool = True) -> list[tuple[Node, tuple[str, ...]]]:
        """Store a policy after `decide(text, nodes)` passes, inside the same transaction (so the
        policy's tests ran against the nodes as they are when it lands). `decide` may return new tags
        for nodes (those that lost the right to some); they are written in the same transaction.
        Returns (node as it was, tags it lost) for each of those. `all_nodes=False`: `decide` needs
        only the tagged nodes (a policy without tests; reading 10,000 nodes costs ~0.1 s, inside the
        write transaction)."""
        with self._tx():
            nodes = self.list_nodes() if all_nodes else self._select_nodes("WHERE n.tags <> '[]'")
            retag = decide(text, nodes) or {}
            old_text = self.policy_text()
            self.conn.execute("INSERT INTO policy(id, text, updated) VALUES (1, ?, ?)"
                              " ON CONFLICT(id) DO UPDATE SET text = excluded.text, updated = excluded.updated",
                              [text, time.time()])
            self._audit("policy.set", "policy", None if old_text is None else {"sha256": _sha(old_text)},
                        {"sha256": _sha(text), "diff": _diff(old_text, text)})
            return self._retag(nodes, retag, "policy: tagOwners no longer gives them to ")

    def _retag(self, nodes: list[Node], retag: Mapping[int, tuple[str, ...]], why: str
               ) -> list[tuple[Node, tuple[str, ...]]]:
        """Write the tags `retag` leaves each node (inside the caller's transaction), audited with
        `why` + the node's user; (node as it was, tags it lost) for each."""
        lost = []
        for node in nodes:
            if node.id in retag:
                tags = tuple(sorted(set(retag[node.id])))
                self.conn.execute("UPDATE nodes SET tags = ? WHERE id = ?", [_j(tags), node.id])
                lost.append((node, tuple(t for t in node.tags if t not in tags)))
                self._audit("node.tags", f"node:{node.name}", {"tags": list(node.tags)},
                            {"tags": list(tags), "reason": why + node.user})
        return lost

    # -- console: roles, sessions, browser logins of machines ------------------------------------
    # None of these bump the change counter: they never change what a node's map says.

    def user_role(self, name: str) -> UserRole | None:
        row = self.conn.execute("SELECT u.name, r.role, r.email, r.groups FROM users u JOIN user_roles r"
                                " ON r.user_id = u.id WHERE u.name = ?", [name]).fetchone()
        return None if row is None else UserRole(row[0], row[1], row[2] or "", _t(row[3]))

    def list_user_roles(self) -> list[UserRole]:
        """Every user with their role ('member' for users that never signed in to the console)."""
        return [UserRole(r[0], r[1] or "member", r[2] or "", _t(r[3])) for r in self.conn.execute(
            "SELECT u.name, r.role, r.email, r.groups FROM users u LEFT JOIN user_roles r ON r.user_id = u.id"
            " ORDER BY u.name")]

    def sign_in_user(self, name: str, email: str, groups: Sequence[str], create: bool,
                     first_role: str, default_role: str,
                     retag: Callable[[list[Node]], Mapping[int, tuple[str, ...]]] | None = None) -> UserRole:
        """Record a console sign-in: create the user if `create`, give the first user ever to sign in
        `first_role` (owner) and later new ones `default_role`; refresh e-mail and groups.

        When the groups changed, `retag(the user's tagged nodes)` (access.tags_after_sign_in) runs
        with the new memberships in the same transaction, and nodes lose the tags it leaves out
        (owned through a provider group the user has left)."""
        name = self._check_user_name(name)
        before = self.user_role(name)
        # New group memberships change what the policy's groups hold, so maps: bump then.
        groups_changed = tuple(groups) != (before.groups if before is not None else ())
        with self._tx(bump=groups_changed):
            if not create:
                self._user_id(name)  # NotFound: not pre-approved
            uid = self._user_id(name, create=True)
            row = self.conn.execute("SELECT role FROM user_roles WHERE user_id = ?", [uid]).fetchone()
            if row is None:
                anyone = self.conn.execute("SELECT 1 FROM user_roles LIMIT 1").fetchone()
                role = default_role if anyone else first_role
                self.conn.execute("INSERT INTO user_roles(user_id, role, email, groups, updated)"
                                  " VALUES (?, ?, ?, ?, ?)", [uid, role, email, _j(groups), time.time()])
                self._audit("user.role", f"user:{name}", None, {"role": role, "via": "first sign-in"})
            else:
                self.conn.execute("UPDATE user_roles SET email = ?, groups = ?, updated = ? WHERE user_id = ?",
                                  [email, _j(groups), time.time(), uid])
            if groups_changed:
                # Audited, and named in the change log: what the policy's groups hold decides every
                # node's peers, so a node resuming across this change must get a full map.
                self._audit("user.groups", f"user:{name}",
                            {"groups": list(before.groups) if before is not None else []}, {"groups": list(groups)})
                if retag is not None:
                    tagged = [n for n in self._select_nodes("WHERE u.name = ?", [name]) if n.tags]
                    self._retag(tagged, retag(tagged), "sign-in: the identity provider's groups no longer"
                                " give them to ")
        role = self.user_role(name)
        assert role is not None
        return role

    def idp_groups(self) -> dict[str, tuple[str, ...]]:
        """The identity provider's groups as policy groups: {"group:eng": (users...)}."""
        out: dict[str, list[str]] = {}
        for name, groups in self.conn.execute("SELECT u.name, r.groups FROM users u JOIN user_roles r"
                                              " ON r.user_id = u.id WHERE r.groups != '[]' ORDER BY u.name"):
            for g in _t(groups):
                out.setdefault(f"group:{g}", []).append(name)
        return {g: tuple(m) for g, m in out.items()}

    def set_user_role(self, name: str, role: str, check: Callable[[str, int], None] = lambda r, n: None) -> None:
        """Set a user's role; `check(old_role, owners_left_after)` may refuse it, inside the transaction."""
        with self._tx(bump=False):
            uid = self._user_id(name)
            row = self.conn.execute("SELECT role FROM user_roles WHERE user_id = ?", [uid]).fetchone()
            old = row[0] if row else "member"
            owners = self.conn.execute("SELECT COUNT(*) FROM user_roles WHERE role = 'owner' AND user_id != ?",
                                       [uid]).fetchone()[0] + (role == "owner")
            check(old, owners)
            self.conn.execute("INSERT INTO user_roles(user_id, role, email, groups, updated) VALUES (?, ?, '', '[]', ?)"
                              " ON CONFLICT(user_id) DO UPDATE SET role = excluded.role, updated = excluded.updated",
                              [uid, role, time.time()])
            self._audit("user.role", f"user:{name}", {"role": old}, {"role": role})

    def create_session(self, id_hash: str, user: str, csrf: str, now: float) -> None:
        with self._tx(bump=False):
            self.conn.execute("INSERT INTO console_sessions(id_hash, user_id, csrf, created, last_active)"
                              " VALUES (?, ?, ?, ?, ?)", [id_hash, self._user_id(user), csrf, now, now])

    def get_session(self, id_hash: str) -> ConsoleSession | None:
        row = self.conn.execute("SELECT s.id_hash, u.name, s.csrf, s.created, s.last_active FROM console_sessions s"
                                " JOIN users u ON u.id = s.user_id WHERE s.id_hash = ?", [id_hash]).fetchone()
        return None if row is None else ConsoleSession(*row)

    def touch_session(self, id_hash: str, now: float) -> None:
        with self._tx(bump=False):
            self.conn.execute("UPDATE console_sessions SET last_active = ? WHERE id_hash = ?", [now, id_hash])

    def delete_sessions(self, id_hash: str | None = None, user: str | None = None,
                        idle_before: float | None = None, created_before: float | None = None) -> int:
        """End one session, all of a user's, or every session idle/created before the given times."""
        with self._tx(bump=False):
            n = 0
            if id_hash is not None:
                n += self.conn.execute("DELETE FROM console_sessions WHERE id_hash = ?", [id_hash]).rowcount
            if user is not None:
                n += self.conn.execute("DELETE FROM console_sessions WHERE user_id = ?",
                                       [self._user_id(user)]).rowcount
            if idle_before is not None and created_before is not None:
                n += self.conn.execute("DELETE FROM console_sessions WHERE last_active < ? OR created < ?",
                                       [idle_before, created_before]).rowcount
            return n

    def create_register_request(self, id_hash: str, machine_key: str, node_key: str, hostname: str, os_: str,
                                now: float, expires: float) -> None:
        """A machine waiting for someone to confirm its login in the browser; a new one replaces the
        machine's pending request (its old URL stops working)."""
        with self._tx(bump=False):
            self.conn.execute("DELETE FROM register_requests WHERE machine_key = ? AND state = 'pending'",
                              [machine_key])
            self.conn.execute("DELETE FROM register_requests WHERE expires < ?", [now - 3600])
            self.conn.execute("INSERT INTO register_requests(id_hash, machine_key, node_key, hostname, os, created,"
                              " expires, user, authkey, state) VALUES (?, ?, ?, ?, ?, ?, ?, '', '', 'pending')",
                              [id_hash, machine_key, node_key, hostname, os_, now, expires])

    def get_register_request(self, id_hash: str) -> RegisterRequest | None:
        row = self.conn.execute("SELECT id_hash, machine_key, node_key, hostname, os, created, expires, user,"
                                " authkey, state FROM register_requests WHERE id_hash = ?", [id_hash]).fetchone()
        return None if row is None else RegisterRequest(*row)

    def pending_register_request(self, machine_key: str, node_key: str, now: float) -> RegisterRequest | None:
        row = self.conn.execute("SELECT id_hash FROM register_requests WHERE machine_key = ? AND node_key = ?"
                                " AND state = 'pending' AND expires > ?", [machine_key, node_key, now]).fetchone()
        return self.get_register_request(row[0]) if row else None

    def approve_register_request(self, id_hash: str, user: str, now: float) -> RegisterRequest:
        """Confirm a pending, unexpired request for `user`: it gets a single-use auth key of that user
        (expiring with the request) that the waiting machine registers with. A second use is refused."""
        with self._tx(bump=False):
            req = self.get_register_request(id_hash)
            if req is None or req.state != "pending":
                raise Conflict("this login link was already used or is unknown")
            if now >= req.expires:
                raise Conflict("this login link expired; run `meshnode up` again for a new one")
            new = authkeys.generate()
            uid = self._user_id(user)
            self.conn.execute(
                "INSERT INTO authkeys(id, secret_hash, user_id, reusable, ephemeral, tags, created, expires,"
                " used_count, revoked) VALUES (?, ?, ?, 0, 0, '[]', ?, ?, 0, 0)",
                [new.id, new.secret_hash, uid, now, req.expires])
            self.conn.execute("UPDATE register_requests SET state = 'approved', user = ?, authkey = ?"
                              " WHERE id_hash = ? AND state = 'pending'", [user, new.text, id_hash])
            self._audit("node.login-approved", f"machine:{req.hostname}", None,
                                {"user": user, "os": req.os, "authkey": new.id})
        got = self.get_register_request(id_hash)
        assert got is not None
        return got

    def claim_register_request(self, machine_key: str, node_key: str) -> RegisterRequest | None:
        """The machine's approved request, at most once: its auth key is handed over and forgotten."""
        with self._tx(bump=False):
            row = self.conn.execute("SELECT id_hash FROM register_requests WHERE machine_key = ? AND node_key = ?"
                                    " AND state = 'approved'", [machine_key, node_key]).fetchone()
            if row is None:
                return None
            req = self.get_register_request(row[0])
            self.conn.execute("UPDATE register_requests SET state = 'used', authkey = '' WHERE id_hash = ?", [row[0]])
        return req

    # -- DNS settings ---------------------------------------------------------------------------

    def dns_settings(self) -> DnsSettings:
        rows = self.conn.execute("SELECT kind, domain, value FROM dns_settings ORDER BY position, id").fetchall()
        routes: dict[str, list[str]] = {}
        for kind, domain, value in rows:
            if kind == "route":
                routes.setdefault(domain, [])
                if value:
                    routes[domain].append(value)
        return DnsSettings(tuple(v for k, _, v in rows if k == "nameserver"),
                           tuple((d, tuple(v)) for d, v in sorted(routes.items())),
                           tuple(v for k, _, v in rows if k == "search"),
                           any(k == "option" and d == "upgrade_public_dns" and v == "on" for k, d, v in rows))

    def set_nameservers(self, servers: Sequence[str]) -> None:
        values = [_check_resolver(s) for s in servers]
        with self._tx():
            old = list(self.dns_settings().nameservers)
            self._replace("nameserver", "", values)
            self._audit("dns.nameservers", "dns", old, values)

    def set_upgrade_public_dns(self, on: bool) -> None:
        """Nodes upgrade well-known public resolvers to DoH (plain DNS raced behind), or not."""
        with self._tx():
            old = self.dns_settings().upgrade_public_dns
            self._replace("option", "upgrade_public_dns", ["on"] if on else [])
            self._audit("dns.upgrade_public_dns", "dns", old, on)

    def set_search_domains(self, domains: Sequence[str]) -> None:
        values = [_check_domain(d) for d in domains]
        with self._tx():
            old = list(self.dns_settings().search_domains)
            self._replace("search", "", values)
            self._audit("dns.search_domains", "dns", old, values)

    def add_route(self, domain: str, servers: Sequence[str]) -> None:
        """Split DNS: `domain` goes to `servers`; no servers means answer it locally (authoritative)."""
        dom = _check_domain(domain)
        values = [_check_resolver(s) for s in servers] or [""]
        with self._tx():
            old = dict(self.dns_settings().routes).get(dom)
            self._replace("route", dom, values)
            self._audit("dns.route", f"dns:{dom}", None if old is None else list(old), [v for v in values if v])

    def remove_route(self, domain: str) -> None:
        dom = _check_domain(domain)
        with self._tx():
            old = dict(self.dns_settings().routes).get(dom)
            if self.conn.execute("DELETE FROM dns_settings WHERE kind = 'route' AND domain = ?",
                                 [dom]).rowcount == 0:
                raise NotFound(f"no DNS route for {dom}")
            self._audit("dns.route", f"dns:{dom}", list(old or ()), None)

    def _replace(self, kind: str, domain: str, values: Sequence[str]) -> None:
        self.conn.execute("DELETE FROM dns_settings WHERE kind = ? AND domain = ?", [kind, domain])
        self.conn.executemany("INSERT INTO dns_settings(kind, domain, value, position) VALUES (?, ?, ?, ?)",
                              [(kind, domain, v, i) for i, v in enumerate(values)])


def _summary(node: Node) -> dict[str, Any]:
    """What the audit log keeps of a node: who it is and what it is allowed."""
    return {"id": node.id, "name": node.name, "user": node.user, "hostname": node.hostname, "tags": list(node.tags),
            "node_key": node.node_key,
            "addresses": list(node.addresses), "approved_routes": list(node.approved_routes),
            "exit_node": node.exit_node_approved, "ephemeral": node.ephemeral, "expiry": node.expiry,
            "logged_out": node.logged_out}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _diff(old: str | None, new: str) -> str:
    """A unified diff of two policy texts (the audit log's `policy.set` entry)."""
    lines = difflib.unified_diff((old or "").splitlines(keepends=True), new.splitlines(keepends=True),
                                 "policy (before)" if old is not None else "policy (none: allow-all default)",
                                 "policy (after)", n=2)
    return "".join(lines)[:200_000]


def normalize_cidr(text: str) -> str:
    import ipaddress
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise InvalidValue(f"{text!r} is not a CIDR prefix (e.g. 10.0.0.0/24)") from None


def check_tag(tag: str) -> str:
    """A tag as `tag:name`; `InvalidValue` otherwise."""
    if not tag.startswith("tag:") or not tag[4:] or naming.sanitize_label(tag[4:]) != tag[4:]:
        raise InvalidValue(f"tag {tag!r} must look like tag:name (lowercase letters, digits, '-')")
    return tag


def _check_resolver(spec: str) -> str:
    try:
        return parse_upstream(spec).spec
    except UpstreamError as exc:
        raise InvalidValue(str(exc)) from None


def _check_domain(domain: str) -> str:
    try:
        return normalize_domain(domain)
    except NameError_ as exc:
        raise InvalidValue(f"domain: {exc}") from None
