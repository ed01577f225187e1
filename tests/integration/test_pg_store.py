"""The control store on PostgreSQL under what several processes do at once: replicas starting at the
same moment on an empty database (migrations), registrations racing on different connections (names
and addresses stay unique), and every admin command of `meshnode control` pointed at a postgres:// URL."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from meshnode.control.store import SCHEMA_VERSION, ControlStore
from tests.pg import PostgresServer

REPO = Path(__file__).resolve().parents[2]

_RACER = textwrap.dedent("""
    import os, sys, time
    from meshnode.control.store import ControlStore, Grant, Registration
    url, go, me = sys.argv[1], sys.argv[2], sys.argv[3]
    deadline = time.monotonic() + 30
    while not os.path.exists(go) and time.monotonic() < deadline:   # everyone starts together
        time.sleep(0.001)
    s = ControlStore(url)          # migrations race here on an empty database
    key, _ = s.create_authkey("alice", reusable=True)
    allow = lambda u, t, r, e: Grant((), (), False)
    for i in range(15):
        s.register(Registration(f"m{me}-{i}", f"nk{me}-{i}", "box", "linux", key), allow)
    print("done", flush=True)
""")


def test_racing_starts_and_registrations_keep_names_and_addresses_unique(tmp_path: Path, pg_url: str) -> None:
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, pg_url, str(go), str(n)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in range(4)]
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    s = ControlStore(pg_url)
    nodes = s.list_nodes()
    assert len(nodes) == 60
    assert len({n.name for n in nodes}) == 60 and len({n.addresses for n in nodes}) == 60
    assert s.schema_version() == SCHEMA_VERSION
    assert s.verify_audit().ok
    s.close()


def _meshnode(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshnode.cli", "control", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60, input=input)


def test_admin_commands_work_on_postgres(tmp_path: Path, pg_url: str) -> None:
    res = _meshnode("authkey", "create", "--db", pg_url, "--user", "alice", "--create-user", "--reusable")
    assert res.returncode == 0, res.stderr
    key = res.stdout.strip().split()[-1]
    s = ControlStore(pg_url)
    from meshnode.control.store import Grant, Registration
    s.register(Registration("m1", "nk1", "laptop", "linux", key), lambda u, t, r, e: Grant((), (), False))
    s.close()
    assert _meshnode("nodes", "rename", "--db", pg_url, "laptop", "desk").returncode == 0
    res = _meshnode("nodes", "ls", "--db", pg_url, "--json")
    assert res.returncode == 0, res.stderr
    assert [n["name"] for n in json.loads(res.stdout)] == ["desk"]
    policy = tmp_path / "policy.hujson"
    policy.write_text('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"]}]}')
    res = _meshnode("policy", "set", "--db", pg_url, str(policy))
    assert res.returncode == 0, res.stderr
    assert "*:22" in _meshnode("policy", "get", "--db", pg_url).stdout
    res = _meshnode("dns", "nameservers", "set", "--db", pg_url, "1.1.1.1")
    assert res.returncode == 0, res.stderr
    res = subprocess.run([sys.executable, "-m", "magicdns.cli", "records", "--db", pg_url, "add", "wiki", "CNAME",
                          "desk"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode == 0, res.stderr
    res = _meshnode("audit", "verify", "--db", pg_url)
    assert res.returncode == 0, res.stdout + res.stderr
    res = _meshnode("audit", "ls", "--db", pg_url, "--json")
    actions = [e["action"] for e in json.loads(res.stdout)]
    assert {"node.rename", "policy.set", "dns.record.add"} <= set(actions)


def test_unix_socket_url_and_unreachable_server(postgres: PostgresServer, pg_url: str) -> None:
    name = pg_url.rsplit("/", 1)[1]
    s = ControlStore(postgres.url(name, unix=True))
    s.create_user("alice")
    s.close()
    assert [u.name for u in ControlStore(pg_url).list_users()] == ["alice"]
    started = time.monotonic()
    res = _meshnode("nodes", "ls", "--db", "postgresql://admin:hunter2@127.0.0.1:1/none")
    assert res.returncode == 1 and "cannot connect" in res.stderr and "hunter2" not in res.stderr
    assert time.monotonic() - started < 30


def test_a_connection_cut_between_transactions_is_opened_again(pg_url: str) -> None:
    import psycopg
    s = ControlStore(pg_url)
    s.create_user("alice")
    with psycopg.connect(pg_url, autocommit=True) as admin:
        cut = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
                            " AND pid <> pg_backend_pid()").fetchall()
    assert cut
    assert [u.name for u in s.list_users()] == ["alice"]   # a read: reconnected, nothing lost
    s.create_user("bob")                                    # and a write
    assert [u.name for u in ControlStore(pg_url).list_users()] == ["alice", "bob"]
    s.close()


def test_replica_id_needs_postgres_and_replicas_lists_none(tmp_path: Path, pg_url: str) -> None:
    res = _meshnode("serve", "--db", str(tmp_path / "c.db"), "--replica-id", "r1", "--listen", "127.0.0.1:0")
    assert res.returncode == 2 and "PostgreSQL" in res.stderr
    res = _meshnode("replicas", "--db", pg_url, "--json")
    assert res.returncode == 0 and json.loads(res.stdout) == []
    s = ControlStore(pg_url)
    s.heartbeat_replica("r9", "127.0.0.1:1", [3, 1], s.version(), time.time() - 60)   # long dead
    assert s.presence() is None   # a dead replica's nodes are not online
    s.heartbeat_replica("r8", "127.0.0.1:2", [5], s.version(), time.time())
    assert s.presence()[2] == frozenset({5})
    s.remove_replica("r8")
    s.close()
    res = _meshnode("replicas", "--db", pg_url)
    assert res.returncode == 0 and "r9" in res.stdout and "no" in res.stdout.split("r9", 1)[1]
    rows = json.loads(_meshnode("replicas", "--db", pg_url, "--json").stdout)
    assert rows[0]["nodes"] == 2 and rows[0]["alive"] is False
