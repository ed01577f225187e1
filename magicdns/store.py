"""The records store: admin-defined records in SQLite (through sqlite-utils) or PostgreSQL (sqldb.py).

This module is the one writer of the `records` table, whether the file is a standalone resolver's
store or the control server's database. Every change bumps `records_version` in the same
transaction, so a reader that sees a new version also sees every row of that change, and never
half of an import.
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import sqlite_utils
from dnslib.label import DNSBuffer

from . import sqldb
from .names import NameError_, absolute_owner
from .records import SHADOWING_TYPES, SUPPORTED_TYPES, Record, RecordError, parse_record

SCHEMA_VERSION = 1
_VERSION_KEY = "records_version"


class StoreError(RuntimeError):
    """The store cannot be opened or changed; the message says why."""


class DuplicateRecord(StoreError):
    """The same (name, type, value) is already stored."""


class CnameConflict(StoreError):
    """A CNAME and other data (or two CNAMEs) at one name."""


class RecordNotFound(StoreError):
    """No stored record matched."""


class ShadowsNode(StoreError):
    """A record that would replace a node's addresses, without `override` (DESIGN.md section 3)."""


class RRsetTooLarge(StoreError):
    """An RRset whose records could not all travel in one DNS message (64 KiB)."""


# A reply carrying one RRset: header, the question (owner up to 255 octets, type, class) and an OPT
# record; each record then costs a compressed owner (2), type, class, TTL, length (10) and its data.
_REPLY_OVERHEAD = 12 + 255 + 4 + 11
_RECORD_OVERHEAD = 2 + 10
MAX_MESSAGE = 65535


def wire_size(record: Record) -> int:
    """Octets `record` takes in a reply that carries it (its data uncompressed)."""
    buf = DNSBuffer()
    record.rdata.pack(buf)
    return _RECORD_OVERHEAD + len(buf.data)


