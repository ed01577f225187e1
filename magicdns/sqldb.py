"""The SQL database behind a store: a SQLite file, or PostgreSQL at a `postgres://` URL.

The stores are written once, in SQLite's dialect, against the small part of the sqlite3 and
sqlite-utils APIs they use (`conn.execute`, `executemany`, `lastrowid`, `in_transaction`,
`db[table].create/create_index/add_column`, `db.table_names()`). `PgDatabase` offers the same
surface over psycopg 3 and translates the dialect, so the schema, the migrations and every store
method exist once for both backends:

- `?` placeholders become `%s`; `offset`, `user` and `end` (reserved words in PostgreSQL) are quoted.
- `BEGIN IMMEDIATE` (SQLite's "take the write lock now") becomes BEGIN plus a transaction-scoped
  advisory lock: writers of one database are serialised exactly as SQLite serialises them, across
  every process and replica, and the lock goes with COMMIT or ROLLBACK (or a dead connection).
  A plain `BEGIN` (a consistent read) becomes a REPEATABLE READ transaction.
- `INSERT OR IGNORE` becomes `ON CONFLICT DO NOTHING`; two-argument `MAX(a, b)` becomes GREATEST.
- An INSERT into a table with a serial `id` returns it (`lastrowid`). Inside a transaction a plain
  INSERT runs under a savepoint, so a constraint violation the store catches (a duplicate record)
  leaves the transaction usable, as it does in SQLite (upserts and the append-only logs need none).
- psycopg's errors are raised as subclasses of sqlite3's, so the stores' `except` clauses hold.
"""

from __future__ import annotations

import functools
import re
import sqlite3
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

WRITE_LOCK = 0x6D65736800000001
# Logs whose keys the writer assigns under the write lock: a constraint violation there is a bug that
# must fail the whole transaction, so their INSERTs skip the savepoint (two round trips each).
APPEND_ONLY = frozenset({"audit", "audit_pending", "changes"})   # pg_advisory_xact_lock key of the one writer lock ("mesh" ...)


def is_postgres(spec: object) -> bool:
    """Whether a `--db` value names a PostgreSQL database rather than a SQLite file."""
    return isinstance(spec, str) and spec.startswith(("postgres://", "postgresql://"))


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


class PgIntegrityError(sqlite3.IntegrityError):
    """A constraint violation reported by PostgreSQL."""


class PgOperationalError(sqlite3.OperationalError):
    """PostgreSQL could not be reached or refused the operation."""


class PgDatabaseError(sqlite3.DatabaseError):
    """Any other error PostgreSQL reported."""


_TYPES = {int: "BIGINT", str: "TEXT", float: "DOUBLE PRECISION", bytes: "BYTEA", bool: "BIGINT"}
# Column names that are reserved words in PostgreSQL. Lowercase only: the stores write SQL keywords
# in capitals (CASE ... END), column names in lower case.
_RESERVED = re.compile(r"(?<![\"\w])(offset|user|end)(?![\"\w])")
_PLACEHOLDER_OR_STRING = re.compile(r"'(?:[^']|'')*'|\?|%")
_INSERT_TABLE = re.compile(r"^\s*INSERT\s+INTO\s+(\w+)", re.I)


def _sub_outside_strings(sql: str, pattern: re.Pattern, repl: str) -> str:
    parts = re.split(r"('(?:[^']|'')*')", sql)
    return "".join(p if i % 2 else pattern.sub(repl, p) for i, p in enumerate(parts))


@functools.lru_cache(maxsize=4096)
def translate(sql: str) -> str:
    """SQLite-dialect SQL as the stores write it -> PostgreSQL (placeholders in psycopg's style)."""
    s = sql
    if re.match(r"\s*INSERT\s+OR\s+IGNORE\s+INTO", s, re.I):
        s = re.sub(r"INSERT\s+OR\s+IGNORE\s+INTO", "INSERT INTO", s, count=1, flags=re.I) + " ON CONFLICT DO NOTHING"
    s = re.sub(r"\bMAX\(([\w.]+),\s*([\w.]+)\)", r"GREATEST(\1, \2)", s)
    s = re.sub(r"LENGTH\(CAST\((\w+) AS BLOB\)\)", r"OCTET_LENGTH(\1)", s)
    s = _sub_outside_strings(s, _RESERVED, r'"\1"')
    s = _PLACEHOLDER_OR_STRING.sub(lambda m: "%s" if m.group() == "?" else "%%" if m.group() == "%"
                                   else m.group().replace("%", "%%"), s)
    return s


class PgCursor:
    """What a sqlite3 cursor offers the stores: rows, `rowcount`, `lastrowid`."""

    def __init__(self, cur: Any, lastrowid: int | None = None) -> None:
        self._cur, self.lastrowid = cur, lastrowid
        self.rowcount = cur.rowcount

    def fetchone(self) -> tuple | None:
        return self._cur.fetchone() if self._cur.description else None

    def fetchall(self) -> list[tuple]:
        return self._cur.fetchall() if self._cur.description else []

    def __iter__(self) -> Iterator[tuple]:
        return iter(self.fetchall())


