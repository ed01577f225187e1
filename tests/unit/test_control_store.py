"""The control store: migrations, names, leases, DNS settings, policy hook, crash safety."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import sqlite_utils

from magicdns.records import parse_record
from meshnode.control import store as store_mod
from meshnode.control.naming import NameInvalid, NameTaken
from meshnode.control.store import (SCHEMA_VERSION, Conflict, ControlStore, Grant, InvalidValue, NotFound, Registration,
                                    SchemaTooNew)

REPO = Path(__file__).resolve().parents[2]


def _allow(user, key_tags, reg, existing):
    return Grant(tuple(key_tags), (), False)


def _reg(machine: str, key: str | None, hostname: str = "box") -> Registration:
    return Registration(machine_key=machine, node_key="nk-" + machine, hostname=hostname, os="linux",
                        authkey=key)


@pytest.fixture
def store(db_spec: str):
    s = ControlStore(db_spec)
    yield s
    s.close()


def test_fresh_store_is_at_latest_schema_with_wal(tmp_path: Path) -> None:
    store = ControlStore(tmp_path / "control.db")
    assert store.schema_version() == store_mod.SCHEMA_VERSION
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.domain() == "tailnet"


def test_migration_from_v1_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite_utils.Database(sqlite3.connect(str(path), isolation_level=None))
    db["control_meta"].create({"key": str, "value": str}, pk="key")
    store_mod.MIGRATIONS[0](db)
    db.execute("INSERT INTO control_meta VALUES ('control_schema', '1')")
    db.execute("INSERT INTO users(name, created) VALUES ('alice', 1.0)")
    db.conn.close()
    s = ControlStore(path)
    assert s.schema_version() == store_mod.SCHEMA_VERSION
    assert [u.name for u in s.list_users()] == ["alice"]
    s.set_nameservers(["1.1.1.1"])  # the v2 table exists
    assert s.dns_settings().nameservers == ("1.1.1.1",)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    ControlStore(path).close()
    conn = sqlite3.connect(str(path))
    conn.execute("UPDATE control_meta SET value = '99' WHERE key = 'control_schema'")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaTooNew):
        ControlStore(path)


def test_names_collide_rename_and_free_on_delete(store: ControlStore) -> None:
    key, _ = store.create_authkey("alice", reusable=True)
    a = store.register(_reg("m1", key, "web.local"), _allow)
    b = store.register(_reg("m2", key, "WEB"), _allow)
    c = store.register(_reg("m3", key, "web"), _allow)
    assert (a.name, b.name, c.name) == ("web", "web-1", "web-2")
    with pytest.raises(NameTaken):
        store.rename_node("web-1", "web")
    with pytest.raises(NameInvalid):
        store.rename_node("web-1", "bad name")
    assert store.rename_node("web-1", "API").name == "api"
    store.delete_node("web")
    assert store.rename_node("web-2", "web").name == "web"
    with pytest.raises(NotFound):
        store.rename_node("nope", "x")


def test_addresses_stable_across_reopen_and_relogin(db_spec: str) -> None:
    path = db_spec
    s = ControlStore(path)
    key, _ = s.create_authkey("alice", reusable=True)
    nodes = [s.register(_reg(f"m{i}", key, f"h{i}"), _allow) for i in range(5)]
    assert len({n.addresses for n in nodes}) == 5
    s.delete_node(nodes[2].name)  # not ephemeral: the machine keeps its lease
    s.close()
    s = ControlStore(path)
    again = s.register(_reg("m2", key, "h2"), _allow)
    assert again.addresses == nodes[2].addresses
    assert s.register(_reg("m4", None, "h4"), _allow).addresses == nodes[4].addresses
    fresh = s.register(_reg("m9", key, "h9"), _allow)
    assert fresh.addresses not in {n.addresses for n in nodes}
    s.close()


def test_ephemeral_nodes_are_removed_when_stale_and_give_back_leases(store: ControlStore) -> None:
    key, _ = store.create_authkey("ci", reusable=True, ephemeral=True)
    n1 = store.register(_reg("e1", key, "ci"), _allow, now=100.0)
    n2 = store.register(_reg("e2", key, "ci"), _allow, now=100.0)
    gone = store.delete_stale_ephemeral(online_ids={n2.id}, older_than=200.0)
    assert [n.id for n in gone] == [n1.id]
    assert [n.id for n in store.list_nodes()] == [n2.id]
    assert store.db.execute("SELECT COUNT(*) FROM leases").fetchone()[0] == 1


def test_user_with_nodes_cannot_be_deleted(store: ControlStore) -> None:
    key, _ = store.create_authkey("alice")
    store.register(_reg("m1", key), _allow)
    with pytest.raises(Conflict):
        store.delete_user("alice")
    store.create_user("bob")
    store.delete_user("bob")
    assert [u.name for u in store.list_users()] == ["alice"]


def test_dns_settings_round_trip_and_validation(store: ControlStore) -> None:
    store.set_nameservers(["1.1.1.1", "[2606:4700::1111]:53", "127.0.0.1:5301"])
    store.add_route("corp.example", ["10.0.0.53"])
    store.add_route("internal.tailnet", [])
    store.set_search_domains(["corp.example"])
    s = store.dns_settings()
    assert s.nameservers == ("1.1.1.1", "2606:4700::1111", "127.0.0.1:5301")
    assert s.routes == (("corp.example", ("10.0.0.53",)), ("internal.tailnet", ()))
    assert s.search_domains == ("corp.example",)
    store.remove_route("corp.example")
    assert store.dns_settings().routes == (("internal.tailnet", ()),)
    with pytest.raises(InvalidValue):
        store.set_nameservers(["dns.google"])
    with pytest.raises(InvalidValue):
        store.add_route("bad..domain", ["1.1.1.1"])


def test_every_change_bumps_the_counter(store: ControlStore) -> None:
    before = store.change_counter()
    store.create_user("alice")
    store.set_search_domains(["x.example"])
    assert store.change_counter() == before + 2


def test_policy_validation_failure_keeps_old_policy(store: ControlStore) -> None:
    default = store.policy_text()
    def bad(text, nodes):
        raise ValueError("tests failed")
    with pytest.raises(ValueError):
        store.set_policy_text("{}", bad)
    assert store.policy_text() == default
    store.set_policy_text('{"acls": []}', lambda t, n: None)
    assert store.policy_text() == '{"acls": []}'


def test_a_policy_without_tests_reads_only_tagged_nodes_and_one_with_tests_sees_every_node(store: ControlStore) -> None:
    """`access.set_policy` loads every node only for a policy's tests; tagOwners still takes tags
    from tagged nodes either way, and a test naming an untagged node's address still knows whose it is."""
    import json

    from meshnode.control.access import set_policy
    from meshnode.policy import PolicyTestError
    key, _ = store.create_authkey("alice@example.com", reusable=True)
    plain = store.register(_reg("m1", key, "laptop"), _allow)
    tagged = store.register(_reg("m2", key, "db"), _allow)
    store.set_tags(tagged.name, ["tag:db"])
    seen: list[list[str]] = []
    real = store.set_policy_text

    def spy(text, decide, all_nodes=True):  # noqa: ANN001, ANN202
        return real(text, lambda t, nodes: (seen.append([n.name for n in nodes]), decide(t, nodes))[1], all_nodes)
    store.set_policy_text = spy   # type: ignore[method-assign]
    acl = [{"action": "accept", "src": ["alice@example.com"], "dst": ["tag:db:5432"]}]
    change = set_policy(store, json.dumps({"tagOwners": {"tag:db": ["bob@example.com"]}, "acls": acl}))
    assert seen[-1] == ["db"]   # no tests: only the tagged node was read
    assert change.tags_removed == ()   # an admin's tag stands
    assert store.get_node(tagged.id).tags == ("tag:db",)
    test = {"src": plain.addresses[0], "accept": [f"{tagged.addresses[0]}:5432"]}
    set_policy(store, json.dumps({"tagOwners": {"tag:db": []}, "acls": acl, "tests": [test]}))
    assert seen[-1] == ["laptop", "db"]   # the test's source is alice's laptop: it had to be known
    with pytest.raises(PolicyTestError):
        set_policy(store, json.dumps({"tagOwners": {"tag:db": []}, "acls": acl,
                                      "tests": [{**test, "accept": [], "deny": test["accept"]}]}))


