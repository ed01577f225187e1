"""`meshnode control migrate`: copy a tailnet from one control database to another (SQLite file to
PostgreSQL, or back), with nothing lost, and safe to run again after an interruption.

Both ends are opened as `ControlStore`s first, so both are at the latest schema and the copy is
table for table, column for column. Rows go across in primary-key order, in batches, each batch one
write transaction on the destination that upserts by primary key: an interrupted run leaves whole
batches behind, and running again converges on the source. Rows the destination holds and the source
does not are deleted at the end (children before parents), then the two are compared in full.

The destination is marked with the source it is being filled from; a destination that holds another
tailnet is refused rather than merged. The source must not change while it is copied (stop its server).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from magicdns import sqldb

from .store import ControlStore, ControlStoreError

# Parents before children (foreign keys), records before the audit notes their triggers write; the
# version counter and the change log last, as the records' triggers bump them while `meta` is copied.
_ORDER = ("users", "user_roles", "authkeys", "nodes", "leases", "policy", "dns_settings",
          "replay_marks", "console_sessions", "register_requests", "records", "meta", "audit", "audit_pending")
_LAST = ("changes", "control_meta")
_MARK = "migration_source"


class MigrateError(ControlStoreError):
    """The copy cannot be made (the destination holds another tailnet, the copies differ, ...)."""


@dataclass(frozen=True, slots=True)
class Progress:
    table: str
    done: int
    total: int


@dataclass(frozen=True, slots=True)
class Difference:
    table: str
    key: tuple
    source: tuple | None
    destination: tuple | None


def tables(store: ControlStore) -> list[str]:
    """The tailnet's tables in copy order (tables added by later migrations after the known ones)."""
    names = [t for t in store.db.table_names() if not t.startswith("sqlite_")]
    last = [t for t in _LAST if t in names]
    return ([t for t in _ORDER if t in names] + sorted(t for t in names if t not in _ORDER + _LAST) + last)


def _columns(store: ControlStore, table: str) -> list[str]:
    return list(store.db[table].columns_dict)


def _pks(store: ControlStore, table: str) -> list[str]:
    pks = list(store.db[table].pks)
    return ["rowid"] if pks == ["rowid"] else pks


def _q(name: str) -> str:
    return f'"{name}"'


def rows(store: ControlStore, table: str, columns: list[str], order: list[str]) -> list[tuple]:
    cols = ", ".join(_q(c) for c in columns)
    keys = ", ".join(_q(c) for c in order)
    return store.conn.execute(f"SELECT {cols} FROM {_q(table)} ORDER BY {keys}").fetchall()


def _same(a: Any, b: Any) -> bool:
    """Equal as the stores read them: SQLite may hold a counter as an integer where PostgreSQL holds it
    as text (the records store's `meta`), and a float column may hold integral values as integers."""
    if a == b:
        return True
    try:
        return a is not None and b is not None and float(a) == float(b)
    except (TypeError, ValueError):
        return False


def content(store: ControlStore) -> dict[str, dict[tuple, tuple]]:
    """Every row of every table, by primary key: what "nothing lost" is checked against."""
    out: dict[str, dict[tuple, tuple]] = {}
    for table in tables(store):
        cols, pks = _columns(store, table), _pks(store, table)
        idx = [cols.index(k) for k in pks]
        out[table] = {tuple(r[i] for i in idx): tuple(r) for r in rows(store, table, cols, pks)}
    return out


def compare(src: ControlStore, dst: ControlStore, ignore: Callable[[str, tuple], bool] = lambda t, k: False
            ) -> list[Difference]:
    """Every row that differs between the two stores (empty: the copy is exact)."""
    a, b = content(src), content(dst)
    diffs = []
    for table in sorted(set(a) | set(b)):
        ra, rb = a.get(table, {}), b.get(table, {})
        for key in sorted(set(ra) | set(rb), key=repr):
            if ignore(table, key):
                continue
            x, y = ra.get(key), rb.get(key)
            if x is None or y is None or len(x) != len(y) or not all(_same(p, q) for p, q in zip(x, y)):
                diffs.append(Difference(table, key, x, y))
    return diffs


