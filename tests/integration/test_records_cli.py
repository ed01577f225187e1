"""`magicdns records`: validation with exit code 2 and nothing written, listing, removal, import/export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from magicdns.records import RecordError, parse_record
from magicdns.store import CnameConflict, RecordStore, ShadowsNode
from tests.integration.magicdns_proc import run_cli


@pytest.fixture()
def db(db_spec: str) -> str:
    """Each test runs on a SQLite file and on a PostgreSQL database (`--db postgres://...`)."""
    return db_spec


def records(db: str, *args: str, input: str | None = None):
    return run_cli("records", "--db", db, *args, input=input)


def stored(db: str) -> list[dict]:
    res = records(db, "ls", "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_add_list_remove(db: str) -> None:
    assert records(db, "add", "web", "A", "100.64.0.5").returncode == 0
    assert records(db, "add", "_http._tcp", "SRV", "10", "5", "80", "web", "--ttl", "60").returncode == 0
    assert records(db, "add", "web", "TXT", '"hello world"').returncode == 0
    assert stored(db) == [
        {"name": "_http._tcp.tailnet.", "type": "SRV", "value": "10 5 80 web.tailnet.", "ttl": 60},
        {"name": "web.tailnet.", "type": "A", "value": "100.64.0.5", "ttl": 300},
        {"name": "web.tailnet.", "type": "TXT", "value": '"hello world"', "ttl": 300},
    ]
    table = records(db, "ls").stdout
    assert "web.tailnet" in table and "SRV" in table
    res = records(db, "rm", "web.tailnet", "TXT")
    assert res.returncode == 0 and "removed 1 record" in res.stdout
    assert records(db, "rm", "web", "A", "100.64.0.5").returncode == 0
    res = records(db, "rm", "web")
    assert res.returncode == 1 and "no record matches web.tailnet" in res.stderr


@pytest.mark.parametrize("args, message", [
    (("bad name", "A", "1.2.3.4"), "may hold only letters"),
    (("web", "BOGUS", "x"), "not supported"),
    (("web", "A", "1.2.3"), "not an IPv4 address"),
    (("web", "AAAA", "1.2.3.4"), "not an IPv6 address"),
    (("web", "A", "1.2.3.4", "--ttl", "-5"), "out of range"),
    (("web", "A", "1.2.3.4", "--ttl", "soon"), "whole number"),
    (("web", "SRV", "10", "5", "web"), "needs 4 field"),
    (("web", "MX", "ten", "mail"), "must be a number"),
    (("web", "CAA", "0", "issue"), "CAA value"),
    (("a" * 64, "A", "1.2.3.4"), "longer than 63"),
    (("web", "CNAME", "bad..name"), "empty label"),
    (("web", "TXT", "x" * 300), "at most 255 bytes"),
])
def test_bad_input_exits_2_and_writes_nothing(db: str, args: tuple[str, ...], message: str) -> None:
    records(db, "add", "keep", "A", "100.64.0.1")
    res = records(db, "add", *args)
    assert res.returncode == 2, res
    assert message in res.stderr
    assert [r["name"] for r in stored(db)] == ["keep.tailnet."]


def test_duplicates_and_cname_clashes_refused(db: str) -> None:
    assert records(db, "add", "web", "A", "100.64.0.5").returncode == 0
    res = records(db, "add", "web", "A", "100.64.0.5")
    assert res.returncode == 2 and "already exists" in res.stderr
    res = records(db, "add", "web", "CNAME", "other")
    assert res.returncode == 2 and "CNAME" in res.stderr
    assert records(db, "add", "alias", "CNAME", "web").returncode == 0
    res = records(db, "add", "alias", "TXT", "x")
    assert res.returncode == 2 and "CNAME" in res.stderr
    assert len(stored(db)) == 2


def test_import_export_round_trip_json_and_zone(db: str, tmp_path: Path) -> None:
    zone = tmp_path / "in.zone"
    zone.write_text("; a comment\n"
                    "web 60 IN A 100.64.0.5\n"
                    "web.tailnet. AAAA fd7a:115c:a1e0::5\n"
                    "_sip._udp 120 SRV 0 0 5060 web\n"
                    'txt TXT "two words" "and more"\n'
                    "tailnet. CAA 0 issue \"letsencrypt.org\"\n")
    res = records(db, "import", str(zone))
    assert res.returncode == 0, res.stderr
    assert "imported 5 records" in res.stdout
    exported = records(db, "export").stdout
    other = tmp_path / "copy.db"
    res = run_cli("records", "--db", str(other), "import", "-", input=exported)
    assert res.returncode == 0, res.stderr
    assert stored(str(other)) == stored(db)
    as_zone = records(db, "export", "--format", "zone").stdout
    third = tmp_path / "third.db"
    assert run_cli("records", "--db", str(third), "import", "-", input=as_zone).returncode == 0
    assert stored(str(third)) == stored(db)
    # importing the same file again adds nothing and says so
    res = records(db, "import", str(zone))
    assert "imported 0 records (5 already present)" in res.stdout


def test_import_is_all_or_nothing(db: str, tmp_path: Path) -> None:
    records(db, "add", "keep", "A", "100.64.0.1")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"name": "a", "type": "A", "value": "100.64.0.2"},
                               {"name": "b", "type": "A", "value": "300.1.1.1"}]))
    res = records(db, "import", str(bad))
    assert res.returncode == 2 and "record 2" in res.stderr
    clash = tmp_path / "clash.json"
    clash.write_text(json.dumps([{"name": "c", "type": "A", "value": "100.64.0.2"},
                                 {"name": "c", "type": "CNAME", "value": "keep"}]))
    res = records(db, "import", str(clash))
    assert res.returncode == 2 and "nothing was imported" in res.stderr
    assert [r["name"] for r in stored(db)] == ["keep.tailnet."]
    res = records(db, "import", "--replace", str(tmp_path / "missing.json"))
    assert res.returncode == 2
    assert [r["name"] for r in stored(db)] == ["keep.tailnet."]


def test_replace_import(db: str, tmp_path: Path) -> None:
    records(db, "add", "old", "A", "100.64.0.1")
    new = tmp_path / "new.json"
    new.write_text(json.dumps({"records": [{"name": "new", "type": "A", "value": "100.64.0.2", "ttl": 5}]}))
    assert records(db, "import", "--replace", str(new)).returncode == 0
    assert [r["name"] for r in stored(db)] == ["new.tailnet."]


def test_store_version_moves_with_every_change(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "r.db")
    v0 = store.version()
    store.add(parse_record("a", "A", "100.64.0.1"))
    assert store.version() == v0 + 1
    store.import_records([parse_record("b", "A", "100.64.0.2")])
    assert store.version() == v0 + 2
    with pytest.raises(CnameConflict):
        store.add(parse_record("a", "CNAME", "b"))
    assert store.version() == v0 + 2  # a refused change leaves no trace


def test_damaged_store_is_a_clear_failure(tmp_path: Path) -> None:
    path = tmp_path / "broken.db"
    path.write_bytes(b"this is not a database" * 100)
    res = run_cli("records", "--db", str(path), "ls")
    assert res.returncode == 1 and "cannot open records store" in res.stderr
    assert path.read_bytes() == b"this is not a database" * 100


def test_relative_and_absolute_names() -> None:
    assert parse_record("web", "A", "1.2.3.4").name == "web.tailnet"
    assert parse_record("web.tailnet", "A", "1.2.3.4").name == "web.tailnet"
    assert parse_record("Web.TailNet.", "A", "1.2.3.4").name == "web.tailnet"
    assert parse_record("db.corp.example.", "A", "1.2.3.4").name == "db.corp.example"
    assert parse_record("x", "CNAME", "example.com").value == "example.com."
    assert parse_record("x", "CNAME", "web").value == "web.tailnet."
    with pytest.raises(RecordError):
        parse_record("*bad", "A", "1.2.3.4")
    assert parse_record("*.dev", "A", "1.2.3.4").name == "*.dev.tailnet"


def test_record_at_a_node_name_needs_override(tmp_path: Path) -> None:
    """Without --override such a record was "added" and never served; now refused, exit 2."""
    from meshnode.control.store import ControlStore, Grant, Registration

    control = tmp_path / "control.db"
    cs = ControlStore(control)
    cs.set_domain("corp.ts")
    key, _ = cs.create_authkey("alice")
    cs.register(Registration(machine_key="m1", node_key="nk-m1", hostname="web", os="linux", authkey=key),
                lambda user, tags, reg, existing: Grant(tuple(tags), (), False))
    # the store itself refuses it, so the console (and any other writer) gets the same rule
    with pytest.raises(ShadowsNode, match="override"):
        cs.records.add(parse_record("web", "A", "100.64.0.9", domain="corp.ts"))
    cs.close()
    db = str(control)
    for args in (("web.corp.ts.", "A", "100.64.0.9"), ("web.corp.ts.", "CNAME", "other.corp.ts.")):
        res = run_cli("records", "--db", db, "add", *args)
        assert res.returncode == 2 and "--override" in res.stderr and "web.corp.ts" in res.stderr, res
    assert run_cli("records", "--db", db, "add", "web.corp.ts.", "TXT", "fine beside it").returncode == 0
    res = run_cli("records", "--db", db, "add", "web.corp.ts.", "A", "100.64.0.9", "--override")
    assert res.returncode == 0, res.stderr
    # the view a standalone server loads names its nodes too
    view = tmp_path / "view.json"
    view.write_text(json.dumps({"domain": "tailnet", "peers": [{"name": "nas", "addresses": ["100.64.0.3"]}]}))
    solo = str(tmp_path / "solo.db")
    res = run_cli("records", "--db", solo, "--view", str(view), "add", "nas", "AAAA", "fd7a:115c:a1e0::9")
    assert res.returncode == 2 and "--override" in res.stderr
    zone = tmp_path / "in.zone"
    zone.write_text("ok 60 IN A 100.64.0.5\nnas 60 IN A 100.64.0.6\n")
    res = run_cli("records", "--db", solo, "--view", str(view), "import", str(zone))
    assert res.returncode == 2 and "--override" in res.stderr and "nothing was imported" in res.stderr
    assert stored(solo) == []


def test_rrset_that_cannot_fit_a_message_is_refused(db: str, tmp_path: Path) -> None:
    big = " ".join(f'"{"x" * 250}"' for _ in range(60))  # ~15 KB a record
    for i in range(4):
        res = records(db, "add", "big", "TXT", big + f' "{i}"')
        assert res.returncode == 0, res.stderr
    res = records(db, "add", "big", "TXT", big + ' "4"')
    assert res.returncode == 2 and "65535" in res.stderr
    assert len(stored(db)) == 4
    res = records(db, "add", "huge", "TXT", " ".join([big] * 5))  # one record alone too large
    assert res.returncode == 2 and "65535" in res.stderr
    many = tmp_path / "many.json"
    many.write_text(json.dumps([{"name": "big2", "type": "TXT", "value": big + f' "{i}"'} for i in range(5)]))
    res = records(db, "import", str(many))
    assert res.returncode == 2 and "nothing was imported" in res.stderr and len(stored(db)) == 4


def test_zone_export_reads_back_exactly(db: str, tmp_path: Path) -> None:
    assert records(db, "add", "nl", "TXT", "line one\nline two\ttab").returncode == 0
    assert records(db, "add", "q", "TXT", '"semi;colon" "back\\\\slash" "quote\\"d" "\\000nul"').returncode == 0
    assert records(db, "add", "u", "TXT", "héllo wörld").returncode == 0
    assert records(db, "add", "o", "A", "100.64.0.7", "--override").returncode == 0
    assert records(db, "add", "c", "CAA", '0 issue "letsencrypt.org"').returncode == 0
    before = stored(db)
    assert any(r.get("override") for r in before)
    as_zone = records(db, "export", "--format", "zone").stdout
    assert len(as_zone.splitlines()) == 5  # one line a record: the newline is escaped
    copy = str(tmp_path / "copy.db")
    res = run_cli("records", "--db", copy, "import", "-", input=as_zone)
    assert res.returncode == 0, res.stderr
    assert stored(copy) == before
    assert records(copy, "export", "--format", "zone").stdout == as_zone
