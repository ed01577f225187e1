"""Pre-auth key rules, alone (meshnode.control.authkeys) and through the store."""

import time
from pathlib import Path

import pytest

from meshnode.control import authkeys
from meshnode.control.authkeys import AuthKeyRefused, RefusalReason
from meshnode.control.store import ControlStore, Grant, Registration


def _allow(user, key_tags, reg, existing):
    return Grant(tuple(key_tags), (), False)


def _reg(machine: str, key: str | None, hostname: str = "box") -> Registration:
    return Registration(machine_key=machine, node_key="nk-" + machine, hostname=hostname, os="linux",
                        authkey=key)


@pytest.fixture
def store(tmp_path: Path) -> ControlStore:
    s = ControlStore(tmp_path / "control.db")
    yield s
    s.close()


def test_key_text_is_parsed_and_only_its_hash_is_stored(store: ControlStore) -> None:
    text, key = store.create_authkey("alice")
    key_id, secret = authkeys.split(text)
    assert key_id == key.id and secret not in key.secret_hash
    raw = store.db.execute("SELECT * FROM authkeys").fetchall()
    assert secret not in repr(raw)


def test_single_use_key_is_refused_the_second_time(store: ControlStore) -> None:
    text, _ = store.create_authkey("alice")
    store.register(_reg("m1", text), _allow)
    with pytest.raises(AuthKeyRefused) as err:
        store.register(_reg("m2", text), _allow)
    assert err.value.reason is RefusalReason.USED
    assert "already used" in str(err.value)
    assert [n.machine_key for n in store.list_nodes()] == ["m1"]


def test_reusable_key_registers_many(store: ControlStore) -> None:
    text, _ = store.create_authkey("alice", reusable=True)
    for i in range(3):
        store.register(_reg(f"m{i}", text), _allow)
    assert len(store.list_nodes()) == 3


def test_expired_key_is_refused(store: ControlStore) -> None:
    text, _ = store.create_authkey("alice", expires=time.time() - 1)
    with pytest.raises(AuthKeyRefused) as err:
        store.register(_reg("m1", text), _allow)
    assert err.value.reason is RefusalReason.EXPIRED


def test_wrong_secret_and_unknown_id_read_the_same(store: ControlStore) -> None:
    text, _ = store.create_authkey("alice")
    wrong = text[:-4] + ("0000" if not text.endswith("0000") else "1111")
    unknown = "mskey-000000000000-" + "a" * 64
    for bad in (wrong, unknown, "garbage"):
        with pytest.raises(AuthKeyRefused) as err:
            store.register(_reg("m1", bad), _allow)
        assert err.value.reason is RefusalReason.UNKNOWN
    assert store.list_nodes() == []


def test_revoked_key_is_refused(store: ControlStore) -> None:
    text, key = store.create_authkey("alice", reusable=True)
    store.revoke_authkey(key.id)
    with pytest.raises(AuthKeyRefused) as err:
        store.register(_reg("m1", text), _allow)
    assert err.value.reason is RefusalReason.REVOKED


def test_new_machine_without_key_is_refused(store: ControlStore) -> None:
    with pytest.raises(AuthKeyRefused):
        store.register(_reg("m1", None), _allow)


def test_known_machine_relogs_without_key_and_keeps_identity(store: ControlStore) -> None:
    text, _ = store.create_authkey("alice")
    first = store.register(_reg("m1", text), _allow)
    again = store.register(_reg("m1", None, hostname="renamed-host"), _allow)
    assert (again.id, again.name, again.addresses) == (first.id, first.name, first.addresses)


def test_refusal_in_authorizer_does_not_spend_the_key(store: ControlStore) -> None:
    text, key = store.create_authkey("alice")

    def refuse(*_a):
        raise PermissionError("tag not allowed")
    with pytest.raises(PermissionError):
        store.register(_reg("m1", text), refuse)
    assert store.get_authkey(key.id).used_count == 0
    store.register(_reg("m1", text), _allow)


def test_key_tags_and_ephemeral_carry_to_the_node(store: ControlStore) -> None:
    text, _ = store.create_authkey("alice", ephemeral=True, tags=["tag:ci"])
    node = store.register(_reg("m1", text), _allow)
    assert node.tags == ("tag:ci",) and node.ephemeral


@pytest.mark.parametrize("text, seconds", [("90d", 90 * 86400), ("12h", 43200), ("30m", 1800), ("45", 45)])
def test_durations(text: str, seconds: float) -> None:
    assert authkeys.parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "0", "-1h", "1y", "abc"])
def test_bad_durations(bad: str) -> None:
    with pytest.raises(ValueError):
        authkeys.parse_duration(bad)