def _connect(path: str | Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=10.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


class RecordStore:
    """Records in one SQLite file; safe to open from the CLI while a server reads it."""

    def __init__(self, db: "str | Path | sqlite_utils.Database | sqldb.PgDatabase", domain: str = "tailnet") -> None:
        self.domain = domain
        try:
            if isinstance(db, (sqlite_utils.Database, sqldb.PgDatabase)):
                self.db = db
            elif sqldb.is_postgres(db):
                self.db = sqldb.PgDatabase(str(db))
            else:
                path = Path(db)
                if path.parent and not path.parent.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                self.db = sqlite_utils.Database(_connect(path))
            self._migrate()
        except sqlite3.DatabaseError as exc:
            where = sqldb.redact(db) if isinstance(db, str) else db
            raise StoreError(f"cannot open records store {where}: {exc}") from None

    def _migrate(self) -> None:
        with self._tx():
            if "records" not in self.db.table_names():
                self.db["records"].create(
                    {"id": int, "name": str, "type": str, "value": str, "ttl": int, "override": int},
                    pk="id", not_null={"name", "type", "value", "ttl", "override"})
                self.db["records"].create_index(["name", "type", "value"], unique=True)
            if "meta" not in self.db.table_names():
                self.db["meta"].create({"key": str, "value": str}, pk="key")
            self.db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, 0)", [_VERSION_KEY])
            self.db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('records_schema', ?)",
                            [SCHEMA_VERSION])

    @contextmanager
    def _tx(self) -> Iterator[None]:
        """One IMMEDIATE transaction: all of a change lands, or none of it."""
        conn = self.db.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def _bump(self) -> None:
        self.db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = ?", [_VERSION_KEY])

    def version(self) -> int:
        """The change counter: it grows with every committed change."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", [_VERSION_KEY]).fetchone()
        return int(row[0]) if row else 0

    def _row_to_record(self, row: tuple) -> Record:
        name, rtype, value, ttl, override = row
        try:
            return parse_record(name + ".", rtype, value, ttl, self.domain, bool(override))
        except RecordError as exc:
            raise StoreError(f"stored record {name} {rtype} {value!r} is invalid: {exc}") from None

    def snapshot(self) -> tuple[int, list[Record]]:
        """The version and every record, read in one transaction (a consistent pair)."""
        conn = self.db.conn
        conn.execute("BEGIN")
        try:
            version = self.version()
            rows = conn.execute(
                "SELECT name, type, value, ttl, override FROM records ORDER BY name, type, id").fetchall()
        finally:
            conn.execute("COMMIT")
        return version, [self._row_to_record(r) for r in rows]

    def list(self) -> list[Record]:
        """Every stored record, ordered by name then type."""
        return self.snapshot()[1]

    def add(self, record: Record, node_names: Iterable[str] = ()) -> None:
        """Store one record; `DuplicateRecord` if the same name, type and value exist, `ShadowsNode`
        if it would replace the addresses of a node (of this file's control database, or named in
        `node_names`) without `override`."""
        nodes = self.node_names() | set(node_names)
        with self._tx():
            self._insert(record, nodes)
            self._bump()

    def _insert(self, record: Record, nodes: set[str] | frozenset[str] = frozenset()) -> None:
        if record.name in nodes and record.rtype in SHADOWING_TYPES and not record.override:
            # Refused now rather than stored and then ignored by every resolver.
            raise ShadowsNode(f"{record.name} is the name of a node; a {record.rtype} record there would shadow "
                              "its addresses: add it with --override (override) to do that on purpose")
        # RFC 1034 3.6.2: a CNAME owner holds nothing else, so refuse either side of that clash.
        others = self.db.execute("SELECT type FROM records WHERE name = ?", [record.name]).fetchall()
        types = {t for (t,) in others}
        if record.rtype == "CNAME" and types - {"CNAME"} or record.rtype != "CNAME" and "CNAME" in types:
            raise CnameConflict(f"{record.name} cannot hold a CNAME beside other records")
        if record.rtype == "CNAME" and "CNAME" in types:
            raise CnameConflict(f"{record.name} already has a CNAME; a name holds at most one")
        self._check_rrset_size(record)
        try:
            self.db.execute(
                "INSERT INTO records(name, type, value, ttl, override) VALUES (?, ?, ?, ?, ?)",
                [record.name, record.rtype, record.value, record.ttl, int(record.override)])
        except sqlite3.IntegrityError:
            raise DuplicateRecord(f"{record.name} {record.rtype} {record.value} already exists") from None

    def _check_rrset_size(self, record: Record) -> None:
        # Record data never takes more octets than its presentation text plus 16 (an AAAA's 16 is
        # the most a short text grows): a cheap bound that spares parsing every stored record.
        count, text = self.db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(CAST(value AS BLOB))), 0) FROM records "
                                      "WHERE name = ? AND type = ?", [record.name, record.rtype]).fetchone()
        size = _REPLY_OVERHEAD + wire_size(record)
        if size + count * (_RECORD_OVERHEAD + 16) + text <= MAX_MESSAGE:
            return
        rows = self.db.execute("SELECT value, ttl FROM records WHERE name = ? AND type = ?",
                               [record.name, record.rtype]).fetchall()
        for value, ttl in rows:
            size += wire_size(parse_record(record.name + ".", record.rtype, value, ttl, self.domain))
        if size > MAX_MESSAGE:
            raise RRsetTooLarge(f"{record.name} {record.rtype}: the RRset would take {size} bytes, more than "
                                f"one DNS message holds ({MAX_MESSAGE}); no client could receive it")

    def set_served_view(self, path: str | None) -> None:
        """Remember which view file the server using this store loads (None: none), so that the
        records CLI can refuse records that would shadow its nodes. Not a records change: no bump."""
        with self._tx():
            self.db.execute("DELETE FROM meta WHERE key = 'served_view'")
            if path:
                self.db.execute("INSERT INTO meta(key, value) VALUES ('served_view', ?)", [path])

    def served_view(self) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'served_view'").fetchone()
        return str(row[0]) if row and row[0] else None

    def node_names(self) -> set[str]:
        """The names of the nodes of a control database that shares this file (its `nodes` table and
        the domain in `control_meta`, read only), as FQDNs; empty for a standalone records store.

        magicdns knows no meshes, but `records add` at a node's name must know the name is taken.
        """
        tables = set(self.db.table_names())
        if "nodes" not in tables:
            return set()
        domain = self.domain
        if "control_meta" in tables:
            row = self.db.execute("SELECT value FROM control_meta WHERE key = 'domain'").fetchone()
            domain = row[0] if row and row[0] else domain
        return {f"{name}.{domain}" for (name,) in self.db.execute("SELECT name FROM nodes")}

    def remove(self, name: str, rtype: str | None = None, value: str | None = None) -> int:
        """Delete matching records (all types of a name, one type, or one value); returns how many.

        Arguments are as the user typed them and are normalised exactly as `add` normalises them.
        """
        try:
            owner = absolute_owner(name, self.domain)
        except NameError_ as exc:
            raise RecordError(f"name: {exc}") from None
        sql, args = "DELETE FROM records WHERE name = ?", [owner]
        if rtype is not None:
            rtype = rtype.upper()
            if rtype not in SUPPORTED_TYPES:
                raise RecordError(f"type {rtype!r} is not supported")
            sql += " AND type = ?"
            args.append(rtype)
            if value is not None:
                sql += " AND value = ?"
                args.append(parse_record(owner + ".", rtype, value, None, self.domain).value)
        elif value is not None:
            raise RecordError("a value can only be given together with a type")
        with self._tx():
            count = self.db.execute(sql, args).rowcount
            if count == 0:
                raise RecordNotFound(" ".join(["no record matches", owner, rtype or "", value or ""]).strip())
            self._bump()
        return count

    def import_records(self, records: Iterable[Record], replace: bool = False,
                       node_names: Iterable[str] = ()) -> int:
        """Add many records at once, atomically; `replace` first deletes every stored record.

        Duplicates of stored records are skipped (an import can be repeated); returns how many were
        added. Any record `add` would refuse refuses the whole import.
        """
        added = 0
        nodes = self.node_names() | set(node_names)
        with self._tx():
            if replace:
                self.db.execute("DELETE FROM records")
            for record in records:
                try:
                    self._insert(record, nodes)
                    added += 1
                except DuplicateRecord:
                    continue  # already stored: importing the same file twice is harmless
            self._bump()
        return added

    def close(self) -> None:
        self.db.conn.close()
