"""The audit log: every change through the store leaves exactly one hash-chained entry per effect in
its own transaction, a refused change leaves none, and any edit or deletion of an entry is found."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from meshnode.control import audit
from meshnode.control.authkeys import AuthKeyRefused
from meshnode.control.naming import NameTaken
from meshnode.control.access import set_policy
from meshnode.control.protocol import generate_private_key, public_key_of
from meshnode.control.store import ControlStore, ControlStoreError, Grant, Registration
from meshnode.policy import PolicyError

MESHNODE = str(Path(sys.executable).parent / "meshnode")
NAMES = ["alice", "bob", "carol"]
HOSTS = ["web", "db", "laptop"]


def _grant(user, key_tags, reg, existing):  # noqa: ANN001, ANN202
    return Grant(tuple(key_tags), (), False)


def _register(store: ControlStore, key: str | None, host: str, machine: str) -> None:
    store.register(Registration(machine, public_key_of(generate_private_key()), host, "linux", key), _grant)


OPS = st.sampled_from([
    "user", "user_rm", "key", "revoke", "register", "relogin", "rename", "rename_bad", "delete", "tag",
    "tag_bad", "expire", "routes_bad", "ns", "ns_bad", "route", "route_rm", "policy", "policy_bad",
    "rotate", "logout", "retention"])


def _apply(store: ControlStore, op: str, pick: int, state: dict) -> None:
    name, host = NAMES[pick % 3], HOSTS[pick % 3]
    nodes = [n.name for n in store.list_nodes()]
    ref = nodes[pick % len(nodes)] if nodes else "nope"
    if op == "user":
        store.create_user(name)
    elif op == "user_rm":
        store.delete_user(name)
    elif op == "key":
        text, key = store.create_authkey(name, reusable=pick % 2 == 0, tags=["tag:ci"] if pick % 4 == 1 else [])
        state["keys"].append(text)
    elif op == "revoke":
        keys = [k.id for k in store.list_authkeys()] + ["bogus"]
        store.revoke_authkey(keys[pick % len(keys)])
    elif op == "register":
        keys = state["keys"] or [None]
        machine = public_key_of(generate_private_key())
        state["machines"].append(machine)
        _register(store, keys[pick % len(keys)], host, machine)
    elif op == "relogin":
        if state["machines"]:
            _register(store, None, host, state["machines"][pick % len(state["machines"])])
    elif op == "rename":
        store.rename_node(ref, f"{host}{pick}")
    elif op == "rename_bad":
        store.rename_node(ref, nodes[(pick + 1) % len(nodes)] if len(nodes) > 1 else "Bad Name!")
    elif op == "delete":
        store.delete_node(ref)
    elif op == "tag":
        store.set_tags(ref, ["tag:server"] if pick % 2 else [])
    elif op == "tag_bad":
        store.set_tags(ref, ["server"])
    elif op == "expire":
        store.expire_node(ref)
    elif op == "routes_bad":
        store.approve_routes(ref, ["10.9.9.0/24"])
    elif op == "ns":
        store.set_nameservers([f"192.0.2.{pick % 200 + 1}"])
    elif op == "ns_bad":
        store.set_nameservers(["not an address"])
    elif op == "route":
        store.add_route("corp.example", [f"192.0.2.{pick % 200 + 1}"])
    elif op == "route_rm":
        store.remove_route("corp.example")
    elif op == "policy":
        set_policy(store, json.dumps({"tagOwners": {"tag:server": [f"{name}"]} if pick % 2 else {},
                                      "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}))
    elif op == "policy_bad":
        set_policy(store, '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],'
                          ' "tests": [{"src": "nobody@example.com", "deny": ["100.64.0.1:22"]}, ]}'
                   if pick % 2 else "{ not json")
    elif op == "rotate":
        store.rotate_admin_token()
    elif op == "logout":
        live = [n for n in store.list_nodes() if not n.logged_out]
        if live:
            store.logout(live[pick % len(live)].id)
    elif op == "retention":
        store.set_audit_retention(float(pick % 5))   # 0 is refused


def _count(store: ControlStore) -> int:
    return store.conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(OPS, st.integers(0, 11)), min_size=1, max_size=25))
def test_any_sequence_of_changes_including_failed_ones_verifies(ops: list[tuple[str, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = ControlStore(Path(tmp) / "c.db")
        store.actor = "cli:test@host"
        state: dict = {"keys": [], "machines": []}
        for op, pick in ops:
            before = _count(store)
            counter = store.change_counter()
            try:
                _apply(store, op, pick, state)
            except (ControlStoreError, PolicyError, ValueError, AuthKeyRefused, NameTaken):
                # Refused: nothing changed, so nothing is logged (the transaction rolled back).
                assert _count(store) == before, op
                assert store.change_counter() == counter, op
                continue
            if store.change_counter() != counter:
                assert _count(store) > before, f"{op} changed the tailnet without an audit entry"
        result = store.verify_audit()
        assert result.ok, result.problem
        assert result.entries == _count(store)
        store.close()


def _populated(tmp: Path) -> ControlStore:
    store = ControlStore(tmp / "c.db")
    store.actor = "cli:test@host"
    key, _ = store.create_authkey("alice", reusable=True)
    for host in HOSTS:
        _register(store, key, host, public_key_of(generate_private_key()))
    store.rename_node("web", "www")
    store.set_nameservers(["192.0.2.1"])
    set_policy(store, '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}')
    store.rotate_admin_token()
    assert store.verify_audit().ok
    return store


_FIELDS = ["time", "actor", "action", "target", "old", "new", "prev_hash", "hash"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_edit_or_deletion_of_an_entry_is_detected(tmp_path_factory: pytest.TempPathFactory,
                                                      data: st.DataObject) -> None:
    store = _populated(tmp_path_factory.mktemp("audit"))
    ids = [r[0] for r in store.conn.execute("SELECT id FROM audit ORDER BY id")]
    victim = data.draw(st.sampled_from(ids), label="entry")
    if data.draw(st.booleans(), label="delete"):
        store.conn.execute("DELETE FROM audit WHERE id = ?", [victim])
    else:
        column = data.draw(st.sampled_from(_FIELDS), label="field")
        old = store.conn.execute(f"SELECT {column} FROM audit WHERE id = ?", [victim]).fetchone()[0]
        if column == "time":
            new = old + data.draw(st.sampled_from([-86400.0, 1e-6, 3600.0]))
        elif column in ("old", "new"):
            new = '{"forged":true}' if old is None else (old.replace("a", "b", 1) if "a" in old else old + " ")
        else:
            new = (old or "") + data.draw(st.sampled_from(["x", " ", "0"]))
        store.conn.execute(f"UPDATE audit SET {column} = ? WHERE id = ?", [new, victim])
    result = store.verify_audit()
    assert not result.ok
    assert str(victim) in (result.problem or "") or str(victim + 1) in (result.problem or "") \
        or "head" in (result.problem or "") or "oldest" in (result.problem or "")
    store.close()


def test_retention_prunes_from_the_start_records_it_and_still_verifies(tmp_path: Path) -> None:
    store = _populated(tmp_path)
    total = _count(store)
    now = store.conn.execute("SELECT MAX(time) FROM audit").fetchone()[0]
    # Age the first five entries (as if written 100 days ago) by rewriting the chain as a real old log
    # would be: easier to prune against a future `now`.
    removed = store.prune_audit(now=now + 91 * 86400)
    assert removed == total
    left = store.audit_entries()
    assert [e.action for e in left] == ["audit.prune"] and left[0].new["removed"] == total
    assert store.verify_audit().ok
    store.rename_node("www", "web2")
    assert store.verify_audit().ok
    # Nothing is older than 90 days now: a prune removes nothing and records nothing.
    assert store.prune_audit() == 0 and len(store.audit_entries()) == 2
    # Deleting the oldest remaining entries by hand is not a pruning: detected.
    store.conn.execute("DELETE FROM audit WHERE id = (SELECT MIN(id) FROM audit)")
    assert "oldest" in (store.verify_audit().problem or "")
    store.close()


def test_partial_prune_keeps_a_verifiable_chain(tmp_path: Path) -> None:
    store = ControlStore(tmp_path / "c.db")
    with store._tx(bump=False):
        for i in range(10):
            audit.record(store.conn, "system", "test.old" if i < 6 else "test.new", f"t:{i}", None, {"i": i},
                         now=1000.0 + i * 86400 * (20 if i < 6 else 0) + (i >= 6) * 200 * 86400)
    before = [e.hash for e in store.audit_entries()]
    with store._tx(bump=False):
        removed = audit.prune(store.conn, now=1000.0 + 220 * 86400, retention_seconds=90 * 86400)
    assert removed == 6
    entries = store.audit_entries()
    assert [e.action for e in entries] == ["test.new"] * 4 + ["audit.prune"]
    assert entries[0].prev_hash == before[5] == entries[-1].new["anchor"]
    assert store.verify_audit().ok
    store.create_user("late")
    assert store.verify_audit().ok
    # Dropping the newest entry is detected through the recorded head.
    store.conn.execute("DELETE FROM audit WHERE id = (SELECT MAX(id) FROM audit)")
    assert "head" in (store.verify_audit().problem or "")
    store.close()


def test_record_outside_a_transaction_is_refused(tmp_path: Path) -> None:
    store = ControlStore(tmp_path / "c.db")
    with pytest.raises(RuntimeError):
        audit.record(store.conn, "x", "y", "z")
    store.close()


def test_cli_audit_ls_filters_json_and_verify(tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([MESHNODE, "control", *args, "--db", db], capture_output=True, text=True, timeout=60)
    assert cli("users", "create", "bob").returncode == 0
    assert cli("authkey", "create", "--user", "bob").returncode == 0
    assert cli("dns", "nameservers", "set", "192.0.2.1").returncode == 0
    assert cli("users", "create", "bob").returncode == 1           # refused: not logged
    r = cli("audit", "ls", "--json")
    items = json.loads(r.stdout)
    assert [e["action"] for e in items] == ["user.create", "authkey.create", "dns.nameservers"]
    assert all(e["actor"].startswith("cli:") for e in items)
    assert items[2]["old"] == [] and items[2]["new"] == ["192.0.2.1"]
    r = cli("audit", "ls", "--target", "user:bob", "--json")
    assert [e["action"] for e in json.loads(r.stdout)] == ["user.create"]
    r = cli("audit", "ls", "--actor", "cli:", "--since", "1h")
    assert r.returncode == 0 and "dns.nameservers" in r.stdout
    assert json.loads(cli("audit", "ls", "--actor", "admin-token", "--json").stdout) == []
    r = cli("audit", "verify")
    assert r.returncode == 0 and "3 entries" in r.stdout
    conn = sqlite3.connect(db)
    conn.execute("UPDATE audit SET actor = 'admin-token' WHERE id = 2")
    conn.commit()
    conn.close()
    r = cli("audit", "verify")
    assert r.returncode == 1 and "entry 2 was altered" in r.stderr


def test_an_entry_written_in_a_transaction_that_rolls_back_is_gone(tmp_path: Path) -> None:
    store = ControlStore(tmp_path / "c.db")
    store.create_user("kept")

    class Boom(Exception):
        pass
    with pytest.raises(Boom):
        with store._tx():
            store.conn.execute("DELETE FROM users")
            audit.record(store.conn, "cli:x@y", "user.delete", "user:kept")
            raise Boom
    assert [e.action for e in store.audit_entries()] == ["user.create"]
    assert store.verify_audit().ok
    store.close()


def test_record_changes_made_directly_on_the_records_table_are_audited(tmp_path: Path) -> None:
    """`magicdns records --db control.db` writes through magicdns.store, which knows nothing of the
    audit log: triggers note its changes in their own transaction, and they are chained."""
    db = tmp_path / "c.db"
    store = ControlStore(db)
    store.create_user("first")
    magicdns = str(Path(sys.executable).parent / "magicdns")
    for args in (["add", "grafana", "A", "100.64.9.9"], ["add", "grafana", "A", "100.64.9.9"],
                 ["rm", "grafana"]):
        subprocess.run([magicdns, "records", "--db", str(db), *args], capture_output=True, text=True, timeout=60)
    got = [(e.actor, e.action, e.target, e.old, e.new) for e in store.audit_entries()]
    assert got[1:] == [
        ("records-store", "dns.record.add", "record:grafana.tailnet", None,
         {"type": "A", "value": "100.64.9.9", "ttl": 300}),
        ("records-store", "dns.record.remove", "record:grafana.tailnet",
         {"type": "A", "value": "100.64.9.9", "ttl": 300}, None)], got   # the refused duplicate left nothing
    assert store.verify_audit().ok
    store.close()


def test_records_changed_while_acting_as_someone_are_theirs(tmp_path: Path) -> None:
    from magicdns.records import parse_record
    store = ControlStore(tmp_path / "c.db")
    store.records.add(parse_record("before", "A", "100.64.1.1", 60, "tailnet"))   # nobody in particular
    with store.acting_as("user:alice@example.com"):
        store.records.add(parse_record("grafana", "A", "100.64.9.9", 60, "tailnet"))
    got = [(e.actor, e.action, e.target) for e in store.audit_entries()]
    assert got == [("records-store", "dns.record.add", "record:before.tailnet"),
                   ("user:alice@example.com", "dns.record.add", "record:grafana.tailnet")]
    assert store.verify_audit().ok
    store.close()