def test_records_live_in_the_same_file(db_spec: str) -> None:
    from magicdns.store import RecordStore
    path = db_spec
    s = ControlStore(path)
    other = RecordStore(path)  # as `magicdns records --db` opens it
    other.add(parse_record("grafana", "CNAME", "web"))
    assert [r.name for r in s.records.list()] == ["grafana.tailnet"]
    other.close()
    s.close()


def test_approve_routes_needs_advertisement(store: ControlStore) -> None:
    key, _ = store.create_authkey("alice")
    reg = Registration("m1", "nk", "gw", "linux", key, advertise_routes=("10.0.0.0/24",), advertise_exit_node=True)
    store.register(reg, _allow)
    node = store.approve_routes("gw", ["10.0.0.0/24", "0.0.0.0/0"])
    assert node.approved_routes == ("10.0.0.0/24",) and node.exit_node_approved
    with pytest.raises(InvalidValue):
        store.approve_routes("gw", ["192.168.0.0/16"])
    node = store.approve_routes("gw", ["10.0.0.0/24"])  # the exit node is not listed: withdrawn
    assert node.approved_routes == ("10.0.0.0/24",) and not node.exit_node_approved
    node = store.approve_routes("gw", [])
    assert node.approved_routes == () and not node.exit_node_approved