def _is_mark(table: str, key: tuple) -> bool:
    return table == "control_meta" and key == (_MARK,)


def _source_id(spec: str) -> str:
    return spec if sqldb.is_postgres(spec) else os.path.abspath(spec)


def _check_destination(dst: ControlStore, source_id: str) -> None:
    mark = dst._meta(_MARK)
    if mark == source_id:
        return   # a run that was interrupted: carry on
    has_data = any(dst.conn.execute(f"SELECT 1 FROM {t} LIMIT 1").fetchone() for t in ("users", "nodes", "records"))
    if has_data or mark is not None:
        raise MigrateError("the destination already holds a tailnet"
                           + (f" (copied from {sqldb.redact(mark)})" if mark else "")
                           + "; migrate into an empty database")
    with dst._tx(bump=False):
        dst._set_meta(_MARK, source_id)


def _upsert_sql(table: str, cols: list[str], pks: list[str]) -> str:
    names = ", ".join(_q(c) for c in cols)
    marks = ", ".join("?" for _ in cols)
    rest = [c for c in cols if c not in pks]
    action = ("DO UPDATE SET " + ", ".join(f"{_q(c)} = excluded.{_q(c)}" for c in rest)) if rest else "DO NOTHING"
    return f"INSERT INTO {_q(table)}({names}) VALUES ({marks}) ON CONFLICT({', '.join(_q(k) for k in pks)}) {action}"


def copy(src_spec: str, dst_spec: str, batch: int = 500) -> Iterator[Progress]:
    """Copy the tailnet at `src_spec` into `dst_spec`, yielding progress; raises `MigrateError` if
    the result differs from the source."""
    src, dst = ControlStore(src_spec), ControlStore(dst_spec)
    try:
        source_id = _source_id(src_spec)
        _check_destination(dst, source_id)
        order = tables(src)
        for table in order:
            cols, pks = _columns(src, table), _pks(src, table)
            if pks == ["rowid"]:
                raise MigrateError(f"table {table} has no primary key; cannot copy it safely")
            dcols = set(_columns(dst, table))
            missing = [c for c in cols if c not in dcols]
            if missing:
                raise MigrateError(f"the destination's {table} lacks {', '.join(missing)}: its schema differs")
            data = rows(src, table, cols, pks)
            sql = _upsert_sql(table, cols, pks)
            for start in range(0, len(data), batch):
                chunk = data[start:start + batch]
                with dst._tx(bump=False):
                    dst.conn.executemany(sql, [list(r) for r in chunk])
                yield Progress(table, start + len(chunk), len(data))
            if not data:
                yield Progress(table, 0, 0)
        # Rows only the destination holds (made by its own first start, or by record triggers while
        # copying): removed children first; then serial counters moved past the copied ids.
        want = content(src)
        with dst._tx(bump=False):
            for table in reversed(order):
                pks = _pks(dst, table)
                have = content_keys(dst, table, pks)
                for key in have - set(want[table]):
                    if _is_mark(table, key):
                        continue
                    cond = " AND ".join(f"{_q(k)} = ?" for k in pks)
                    dst.conn.execute(f"DELETE FROM {_q(table)} WHERE {cond}", list(key))
            if sqldb.dialect(dst.db) == "postgres":
                serial = dst.db.conn.serial_tables()
                for table in order:
                    if table in serial:
                        dst.conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                                         f" GREATEST((SELECT MAX(id) FROM {_q(table)}), 1))")
        diffs = compare(src, dst, ignore=_is_mark)
        if diffs:
            d = diffs[0]
            raise MigrateError(f"{len(diffs)} row(s) differ after the copy; first: {d.table} {d.key}:"
                               f" {d.source!r} != {d.destination!r}")
    finally:
        src.close()
        dst.close()


def content_keys(store: ControlStore, table: str, pks: list[str]) -> set[tuple]:
    keys = ", ".join(_q(k) for k in pks)
    return {tuple(r) for r in store.conn.execute(f"SELECT {keys} FROM {_q(table)}").fetchall()}
