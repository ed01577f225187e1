"""Secrets on disk are the owner's only, whatever the umask: the control database (it holds the
server's private key) with its WAL and SHM files, the admin token, and the node's state directory."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from meshnode.control.store import ControlStore
from meshnode.node.state import StateDir

MESHNODE = str(Path(sys.executable).parent / "meshnode")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_control_database_wal_shm_and_directory_are_private(tmp_path: Path, umask_022: None) -> None:
    db = tmp_path / "new" / "control.db"
    store = ControlStore(db)
    store.create_authkey("alice")          # writes through the WAL
    store.ensure_admin_token()
    assert mode(db.parent) == 0o700
    for suffix in ("", "-wal", "-shm"):
        f = db.with_name(db.name + suffix)
        assert f.exists() and mode(f) == 0o600, (suffix, oct(mode(f)))
    store.close()


def test_wider_modes_found_are_fixed_and_logged(tmp_path: Path, umask_022: None,
                                                caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "control.db"
    keep = ControlStore(db)                # keeps the WAL and SHM files in place
    keep.create_user("bob")
    for suffix in ("", "-wal", "-shm"):
        os.chmod(db.with_name(db.name + suffix), 0o644)
    with caplog.at_level(logging.WARNING):
        other = ControlStore(db)
    for suffix in ("", "-wal", "-shm"):
        assert mode(db.with_name(db.name + suffix)) == 0o600, suffix
    assert "control.db had mode 644" in caplog.text
    other.close()
    keep.close()


def test_admin_token_file_is_0600_under_umask_022(tmp_path: Path) -> None:
    db = tmp_path / "control.db"
    ControlStore(db).close()
    token = tmp_path / "control.db.admin-token"
    token.write_text("old\n")
    os.chmod(token, 0o644)
    r = subprocess.run([MESHNODE, "control", "admin-token", "--rotate", "--db", str(db)], capture_output=True,
                       text=True, timeout=60, preexec_fn=lambda: os.umask(0o022))
    assert r.returncode == 0, r.stderr
    assert mode(token) == 0o600 and token.read_text() != "old\n"
    assert "had mode 644" in r.stderr


def test_node_state_directory_and_files_are_private(tmp_path: Path, umask_022: None,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state"
    state = StateDir(path)
    state.open()
    state.machine_key()
    state.new_node_key()
    state.save_server_key("http://127.0.0.1:1", "AAAA")
    assert mode(path) == 0o700
    for f in path.iterdir():
        assert mode(f) == 0o600, f
    state.close()
    os.chmod(path, 0o755)
    os.chmod(path / "control.json", 0o644)
    os.chmod(path / "node.key", 0o640)
    with caplog.at_level(logging.WARNING):
        again = StateDir(path)
        again.open()
    assert mode(path) == 0o700 and mode(path / "control.json") == 0o600 and mode(path / "node.key") == 0o600
    assert "had mode 755" in caplog.text and "had mode 644" in caplog.text
    again.close()
