"""magicdns.sqldb: the SQLite-dialect -> PostgreSQL translation (pure), and URL handling."""

from __future__ import annotations

import pytest

from magicdns.sqldb import is_postgres, redact, translate


@pytest.mark.parametrize("sqlite, postgres", [
    ("SELECT id FROM nodes WHERE name = ?", "SELECT id FROM nodes WHERE name = %s"),
    # a ? or % inside a string literal is data, not a placeholder; % must still be doubled for psycopg
    ("SELECT '?', '100%' FROM t WHERE a = ?", "SELECT '?', '100%%' FROM t WHERE a = %s"),
    ("SELECT 'it''s ?' WHERE b LIKE 'x%' AND c = ?", "SELECT 'it''s ?' WHERE b LIKE 'x%%' AND c = %s"),
    # reserved words of PostgreSQL used as column names are quoted, also qualified; not inside strings
    ("SELECT n.offset FROM nodes n WHERE offset = ?", 'SELECT n."offset" FROM nodes n WHERE "offset" = %s'),
    ("UPDATE r SET state = 'user', user = ? WHERE user_id = ?",
     "UPDATE r SET state = 'user', \"user\" = %s WHERE user_id = %s"),
    ("INSERT OR IGNORE INTO meta(key, value) VALUES (?, 0)",
     "INSERT INTO meta(key, value) VALUES (%s, 0) ON CONFLICT DO NOTHING"),
    ("INSERT INTO m(k, ts) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET ts = MAX(m.ts, excluded.ts)",
     "INSERT INTO m(k, ts) VALUES (%s, %s) ON CONFLICT(k) DO UPDATE SET ts = GREATEST(m.ts, excluded.ts)"),
    ("SELECT MAX(offset) FROM leases", 'SELECT MAX("offset") FROM leases'),   # one-argument MAX stays
    ("SELECT COALESCE(SUM(LENGTH(CAST(value AS BLOB))), 0) FROM records",
     "SELECT COALESCE(SUM(OCTET_LENGTH(value)), 0) FROM records"),
])
def test_translation(sqlite: str, postgres: str) -> None:
    assert translate(sqlite) == postgres


def test_urls() -> None:
    assert is_postgres("postgres://u@h/db") and is_postgres("postgresql://u@/db?host=/run")
    assert not is_postgres("/var/lib/meshnode/control.db") and not is_postgres("postgres.db")
    assert redact("postgresql://mesh:s3cret@db:5432/x") == "postgresql://mesh:***@db:5432/x"
    assert redact("postgresql://mesh@db/x") == "postgresql://mesh@db/x"


def test_end_as_a_column_but_not_as_a_keyword() -> None:
    assert translate("DELETE FROM flow_logs WHERE end < ?") == 'DELETE FROM flow_logs WHERE "end" < %s'
    assert translate("SELECT CASE WHEN a THEN 1 END FROM t") == "SELECT CASE WHEN a THEN 1 END FROM t"