class _NoRows:
    rowcount = -1
    description = None


def _params(params: Sequence[Any] | None) -> tuple:
    # SQLite stores booleans as integers; PostgreSQL would refuse a boolean for a BIGINT column.
    return tuple(int(p) if isinstance(p, bool) else p for p in (params or ()))


class PgConnection:
    """A psycopg connection in autocommit mode, driven by the stores' explicit BEGIN/COMMIT."""

    def __init__(self, url: str) -> None:
        import psycopg   # imported here: SQLite users need not have it installed
        self._psycopg = psycopg
        try:
            self.raw = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise PgOperationalError(f"cannot connect: {exc}".strip()) from None
        self.url = url
        self._serial: set[str] | None = None
        self._in_tx = False

    @property
    def in_transaction(self) -> bool:
        return self._in_tx

    def _reconnect_if_broken(self) -> bool:
        """A connection lost between transactions (server restart, failover, pg_terminate_backend) is
        opened again; one lost inside a transaction fails that transaction, as it must."""
        if not (self.raw.broken or self.raw.closed) or self._in_tx:
            return False
        try:
            self.raw = self._psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        except self._psycopg.Error as exc:
            raise PgOperationalError(f"cannot connect: {exc}".strip()) from None
        return True

    def serial_tables(self) -> set[str]:
        if self._serial is None:
            rows = self.raw.execute("SELECT table_name FROM information_schema.columns WHERE column_name = 'id'"
                                    " AND column_default LIKE 'nextval%%' AND table_schema = current_schema()",
                                    ()).fetchall()
            self._serial = {r[0] for r in rows}
        return self._serial

    def forget_schema(self) -> None:
        self._serial = None

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> PgCursor:
        self._reconnect_if_broken()
        try:
            return self._execute(sql, params)
        except PgOperationalError:
            # Broken while idle and discovered by this statement (a read or a BEGIN: nothing was
            # done yet): once more on a new connection.
            if self._in_tx and not sql.lstrip()[:5].upper() == "BEGIN" or not self.raw.broken:
                raise
            self._in_tx = False
            self._reconnect_if_broken()
            return self._execute(sql, params)

    def _execute(self, sql: str, params: Sequence[Any] | None = None) -> PgCursor:
        head = sql.lstrip()[:16].upper()
        try:
            if head.startswith("BEGIN"):
                self._in_tx = True
                if "IMMEDIATE" in head:
                    # One round trip (a simple query may hold several statements): every round trip
                    # before the lock is taken is latency, and every one after it serialises writers.
                    self.raw.execute(f"BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK})")
                else:
                    self.raw.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
                return PgCursor(self.raw.cursor())
            if head.startswith(("COMMIT", "ROLLBACK")):
                self._in_tx = False
                if head.startswith("ROLLBACK") and (self.raw.broken or self.raw.closed):
                    return PgCursor(_NoRows())   # the server ended the transaction already
                self.raw.execute(head.split()[0])
                return PgCursor(self.raw.cursor())
            text = translate(sql)
            m = _INSERT_TABLE.match(sql)
            # The id for `lastrowid`, unless the caller asked for its own RETURNING (its rows are its).
            want_id = bool(m and m.group(1) in self.serial_tables() and "RETURNING" not in sql.upper())
            if want_id:
                text += " RETURNING id"
            if m and self.in_transaction and "ON CONFLICT" not in text.upper() and m.group(1) not in APPEND_ONLY:
                return self._guarded(text, _params(params), want_id)
            cur = self.raw.execute(text, _params(params))
            return PgCursor(cur, self._id(cur) if want_id else None)
        except self._psycopg.Error as exc:
            raise self._error(exc) from None

    def _guarded(self, text: str, params: tuple, returning: bool) -> PgCursor:
        # A failed statement would abort the whole PostgreSQL transaction; SQLite keeps it usable.
        self.raw.execute("SAVEPOINT sqldb_stmt")
        try:
            cur = self.raw.execute(text, params)
        except self._psycopg.Error:
            self.raw.execute("ROLLBACK TO SAVEPOINT sqldb_stmt")
            raise
        self.raw.execute("RELEASE SAVEPOINT sqldb_stmt")
        return PgCursor(cur, self._id(cur) if returning else None)

    @staticmethod
    def _id(cur: Any) -> int | None:
        row = cur.fetchone()
        return int(row[0]) if row else None

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> PgCursor:
        try:
            cur = self.raw.cursor()
            cur.executemany(translate(sql), [_params(r) for r in rows])
            return PgCursor(cur)
        except self._psycopg.Error as exc:
            raise self._error(exc) from None

    def write_batch(self, steps: Sequence[tuple[str, Sequence[Sequence[Any]]]], commit: bool = False) -> None:
        """Writes whose results nobody reads (each `executemany`), then COMMIT if asked, sent as one
        pipeline: one round trip for a transaction's whole tail instead of one per statement. An error
        in any of them is raised here and the rest are not run (the caller rolls back)."""
        try:
            with self.raw.pipeline():
                cur = self.raw.cursor()
                for sql, rows in steps:
                    cur.executemany(translate(sql), [_params(r) for r in rows])
                if commit:
                    self.raw.execute("COMMIT")
        except self._psycopg.Error as exc:
            raise self._error(exc) from None
        if commit:
            self._in_tx = False

    def _error(self, exc: Exception) -> sqlite3.Error:
        if isinstance(exc, self._psycopg.IntegrityError):
            return PgIntegrityError(str(exc))
        if isinstance(exc, self._psycopg.OperationalError):
            return PgOperationalError(str(exc))
        return PgDatabaseError(str(exc))

    def close(self) -> None:
        self.raw.close()