_WRITER = textwrap.dedent("""
    import sys
    from meshnode.control.store import ControlStore, Grant, Registration
    s = ControlStore(sys.argv[1])
    key, _ = s.create_authkey("alice", reusable=True)
    allow = lambda u, t, r, e: Grant((), (), False)
    for i in range(100000):
        n = s.register(Registration(f"m{i}", f"nk{i}", f"host{i}", "linux", key), allow)
        s.rename_node(n.name, f"renamed-{i}")
        print(i, flush=True)   # printed only after both commits returned
""")


def test_kill_9_mid_write_loses_nothing_committed(db_spec: str) -> None:
    path = db_spec
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        deadline = time.monotonic() + 20
        last = -1
        while last < 50 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            last = int(line.split()[0])
        assert last >= 50, "the writer did not get going"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    s = ControlStore(path)
    names = {n.name for n in s.list_nodes()}
    for i in range(last + 1):
        assert f"renamed-{i}" in names
    if not path.startswith("postgres"):
        assert s.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    s.close()


def test_second_connection_sees_commits_at_once(db_spec: str) -> None:
    path = db_spec
    writer, reader = ControlStore(path), ControlStore(path)
    key, _ = writer.create_authkey("alice")
    writer.register(_reg("m1", key, "seen"), _allow)
    assert [n.name for n in reader.list_nodes()] == ["seen"]
    assert reader.change_counter() == writer.change_counter()
    writer.close()
    reader.close()


def test_flow_logs_round_trip_on_both_backends(store: ControlStore) -> None:
    key, _ = store.create_authkey("alice")
    node = store.register(_reg("m1", key, "web"), _allow)
    rec = {"start": 100.0, "end": 160.0, "proto": 6, "src": "100.64.0.1", "dst": "100.64.0.2", "sport": 4000,
           "dport": 22, "peer": "db", "kind": "out", "tx_packets": 3, "tx_bytes": 300, "rx_packets": 2,
           "rx_bytes": 200, "dropped": False, "rule": ""}
    assert store.store_flows(node, "boot1", [(1, [rec]), (2, [dict(rec, start=200.0, end=260.0)])]) == 2
    assert store.store_flows(node, "boot1", [(2, [rec])]) == 2   # re-sent batch: counted once
    got = store.flows(node="web", since=150.0)
    assert [(f["start"], f["end"], f["dport"]) for f in got] == [(100.0, 160.0, 22), (200.0, 260.0, 22)]
    assert store.prune_flows(now=170.0 + store.flow_retention_days() * 86400) == 1
