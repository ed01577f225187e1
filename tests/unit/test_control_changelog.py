"""The versioned change log, on SQLite and on PostgreSQL: every write transaction makes exactly one new
tailnet version and says what it changed; a reader following it while several processes write never
skips a version and never sees one twice; a failed change leaves no trace; pruned history is a gap."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from magicdns.records import parse_record
from magicdns.store import RecordStore
from meshnode.control.store import ChangeLogGap, ControlStore, Grant, Registration

REPO = Path(__file__).resolve().parents[2]


def _allow(user, key_tags, reg, existing):
    return Grant(tuple(key_tags), (), False)


def test_each_write_is_one_version_with_what_it_changed(db_spec: str) -> None:
    s = ControlStore(db_spec)
    v0 = s.version()
    key, _ = s.create_authkey("alice")
    node = s.register(Registration("m1", "nk1", "laptop", "linux", key), _allow)
    s.rename_node(node.name, "desk")
    s.set_endpoints(node.id, ["192.0.2.1:41641"])
    other = RecordStore(db_spec)   # as `magicdns records --db` writes, knowing nothing of the log
    other.add(parse_record("wiki", "CNAME", "desk"))
    other.close()
    with pytest.raises(ValueError):   # refused inside the transaction: no version, no entry
        s.set_policy_text("{}", lambda t, n: (_ for _ in ()).throw(ValueError("tests failed")))
    changes = s.changes_since(v0)
    assert [c.version for c in changes] == list(range(v0 + 1, v0 + 6)) and s.version() == v0 + 5
    assert changes[0].items == (("user.create", "user:alice"), ("authkey.create", changes[0].items[1][1]))
    assert ("node.register", "node:laptop") in changes[1].items
    assert changes[2].items == (("node.rename", "node:desk"),)
    assert changes[3].items == (("node.endpoints", f"node-id:{node.id}"),)
    assert changes[4].items == (("dns.records", "records"),)
    assert s.changes_since(s.version()) == []
    assert [c.version for c in s.changes_since(v0 + 2, limit=2)] == [v0 + 3, v0 + 4]
    s.close()


def test_pruned_history_is_a_gap_not_silence(db_spec: str) -> None:
    s = ControlStore(db_spec)
    for i in range(5):
        s.create_user(f"u{i}")
    assert s.prune_changes(keep=2) == 3
    assert [c.version for c in s.changes_since(s.version() - 2)] == [s.version() - 1, s.version()]
    with pytest.raises(ChangeLogGap):
        s.changes_since(0)
    s.close()


_WRITER = textwrap.dedent("""
    import sys
    from meshnode.control.store import ControlStore
    s = ControlStore(sys.argv[1])
    for i in range(int(sys.argv[3])):
        s.create_user(f"{sys.argv[2]}-{i}")
""")


def test_a_reader_following_racing_writers_sees_every_version_once_in_order(db_spec: str) -> None:
    reader = ControlStore(db_spec)
    start = reader.version()
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, db_spec, f"w{n}", "40"], cwd=REPO)
               for n in range(3)]
    seen: list[int] = []
    deadline = time.monotonic() + 120
    try:
        while len(seen) < 120 and time.monotonic() < deadline:
            after = seen[-1] if seen else start
            seen.extend(c.version for c in reader.changes_since(after))
    finally:
        for w in writers:
            w.wait(timeout=60)
    assert all(w.returncode == 0 for w in writers)
    assert seen == list(range(start + 1, start + 121))
    assert len(reader.list_users()) == 120
    reader.close()
