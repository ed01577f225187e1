"""Strings from the network reach the admin's terminal as text, never as terminal commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hypothesis import given, strategies as st

from meshnode.control.protocol import generate_private_key, public_key_of
from meshnode.control.store import ControlStore, Grant, Registration
from meshnode.node.cli import format_status
from meshnode.safetext import safe

MESHNODE = str(Path(sys.executable).parent / "meshnode")
EVIL_OS = "linux\x1b[2J\x1b]52;c;ZXZpbA==\x07\rfine\u202egnp.exe\u200b"


def test_safe_escapes_controls_and_keeps_ordinary_text() -> None:
    assert safe("web-1.tailnet") == "web-1.tailnet"
    assert safe("Zürich café") == "Zürich café"
    assert safe(EVIL_OS) == "linux\\x1b[2J\\x1b]52;c;ZXZpbA==\\x07\\x0dfine\\u202egnp.exe\\u200b"
    assert safe("a\\x1b") == "a\\\\x1b"        # a literal backslash cannot fake an escape
    assert safe(None) == "None" and safe(3) == "3"


@given(st.text())
def test_nothing_unprintable_survives(text: str) -> None:
    out = safe(text)
    assert out.isprintable()
    assert "\x1b" not in out and "\r" not in out and "\n" not in out


def test_status_table_escapes_peer_names_and_os() -> None:
    st_ = {"backend_state": "Running",
           "self": {"addresses": ["100.64.0.1"], "name": "me", "user": "alice", "os": "linux"},
           "peers": [{"addresses": ["100.64.0.2"], "name": "x\x1b[31m", "user": "bob\r\n", "os": EVIL_OS,
                      "online": False}],
           "health": ["control server: \x1b[2Jgone"]}
    text = format_status(st_)
    assert "\x1b" not in text and "\r" not in text and "\u202e" not in text
    assert "linux\\x1b[2J" in text and "x\\x1b[31m" in text and "\\x1b[2Jgone" in text


def test_control_nodes_ls_escapes_what_nodes_sent(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    store = ControlStore(db)
    key, _ = store.create_authkey("eve\x1b[8m")
    store.register(Registration(public_key_of(generate_private_key()), public_key_of(generate_private_key()),
                                "host\x1b]0;pwned\x07", EVIL_OS, key),
                   lambda user, tags, reg, existing: Grant((), (), False))
    store.close()
    r = subprocess.run([MESHNODE, "control", "nodes", "ls", "--db", str(db)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout and "\r" not in r.stdout
    assert "linux\\x1b[2J" in r.stdout
    r = subprocess.run([MESHNODE, "control", "audit", "ls", "--db", str(db)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "\x1b" not in r.stdout
