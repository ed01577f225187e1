"""resolv.conf comes back exactly as it was: bytes (non-UTF-8, CRLF, no final newline), mode and
owner, and a file that did not exist is removed again; on `down`/exit (restore) and after a crash
(a fresh configurator's recover at the next start)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from meshnode.node.osdns import ResolvConfConfigurator
from meshnode.node.resolvconf import OsDnsConfig, is_ours

CONFIG = OsDnsConfig(("100.100.100.100",), ("tailnet",))
ORIGINALS = [
    b"nameserver 192.0.2.53\r\nsearch corp.example\r\n",                        # CRLF
    b"# r\xe9seau de l'h\xf4tel (latin-1)\nnameserver 192.0.2.1\n\xff\xfe junk\n",  # not UTF-8
    b"nameserver 192.0.2.9",                                                    # no final newline
    b"",                                                                        # empty
]


def _state(path: Path) -> tuple[bytes, int, int, int]:
    st = path.stat()
    return path.read_bytes(), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


@pytest.mark.parametrize("original", ORIGINALS)
@pytest.mark.parametrize("how", ["restore", "crash"])
def test_restored_byte_for_byte_with_mode_and_owner(tmp_path: Path, original: bytes, how: str) -> None:
    path = tmp_path / "resolv.conf"
    path.write_bytes(original)
    os.chmod(path, 0o640)
    if os.geteuid() == 0:
        os.chown(path, 1234, 5678)
    before = _state(path)
    backup = tmp_path / "state" / "resolv.pre-meshnode.conf"
    backup.parent.mkdir()
    c = ResolvConfConfigurator(path, backup)
    c.apply(CONFIG)
    assert is_ours(path.read_text())
    if how == "restore":
        c.restore()                                          # `down` and a clean exit
    else:
        ResolvConfConfigurator(path, backup).recover()      # the next start after kill -9
    assert _state(path) == before
    assert not backup.exists() and not backup.with_name(backup.name + ".meta").exists()


@pytest.mark.parametrize("how", ["restore", "crash"])
def test_a_file_that_did_not_exist_is_removed_again(tmp_path: Path, how: str) -> None:
    path = tmp_path / "resolv.conf"
    backup = tmp_path / "resolv.pre-meshnode.conf"
    c = ResolvConfConfigurator(path, backup)
    c.apply(CONFIG)
    assert is_ours(path.read_text())
    if how == "restore":
        c.restore()
    else:
        ResolvConfConfigurator(path, backup).recover()
    assert not path.exists()


def test_backup_of_an_older_version_without_metadata_still_restores(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_bytes(b"nameserver 192.0.2.1\n")
    backup = tmp_path / "resolv.pre-meshnode.conf"
    c = ResolvConfConfigurator(path, backup)
    c.apply(CONFIG)
    backup.with_name(backup.name + ".meta").unlink()
    ResolvConfConfigurator(path, backup).recover()
    assert path.read_bytes() == b"nameserver 192.0.2.1\n"
