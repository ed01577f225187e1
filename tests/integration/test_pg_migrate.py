"""`meshnode control migrate`: a SQLite tailnet copied into PostgreSQL with nothing lost (both stores
compared in full), again after a kill -9 mid-copy, and refused into a database holding another tailnet."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from magicdns.records import parse_record
from meshnode.control import migrate
from meshnode.control.store import ControlStore, Grant, Registration

REPO = Path(__file__).resolve().parents[2]


def _allow(user, key_tags, reg, existing):
    return Grant(tuple(key_tags), (), False)


def _populate(path: str, nodes: int = 40) -> None:
    s = ControlStore(path)
    s.set_domain("corp.example")
    key, _ = s.create_authkey("alice", reusable=True, tags=["tag:server"])
    eph, _ = s.create_authkey("bob", reusable=True, ephemeral=True)
    for i in range(nodes):
        s.register(Registration(f"mk{i}", f"nk{i}", f"host{i % 7}", "linux", key if i % 3 else eph,
                                advertise_routes=("10.0.0.0/24",) if i == 1 else (),
                                endpoints=(f"192.0.2.{i}:41641",)), _allow)
    s.approve_routes(s.list_nodes()[1].name, ["10.0.0.0/24"])
    s.rename_node(s.list_nodes()[0].name, "gateway")
    s.delete_node(s.list_nodes()[2].name)
    s.set_nameservers(["1.1.1.1", "127.0.0.1:5301"])
    s.add_route("internal.example", [])
    s.set_policy_text('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}', lambda t, n: None)
    s.records.add(parse_record("grafana", "CNAME", "gateway", 60, "corp.example"))
    s.records.add(parse_record("txt", "TXT", "héllo 'quoted' 100%", 30, "corp.example"))
    s.save_replay_mark("mk1", 1234.5)
    s.create_session("h" * 64, "alice", "csrf", 10.0)
    s.server_private_key()
    s.ensure_admin_token()
    s.close()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshnode.cli", "control", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


def test_sqlite_to_postgres_copies_everything_and_serves_on(tmp_path: Path, pg_url: str) -> None:
    src = str(tmp_path / "c.db")
    _populate(src)
    res = _cli("migrate", "--from", src, "--to", pg_url, "--batch", "7")
    assert res.returncode == 0, res.stderr
    assert "nodes: 7/39 rows" in res.stderr and "nodes: 39/39 rows" in res.stderr   # progress as it goes
    a, b = ControlStore(src), ControlStore(pg_url)
    assert migrate.compare(a, b, ignore=lambda t, k: t == "control_meta" and k == ("migration_source",)) == []
    assert b.verify_audit().ok and b.records.list() == a.records.list()
    assert [n.addresses for n in b.list_nodes()] == [n.addresses for n in a.list_nodes()]
    # The copy is a working store: new ids continue after the copied ones, names stay unique.
    key, _ = b.create_authkey("carol")
    n = b.register(Registration("mk-new", "nk-new", "gateway", "linux", key), _allow)
    assert n.name == "gateway-1" and n.id > max(x.id for x in a.list_nodes())
    assert b.verify_audit().ok
    a.close()
    b.close()


def test_interrupted_copy_completes_when_run_again(tmp_path: Path, pg_url: str) -> None:
    src = str(tmp_path / "c.db")
    _populate(src, nodes=120)
    proc = subprocess.Popen([sys.executable, "-m", "meshnode.cli", "control", "migrate", "--from", src,
                             "--to", pg_url, "--batch", "1"], stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        for line in proc.stderr:
            if line.startswith("nodes: 30/"):
                proc.kill()   # SIGKILL half-way through the nodes
                break
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -9
    half = ControlStore(pg_url)
    assert 0 < len(half.list_nodes()) < 119
    half.close()
    res = _cli("migrate", "--from", src, "--to", pg_url)
    assert res.returncode == 0, res.stderr
    res = _cli("migrate", "--from", src, "--to", pg_url)   # and once more: nothing changes
    assert res.returncode == 0, res.stderr
    a, b = ControlStore(src), ControlStore(pg_url)
    assert migrate.compare(a, b, ignore=lambda t, k: t == "control_meta" and k == ("migration_source",)) == []
    a.close()
    b.close()


def test_destination_with_another_tailnet_is_refused(tmp_path: Path, pg_url: str) -> None:
    src = str(tmp_path / "c.db")
    _populate(src, nodes=3)
    other = ControlStore(pg_url)
    other.create_user("mallory")
    other.close()
    res = _cli("migrate", "--from", src, "--to", pg_url)
    assert res.returncode == 1 and "already holds a tailnet" in res.stderr
    s = ControlStore(pg_url)
    assert [u.name for u in s.list_users()] == ["mallory"]   # nothing merged into it
    s.close()


def test_postgres_back_to_sqlite(tmp_path: Path, pg_url: str) -> None:
    _populate(pg_url, nodes=10)
    dst = str(tmp_path / "back.db")
    res = _cli("migrate", "--from", pg_url, "--to", dst)
    assert res.returncode == 0, res.stderr
    a, b = ControlStore(pg_url), ControlStore(dst)
    assert migrate.compare(a, b, ignore=lambda t, k: t == "control_meta" and k == ("migration_source",)) == []
    a.close()
    b.close()


def test_unreachable_source_is_a_clear_error(tmp_path: Path) -> None:
    res = _cli("migrate", "--from", str(tmp_path / "none.db"), "--to", "postgresql://u:secret@127.0.0.1:1/x")
    assert res.returncode == 2 and "no such database file" in res.stderr
    src = str(tmp_path / "c.db")
    _populate(src, nodes=3)
    res = _cli("migrate", "--from", src, "--to", "postgresql://u:secret@127.0.0.1:1/x")
    assert res.returncode == 1 and "cannot connect" in res.stderr and "secret" not in res.stderr
