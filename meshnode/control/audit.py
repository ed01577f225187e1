"""The audit log: every configuration change, hash-chained, written in the change's own transaction.

API (the control store, the admin CLI, the server and the admin console use only this):

    record(conn, actor, action, target, old=None, new=None, now=None) -> Entry
        Append one entry (`Chain` appends several and writes them together at the end). Call it INSIDE the transaction that makes the change (after BEGIN, before
        COMMIT), so a change that rolls back leaves no entry and a committed change always has one.
        `actor` says who: "admin-token", "user:alice@example.com", "node:laptop", "cli:root@host"
        (see `cli_actor()`), or "system" (expiry, ephemeral clean-up, retention). `action` is a dotted
        verb ("node.rename"), `target` what it acted on ("node:laptop", "authkey:abcd", "policy").
        `old` and `new` are JSON values (None when there is nothing before or after).
    entries(conn, since=None, actor=None, target=None, limit=None) -> list[Entry]
    verify(conn) -> Verification          (ok, how many entries, the first problem found)
    prune(conn, now, retention_seconds, actor="system") -> int
        Inside a transaction: delete the oldest entries older than the retention, from the start of
        the chain only, and record that it did (the "audit.prune" entry names the anchor).

Chain: each entry carries `prev_hash`, the hash of the entry before it, and its own `hash`, SHA-256
over the canonical encoding of (id, time, actor, action, target, old, new, prev_hash): a JSON array
with sorted keys, no whitespace, UTF-8; `old`/`new` are hashed as the canonical text stored. The
first entry ever follows GENESIS. After pruning, verification anchors on the first remaining entry's
stored `prev_hash`, which must be GENESIS or the anchor a remaining "audit.prune" entry recorded, so
deleting the oldest entries by hand is detected too. The newest hash is also kept in `control_meta`
(`audit_head`), so dropping the newest entries is detected. Editing any field breaks its hash;
deleting an entry in the middle breaks the next entry's link.

Sans-I/O apart from the SQLite connection it is handed; time is passed in (or read once per entry).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import socket
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64
DEFAULT_RETENTION_DAYS = 90.0
_HEAD_KEY = "audit_head"


@dataclass(frozen=True, slots=True)
class Entry:
    """One audit entry as stored (`old`/`new` decoded from their canonical JSON text)."""

    id: int
    time: float
    actor: str
    action: str
    target: str
    old: Any
    new: Any
    prev_hash: str
    hash: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "time": self.time, "actor": self.actor, "action": self.action,
                "target": self.target, "old": self.old, "new": self.new, "prev_hash": self.prev_hash,
                "hash": self.hash}


@dataclass(frozen=True, slots=True)
class Verification:
    ok: bool
    entries: int
    problem: str | None = None      # the first break found, naming the entry
    first_id: int | None = None
    last_id: int | None = None
    head: str | None = None         # the newest entry's hash (record it elsewhere to pin the log)


def canonical(value: Any) -> str | None:
    """The canonical JSON text of a value (None stays None): sorted keys, no spaces, UTF-8."""
    if value is None:
        return None
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def entry_hash(entry_id: int, when: float, actor: str, action: str, target: str, old_text: str | None,
               new_text: str | None, prev_hash: str) -> str:
    """SHA-256 (hex) over the canonical encoding of one entry's fields and its predecessor's hash."""
    doc = [entry_id, repr(float(when)), actor, action, target, old_text, new_text, prev_hash]
    return hashlib.sha256(json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


def cli_actor() -> str:
    """The admin CLI's actor: the local user and host that ran the command."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "uid" + str(__import__("os").getuid())
    return f"cli:{user}@{socket.gethostname()}"


def _head(conn: sqlite3.Connection) -> tuple[int, str]:
    row = conn.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
    return (int(row[0]), str(row[1])) if row else (0, GENESIS)


