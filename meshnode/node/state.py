"""The node's state directory: keys, prefs and the last network map, each in its own file.

Layout (all files 0600, the directory 0700):
    machine.key   this machine's Curve25519 key; identifies the machine to control servers
    node.key      the node key registered with the control server; removed by `logout`
    prefs.json    what the user asked for with `up`/`down` (see prefs.py)
    netmap.json   the last network map received, so a restart answers names at once
    control.json  the control server's public key, pinned on first contact (per login server)
    daemon.lock   held (flock) by the running daemon so two daemons never share one directory

Every write is atomic (atomicfile.py). Damage is handled by what is at stake: an unreadable key is a
hard error, because silently generating a new one would turn this machine into a different node, and
so is a damaged server pin or a machine key gone while a node key or map remains (`IdentityDamaged`:
`up --force-reauth` starts over); a damaged (or huge, or deeply nested) map or prefs file is moved
aside (kept for inspection), listed in `damage` for `status` health, and the daemon carries on.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.public import PrivateKey

from ..control.protocol import json_depth_ok
from .atomicfile import atomic_write
from .prefs import Prefs, PrefsError, prefs_from_json

log = logging.getLogger("meshnode.node.state")

KEY_PREFIX = "privkey:"
NETMAP_FORMAT = 1


class StateError(RuntimeError):
    """The state directory cannot be used; the message says which file and what to do."""


class KeyFileError(StateError):
    """A key file exists but cannot be used. Never answered by generating a new key."""


class StateLocked(StateError):
    """Another daemon already holds this state directory."""


class IdentityDamaged(StateError):
    """The node's identity cannot be trusted as it is on disk (a damaged server pin, or a machine key
    gone while a node key or map remains). Never papered over: `up --force-reauth` starts over."""


FORCE_REAUTH_HINT = "run `meshnode up --force-reauth --authkey KEY` to start over as a new node"
MAX_STATE_JSON_BYTES = 256 << 20     # a 10k-node map is a few MB; anything near this is not ours
MAX_STATE_JSON_DEPTH = 64

@dataclass(frozen=True, slots=True)
class SavedMap:
    """The last network map as saved: its JSON form and when it was received (unix seconds)."""

    netmap: dict[str, Any]
    saved_at: float


def encode_key(key: PrivateKey) -> str:
    return KEY_PREFIX + bytes(key).hex() + "\n"


def decode_key(text: str, where: str) -> PrivateKey:
    """Parse 'privkey:<64 hex digits>'; raises `KeyFileError` naming `where`."""
    body = text.strip()
    if not body.startswith(KEY_PREFIX):
        raise KeyFileError(f"{where}: not a key file (expected '{KEY_PREFIX}<64 hex digits>')")
    hexpart = body[len(KEY_PREFIX):]
    try:
        raw = bytes.fromhex(hexpart)
    except ValueError:
        raise KeyFileError(f"{where}: the key is not valid hex") from None
    if len(raw) != 32:
        raise KeyFileError(f"{where}: the key has {len(raw)} bytes, expected 32")
    return PrivateKey(raw)


def _is_key(value: Any) -> bool:
    import base64
    import binascii
    if not isinstance(value, str):
        return False
    try:
        return len(base64.b64decode(value, validate=True)) == 32
    except (binascii.Error, ValueError):
        return False


class StateDir:
    """One node's state directory. Not thread-safe: the daemon's control loop is its only user."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None
        self.damage: list[str] = []   # what was found damaged and moved aside, for `status` health

    # -- directory and lock ------------------------------------------------------------------

    def open(self) -> None:
        """Create the directory if needed (0700) and take the daemon lock."""
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"state directory {self.path}: {exc.strerror}") from None
        if not self.path.is_dir():
            raise StateError(f"state directory {self.path}: not a directory")
        self._tighten(self.path, 0o700)
        for name in ("machine.key", "node.key", "prefs.json", "netmap.json", "control.json", "daemon.lock",
                     "forwarding.pre-meshnode.json", "resolv.pre-meshnode.conf"):
            self._tighten(self.path / name, 0o600)
        try:
            fd = os.open(self.path / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateError(f"state directory {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateLocked(f"state directory {self.path} is in use by another meshnode daemon") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    @staticmethod
    def _tighten(path: Path, mode: int) -> None:
        """Keys, the map and the saved resolv.conf are this machine's business only: narrow a wider
        mode (a copy, a restore from backup, a hand edit) and say so."""
        try:
            st = path.lstat()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StateError(f"{path}: cannot stat: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            return
        if st.st_mode & 0o777 & ~mode:
            os.chmod(path, mode)
            log.warning("state: %s had mode %o; set it to %o", path, st.st_mode & 0o777, mode)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- keys --------------------------------------------------------------------------------

    def _read_key(self, name: str) -> PrivateKey | None:
        path = self.path / name
        try:
            st = path.lstat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeyFileError(f"{path}: cannot stat: {exc.strerror}; refusing to create a new key") from None
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{path}: not a regular file; refusing to create a new key")
        try:
            text = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not ASCII text"
            raise KeyFileError(f"{path}: cannot read: {reason}; refusing to create a new key"
                               " (fix or remove the file)") from None
        try:
            key = decode_key(text, str(path))
        except KeyFileError as exc:
            raise KeyFileError(f"{exc}; refusing to create a new key (that would make this machine a"
                               " different node): fix or remove the file") from None
        if st.st_mode & 0o077:
            # A private key others can read is a leak in progress; tighten it rather than refuse,
            # since refusing would take the node down for a permissions slip.
            log.warning("state: %s was readable by others (mode %o); setting it to 0600", path,
                        st.st_mode & 0o777)
            os.chmod(path, 0o600)
        return key

    def machine_key(self) -> PrivateKey:
        """The machine key, created on first use: never while a node key or saved map says this
        directory already had one (`IdentityDamaged`; a new key would silently be a new machine)."""
        key = self._read_key("machine.key")
        if key is None:
            traces = [n for n in ("node.key", "netmap.json") if (self.path / n).exists()]
            if traces:
                raise IdentityDamaged(f"{self.path / 'machine.key'} is missing but {' and '.join(traces)} remain"
                                      f" from the machine it identified; {FORCE_REAUTH_HINT}")
            key = PrivateKey.generate()
            atomic_write(self.path / "machine.key", encode_key(key))
            log.info("state: created machine key in %s", self.path)
        return key

    def node_key(self) -> PrivateKey | None:
        """The registered node key, or None before the first `up` and after `logout`."""
        return self._read_key("node.key")

    def new_node_key(self) -> PrivateKey:
        key = PrivateKey.generate()
        atomic_write(self.path / "node.key", encode_key(key))
        return key

    def forget_node_key(self) -> None:
        try:
            (self.path / "node.key").unlink()
        except FileNotFoundError:
            pass

    # -- prefs and map -----------------------------------------------------------------------

    def _move_aside(self, path: Path, reason: str) -> Path:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        os.replace(path, aside)
        log.error("state: %s is damaged (%s); moved it to %s and carrying on without it",
                  path, reason, aside)
        self.damage.append(f"{path.name} was damaged ({reason}); moved to {aside.name}")
        return aside

    def _parse_json(self, name: str) -> tuple[bool, Any, str]:
        """(found, value, why not) for one state file: too big, not UTF-8, not JSON or nested too deep
        is (True, None, reason); nothing there is (False, None, "")."""
        path = self.path / name
        try:
            size = path.stat().st_size
            if size > MAX_STATE_JSON_BYTES:
                return True, None, f"{size} bytes, more than any state file"
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return False, None, ""
        except UnicodeDecodeError:
            return True, None, "not UTF-8 text"
        except OSError as exc:
            raise StateError(f"{path}: cannot read: {exc.strerror}") from None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            return True, None, f"not valid JSON: {exc}"
        except RecursionError:
            return True, None, "nested too deeply"
        if not json_depth_ok(value, MAX_STATE_JSON_DEPTH):
            return True, None, f"nested more than {MAX_STATE_JSON_DEPTH} levels deep"
        return True, value, ""

    def _read_json(self, name: str) -> Any | None:
        found, value, why = self._parse_json(name)
        if found and why:
            self._move_aside(self.path / name, why)
            return None
        return value

    def prefs(self) -> Prefs:
        """The saved prefs; defaults (not running) when none are saved or the file was damaged."""
        obj = self._read_json("prefs.json")
        if obj is None:
            return Prefs()
        try:
            return prefs_from_json(obj)
        except PrefsError as exc:
            self._move_aside(self.path / "prefs.json", str(exc))
            return Prefs()

    def save_prefs(self, prefs: Prefs) -> None:
        atomic_write(self.path / "prefs.json", json.dumps(prefs.to_json(), indent=2) + "\n")

    def saved_map(self) -> SavedMap | None:
        """The last saved network map, or None (after moving a damaged file aside)."""
        obj = self._read_json("netmap.json")
        if obj is None:
            return None
        if (not isinstance(obj, dict) or obj.get("format") != NETMAP_FORMAT
                or not isinstance(obj.get("netmap"), dict)
                or not isinstance(obj.get("saved_at"), (int, float))):
            self._move_aside(self.path / "netmap.json", f"not a format-{NETMAP_FORMAT} saved map")
            return None
        return SavedMap(obj["netmap"], float(obj["saved_at"]))

    def reject_saved_map(self, reason: str) -> None:
        """Move the saved map aside when its content (not its syntax) turned out to be unusable."""
        path = self.path / "netmap.json"
        if path.exists():
            self._move_aside(path, reason)

    def save_map(self, netmap: dict[str, Any], now: float) -> None:
        doc = {"format": NETMAP_FORMAT, "saved_at": now, "netmap": netmap}
        atomic_write(self.path / "netmap.json", json.dumps(doc, separators=(",", ":")))

    def server_key(self, login_server: str) -> str | None:
        """The pinned public key of `login_server`, if we have talked to it before.

        A damaged pin raises `IdentityDamaged` (left in place): trusting whatever key the server
        shows next would let anyone on the path become our control server."""
        found, obj, why = self._parse_json("control.json")
        if not found:
            return None
        if not why:
            key = obj.get("server_public_key") if isinstance(obj, dict) else None
            if not isinstance(obj, dict) or not isinstance(obj.get("login_server"), str):
                why = "not a pin (expected login_server and server_public_key)"
            elif obj["login_server"] != login_server:
                return None   # a pin for another server: a new login server is a new tailnet
            elif not _is_key(key):
                why = "the pinned key is not a 32-byte base64 key"
            else:
                return key
        raise IdentityDamaged(f"{self.path / 'control.json'} (the control server's pinned key) is damaged:"
                              f" {why}; refusing to trust whatever key the server shows now: {FORCE_REAUTH_HINT}")

    def save_server_key(self, login_server: str, key: str) -> None:
        doc = {"login_server": login_server, "server_public_key": key}
        atomic_write(self.path / "control.json", json.dumps(doc) + "\n")

    def forget_server_key(self) -> None:
        try:
            (self.path / "control.json").unlink()
        except FileNotFoundError:
            pass

    def forget_map(self) -> None:
        try:
            (self.path / "netmap.json").unlink()
        except FileNotFoundError:
            pass
