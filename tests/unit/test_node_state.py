"""The node's state directory: atomic writes, permissions, and what happens to damaged files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from meshnode.node.atomicfile import atomic_write
from meshnode.node.prefs import Prefs, PrefsError, prefs_from_json
from meshnode.node.state import KeyFileError, StateDir, StateLocked


@pytest.fixture
def state(tmp_path: Path):
    s = StateDir(tmp_path / "state")
    s.open()
    yield s
    s.close()


def test_directory_and_keys_are_private(state: StateDir) -> None:
    key = state.machine_key()
    assert stat.S_IMODE(state.path.stat().st_mode) == 0o700
    assert stat.S_IMODE((state.path / "machine.key").stat().st_mode) == 0o600
    assert bytes(state.machine_key()) == bytes(key)  # stable across loads


def test_node_key_lifecycle(state: StateDir) -> None:
    assert state.node_key() is None
    key = state.new_node_key()
    assert bytes(state.node_key()) == bytes(key)
    state.forget_node_key()
    assert state.node_key() is None
    state.forget_node_key()  # idempotent


@pytest.mark.parametrize("content", [b"garbage", b"privkey:zz", b"privkey:" + b"ab" * 16, b"\xff\xfe"])
def test_damaged_key_is_refused_never_regenerated(state: StateDir, content: bytes) -> None:
    path = state.path / "machine.key"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match="machine.key"):
        state.machine_key()
    assert path.read_bytes() == content  # nothing lost


def test_unreadable_key_is_refused(state: StateDir) -> None:
    (state.path / "node.key").mkdir()
    with pytest.raises(KeyFileError, match="not a regular file"):
        state.node_key()


def test_world_readable_key_is_tightened(state: StateDir) -> None:
    key = state.new_node_key()
    os.chmod(state.path / "node.key", 0o644)
    assert bytes(state.node_key()) == bytes(key)
    assert stat.S_IMODE((state.path / "node.key").stat().st_mode) == 0o600


def test_second_daemon_on_same_directory_is_refused(state: StateDir) -> None:
    other = StateDir(state.path)
    with pytest.raises(StateLocked):
        other.open()


def test_prefs_round_trip(state: StateDir) -> None:
    assert state.prefs() == Prefs()
    p = Prefs(login_server="http://127.0.0.1:8080/", hostname="laptop", accept_dns=False,
              advertise_routes=("10.0.0.0/24",), advertise_tags=("tag:server",), want_running=True)
    state.save_prefs(p.updated())
    loaded = state.prefs()
    assert loaded.login_server == "http://127.0.0.1:8080"
    assert loaded.advertise_routes == ("10.0.0.0/24",) and loaded.want_running


def test_corrupt_prefs_moved_aside(state: StateDir) -> None:
    (state.path / "prefs.json").write_text("{not json")
    assert state.prefs() == Prefs()
    aside = list(state.path.glob("prefs.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == "{not json"


def test_map_round_trip_and_corruption(state: StateDir) -> None:
    assert state.saved_map() is None
    state.save_map({"version": 3}, now=1000.0)
    saved = state.saved_map()
    assert saved is not None and saved.netmap == {"version": 3} and saved.saved_at == 1000.0
    (state.path / "netmap.json").write_text('{"format": 1, "netmap": [1, 2')  # torn by hand
    assert state.saved_map() is None
    assert not (state.path / "netmap.json").exists()
    assert len(list(state.path.glob("netmap.json.corrupt-*"))) == 1
    # A keyfile next to it is untouched.
    state.new_node_key()
    assert state.node_key() is not None


def test_map_of_wrong_shape_moved_aside(state: StateDir) -> None:
    (state.path / "netmap.json").write_text(json.dumps({"format": 99, "netmap": {}}))
    assert state.saved_map() is None
    assert len(list(state.path.glob("netmap.json.corrupt-*"))) == 1


def test_atomic_write_leaves_no_temp_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_text("old")

    atomic_write(target, "new")
    assert target.read_text() == "new"
    with pytest.raises(TypeError):
        atomic_write(target, 12345)  # type: ignore[arg-type]
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


@pytest.mark.parametrize("obj,msg", [
    ([], "object"),
    ({"accept_dns": "yes"}, "accept_dns"),
    ({"login_server": "ftp://x"}, "login_server"),
    ({"advertise_routes": ["10.0.0.1/24"]}, "advertise_routes"),
    ({"advertise_tags": ["server"]}, "advertise_tags"),
])
def test_bad_prefs_are_named(obj, msg: str) -> None:
    with pytest.raises(PrefsError, match=msg):
        prefs_from_json(obj)