def record(conn: sqlite3.Connection, actor: str, action: str, target: str, old: Any = None, new: Any = None,
           now: float | None = None) -> Entry:
    """Append one entry; must run inside the transaction making the change (see the module doc)."""
    chain = Chain(conn)
    entry = chain.append(actor, action, target, old, new, now)
    for sql, rows in chain.statements():
        conn.executemany(sql, rows)
    return entry


_INSERT = ("INSERT INTO audit(id, time, actor, action, target, old, new, prev_hash, hash)"
           " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
_SET_HEAD = "INSERT INTO control_meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value"


class Chain:
    """The entries one transaction appends: the head is read once (under the writer's lock, at the
    first entry), hashes are chained in memory, and `statements()` gives the rows to write in one go
    (one INSERT batch and one head update) just before COMMIT, instead of three statements per entry."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._head: tuple[int, str] | None = None
        self._rows: list[tuple] = []

    def prime(self, head: str | None) -> None:
        """Start from the head recorded in `control_meta` ("id:hash"), read by the caller in a statement
        it makes anyway under the writer lock, instead of reading the newest entry; nothing usable
        (no head recorded yet) leaves the chain to read it."""
        if head and not self._rows:
            entry_id, _, digest = head.partition(":")
            if entry_id.isdigit() and len(digest) == 64:
                self._head = (int(entry_id), digest)

    def append(self, actor: str, action: str, target: str, old: Any = None, new: Any = None,
               now: float | None = None) -> Entry:
        if not self.conn.in_transaction:
            raise RuntimeError("audit.record must run inside the transaction that makes the change")
        when = time.time() if now is None else float(now)
        last_id, prev = self._head if self._head is not None else _head(self.conn)
        entry_id = last_id + 1
        old_text, new_text = canonical(old), canonical(new)
        digest = entry_hash(entry_id, when, actor, action, target, old_text, new_text, prev)
        self._rows.append((entry_id, when, actor, action, target, old_text, new_text, prev, digest))
        self._head = (entry_id, digest)
        return Entry(entry_id, when, actor, action, target, old, new, prev, digest)

    def statements(self) -> list[tuple[str, list[tuple]]]:
        """(sql, rows) to execute with `executemany`, in order; empties the chain's buffer."""
        if not self._rows:
            return []
        rows, self._rows = self._rows, []
        last_id, digest = self._head  # type: ignore[misc]
        return [(_INSERT, rows), (_SET_HEAD, [(_HEAD_KEY, f"{last_id}:{digest}")])]


_COLS = "id, time, actor, action, target, old, new, prev_hash, hash"


def _entry(row: tuple) -> Entry:
    return Entry(int(row[0]), float(row[1]), row[2], row[3], row[4],
                 json.loads(row[5]) if row[5] is not None else None,
                 json.loads(row[6]) if row[6] is not None else None, row[7], row[8])


def entries(conn: sqlite3.Connection, since: float | None = None, actor: str | None = None,
            target: str | None = None, limit: int | None = None) -> list[Entry]:
    """Entries oldest first; `actor`/`target` match exactly or as a prefix ending in ':' or '*'
    ("node:" or "node:web*")."""
    where, args = [], []
    if since is not None:
        where.append("time >= ?")
        args.append(since)
    for column, value in (("actor", actor), ("target", target)):
        if value:
            if value.endswith("*") or value.endswith(":"):
                where.append(f"{column} LIKE ? ESCAPE '\\'")
                args.append(value.rstrip("*").replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
            else:
                where.append(f"{column} = ?")
                args.append(value)
    sql = f"SELECT {_COLS} FROM audit" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
    if limit is not None:
        sql = f"SELECT * FROM ({sql} DESC LIMIT {int(limit)}) ORDER BY id"
    return [_entry(r) for r in conn.execute(sql, args)]


def verify(conn: sqlite3.Connection) -> Verification:
    """Check every entry's hash and link, the anchor of the first one and the recorded head."""
    rows = conn.execute(f"SELECT {_COLS} FROM audit ORDER BY id").fetchall()
    head_row = conn.execute("SELECT value FROM control_meta WHERE key = ?", [_HEAD_KEY]).fetchone()
    if not rows:
        if head_row is not None:
            return Verification(False, 0, f"the log is empty but its head says {head_row[0]}")
        return Verification(True, 0)
    anchors = {GENESIS}
    prev_hash: str | None = None
    prev_id: int | None = None
    for row in rows:
        entry_id, when, actor, action, target, old_text, new_text, stored_prev, stored_hash = row
        if prev_hash is None:
            first_prev = stored_prev
        elif stored_prev != prev_hash:
            return Verification(False, len(rows), f"entry {entry_id} does not follow entry {prev_id}"
                                " (an entry was removed or edited)", rows[0][0], rows[-1][0])
        elif entry_id != prev_id + 1:  # type: ignore[operator]
            return Verification(False, len(rows), f"entries {prev_id + 1}..{entry_id - 1} are missing",  # type: ignore[operator]
                                rows[0][0], rows[-1][0])
        try:
            digest = entry_hash(int(entry_id), float(when), actor, action, target, old_text, new_text, stored_prev)
        except (TypeError, ValueError):
            digest = ""
        if digest != stored_hash:
            return Verification(False, len(rows), f"entry {entry_id} was altered (its hash does not match)",
                                rows[0][0], rows[-1][0])
        if action == "audit.prune" and new_text is not None:
            try:
                anchors.add(str(json.loads(new_text)["anchor"]))
            except (ValueError, KeyError, TypeError):
                pass
        prev_hash, prev_id = stored_hash, entry_id
    if first_prev not in anchors:
        return Verification(False, len(rows), f"the oldest entry ({rows[0][0]}) follows an entry that no"
                            " recorded pruning removed (entries were deleted from the start)",
                            rows[0][0], rows[-1][0])
    if head_row is None or head_row[0] != f"{rows[-1][0]}:{rows[-1][8]}":
        return Verification(False, len(rows), f"the newest entry is {rows[-1][0]} but the recorded head is"
                            f" {head_row[0].split(':')[0] if head_row else 'missing'} (newest entries removed)",
                            rows[0][0], rows[-1][0])
    return Verification(True, len(rows), None, rows[0][0], rows[-1][0], rows[-1][8])


def prune(conn: sqlite3.Connection, now: float, retention_seconds: float, actor: str = "system") -> int:
    """Inside a transaction: remove the entries older than the retention from the start of the chain
    (stopping at the first newer one), then record that it did. Returns how many were removed."""
    if not conn.in_transaction:
        raise RuntimeError("audit.prune must run inside a transaction")
    cutoff = now - retention_seconds
    row = conn.execute("SELECT MIN(id) FROM audit WHERE time >= ?", [cutoff]).fetchone()
    last = conn.execute("SELECT MAX(id) FROM audit").fetchone()[0]
    if last is None:
        return 0
    upto = (row[0] - 1) if row[0] is not None else last
    victims = conn.execute("SELECT COUNT(*), MIN(id), MAX(id) FROM audit WHERE id <= ?", [upto]).fetchone()
    if not victims[0]:
        return 0
    anchor = conn.execute("SELECT hash FROM audit WHERE id = ?", [upto]).fetchone()[0]
    if upto == last:
        # Everything is old: the prune entry itself follows the last one removed, so keep the chain
        # intact by recording first, then deleting only what came before it.
        record(conn, actor, "audit.prune", "audit",
               new={"removed": victims[0], "first_id": victims[1], "last_id": victims[2], "anchor": anchor,
                    "retention_days": retention_seconds / 86400}, now=now)
        conn.execute("DELETE FROM audit WHERE id <= ?", [upto])
        return int(victims[0])
    conn.execute("DELETE FROM audit WHERE id <= ?", [upto])
    record(conn, actor, "audit.prune", "audit",
           new={"removed": victims[0], "first_id": victims[1], "last_id": victims[2], "anchor": anchor,
                "retention_days": retention_seconds / 86400}, now=now)
    return int(victims[0])
