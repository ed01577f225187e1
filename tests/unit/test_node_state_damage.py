"""Damaged state files: moved aside and reported, or (identity) refused; never a crash or a silent
new identity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshnode.node import state as state_mod
from meshnode.node.state import IdentityDamaged, StateDir


def _open(tmp_path: Path) -> StateDir:
    s = StateDir(tmp_path / "st")
    s.open()
    return s


def test_a_huge_map_is_moved_aside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = _open(tmp_path)
    s.save_map({"version": 1, "pad": "x" * 5000}, 1.0)
    monkeypatch.setattr(state_mod, "MAX_STATE_JSON_BYTES", 1000)
    assert s.saved_map() is None
    assert list(s.path.glob("netmap.json.corrupt-*")) and "bytes" in s.damage[0]


def test_a_deeply_nested_map_is_moved_aside_not_a_crash(tmp_path: Path) -> None:
    s = _open(tmp_path)
    (s.path / "netmap.json").write_text('{"format": 1, "netmap": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert s.saved_map() is None
    (s.path / "netmap.json").write_text(json.dumps({"format": 1, "saved_at": 1, "netmap": {"a": [[[[[[1]]]]]] * 2}})
                                        .replace("[1]", "[" * 70 + "1" + "]" * 70))
    assert s.saved_map() is None
    assert len(list(s.path.glob("netmap.json.corrupt-*"))) >= 1 and len(s.damage) == 2


def test_pin_damage_is_refused_and_left_in_place(tmp_path: Path) -> None:
    s = _open(tmp_path)
    assert s.server_key("http://a") is None
    s.save_server_key("http://a", "A" * 43 + "=")
    assert s.server_key("http://a") == "A" * 43 + "="
    assert s.server_key("http://other") is None          # another server: nothing pinned for it
    for bad in ("{", "[]", '{"login_server": "http://a", "server_public_key": "short"}', "\udcff"):
        (s.path / "control.json").write_text(bad, errors="surrogateescape")
        with pytest.raises(IdentityDamaged, match="--force-reauth"):
            s.server_key("http://a")
        assert (s.path / "control.json").exists()


def test_machine_key_is_not_recreated_while_a_node_key_remains(tmp_path: Path) -> None:
    s = _open(tmp_path)
    s.machine_key()
    s.new_node_key()
    (s.path / "machine.key").unlink()
    with pytest.raises(IdentityDamaged, match="machine.key is missing"):
        s.machine_key()
    assert not (s.path / "machine.key").exists()
    s.forget_node_key()
    assert s.machine_key() is not None                   # nothing left of the old identity: fine