@dataclass
class PgTable:
    """sqlite-utils' table DDL calls, written as PostgreSQL DDL with one type map."""

    db: "PgDatabase"
    name: str

    def create(self, columns: dict[str, type], pk: str | tuple[str, ...] | None = None, not_null: Iterable[str] = (),
               foreign_keys: Iterable[tuple[str, str, str]] = (), defaults: dict[str, Any] | None = None,
               if_not_exists: bool = False) -> "PgTable":
        not_null, defaults = set(not_null), defaults or {}
        fks = {col: (table, other) for col, table, other in foreign_keys}
        cols = []
        for col, typ in columns.items():
            if col == pk and typ is int:
                text = f'"{col}" BIGSERIAL PRIMARY KEY'
            else:
                text = f'"{col}" {_TYPES[typ]}' + (" PRIMARY KEY" if col == pk else "")
            if col in not_null and col != pk:
                text += " NOT NULL"
            if col in defaults:
                text += f" DEFAULT {_literal(defaults[col])}"
            if col in fks:
                text += f' REFERENCES "{fks[col][0]}"("{fks[col][1]}")'
            cols.append(text)
        if isinstance(pk, (tuple, list)):   # a composite key: a table constraint
            cols.append("PRIMARY KEY (" + ", ".join(f'"{c}"' for c in pk) + ")")
        exists = " IF NOT EXISTS" if if_not_exists else ""
        self.db.conn.raw.execute(f'CREATE TABLE{exists} "{self.name}" ({", ".join(cols)})')
        self.db.conn.forget_schema()
        return self

    def create_index(self, columns: Sequence[str], unique: bool = False, index_name: str | None = None,
                     if_not_exists: bool = False) -> "PgTable":
        name = index_name or f"idx_{self.name}_{'_'.join(columns)}"
        cols = ", ".join(f'"{c}"' for c in columns)
        self.db.conn.raw.execute(f'CREATE {"UNIQUE " if unique else ""}INDEX'
                                 f'{" IF NOT EXISTS" if if_not_exists else ""} "{name}" ON "{self.name}" ({cols})')
        return self

    def add_column(self, name: str, typ: type = str, not_null_default: Any = None) -> "PgTable":
        extra = f" NOT NULL DEFAULT {_literal(not_null_default)}" if not_null_default is not None else ""
        self.db.conn.raw.execute(f'ALTER TABLE "{self.name}" ADD COLUMN "{name}" {_TYPES[typ]}{extra}')
        return self

    @property
    def pks(self) -> list[str]:
        rows = self.db.conn.raw.execute(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
            " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s::regclass AND i.indisprimary"
            " ORDER BY array_position(i.indkey, a.attnum)", (f'"{self.name}"',)).fetchall()
        return [r[0] for r in rows]

    @property
    def columns_dict(self) -> dict[str, str]:
        rows = self.db.conn.raw.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = %s"
            " AND table_schema = current_schema() ORDER BY ordinal_position", (self.name,)).fetchall()
        return {r[0]: r[1] for r in rows}


def _literal(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


class PgDatabase:
    """The sqlite-utils `Database` surface the stores use, over PostgreSQL."""

    dialect = "postgres"

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn = PgConnection(url)

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> PgCursor:
        return self.conn.execute(sql, params)

    def table_names(self) -> list[str]:
        rows = self.conn.raw.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
                                     " ORDER BY tablename", ()).fetchall()
        return [r[0] for r in rows]

    def __getitem__(self, name: str) -> PgTable:
        return PgTable(self, name)

    def close(self) -> None:
        self.conn.close()


def dialect(db: Any) -> str:
    """'postgres' or 'sqlite' for a store's database object."""
    return getattr(db, "dialect", "sqlite")
