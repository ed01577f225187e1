"""Operating-system DNS configuration: point the system resolver at the node's MagicDNS server.

Two configurators share one small interface (apply, restore, check, original, status):
- `ResolvConfConfigurator` owns a resolv.conf file: it backs up the original, writes ours atomically
  (marked, see resolvconf.py), restores the original on `down`, on exit and after a crash at the next
  start, and notices when another program overwrites our file.
- `ResolvedConfigurator` configures systemd-resolved per link (DNS server and domains on the node's
  interface) with `resolvectl`, when resolved manages the system's resolv.conf.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

from .atomicfile import atomic_write
from .resolvconf import (ORPHAN_TEXT, Drift, Fingerprint, OsDnsConfig, Recovery, ResolvConf, compare,
                         digest, is_ours, parse_resolv_conf, plan_recovery, render_resolv_conf)

log = logging.getLogger("meshnode.node.osdns")

RESOLVED_RUN_DIR = Path("/run/systemd/resolve")


class OsDnsError(RuntimeError):
    """The system resolver could not be configured or restored; the message says why."""


@dataclass(frozen=True, slots=True)
class OsDnsStatus:
    """What `meshnode dns status` shows about the system resolver."""

    mode: str                  # "resolv.conf", "systemd-resolved" or "off"
    target: str                # the file or the link we configure
    active: bool               # our configuration is in place (as far as we know)
    drift: str                 # a Drift value: "intact", "overwritten", "removed", ...
    drift_since: float | None  # unix time the drift was first seen
    original_nameservers: tuple[str, ...]


class OsDnsConfigurator(Protocol):
    def recover(self) -> None: ...
    def apply(self, config: OsDnsConfig) -> None: ...
    def restore(self) -> None: ...
    def check(self) -> Drift: ...
    def original(self) -> ResolvConf: ...
    def status(self) -> OsDnsStatus: ...


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OsDnsError(f"{path}: cannot read: {exc.strerror}") from None


def _fingerprint(path: Path) -> Fingerprint | None:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except FileNotFoundError:
        return None
    return Fingerprint(st.st_ino, st.st_mtime_ns, digest(data))


def _replace_file(path: Path, data: str | bytes, mode: int = 0o644,
                  owner: tuple[int, int] | None = None) -> None:
    """Atomic replace; falls back to an in-place rewrite where the file is a mount point.

    Containers often bind-mount /etc/resolv.conf, and rename onto a mount point fails with EBUSY:
    there an in-place write is the only way, and the marker still lets us recognise the file.
    """
    raw = data.encode() if isinstance(data, str) else data
    try:
        atomic_write(path, raw, mode=mode, owner=owner)
    except OSError as exc:
        if exc.errno not in (errno.EBUSY, errno.EXDEV):
            raise OsDnsError(f"{path}: cannot write: {exc.strerror}") from None
        log.warning("osdns: %s is a mount point; rewriting it in place", path)
        with open(path, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())


@dataclass(frozen=True, slots=True)
class Original:
    """How the file was before us, beyond its bytes (kept beside the backup): whether it existed at
    all, its permission bits and its owner, so `restore` gives back exactly what it found."""

    existed: bool = True
    mode: int = 0o644
    uid: int | None = None
    gid: int | None = None

    def to_json(self) -> str:
        return json.dumps({"existed": self.existed, "mode": self.mode, "uid": self.uid, "gid": self.gid})

    @classmethod
    def from_json(cls, text: str | None) -> "Original":
        """Missing or damaged (a backup from an older version): an existing 0644 file, owner unchanged."""
        try:
            obj = json.loads(text) if text else None
            if isinstance(obj, dict):
                return cls(bool(obj.get("existed", True)), int(obj.get("mode", 0o644)) & 0o7777,
                           None if obj.get("uid") is None else int(obj["uid"]),
                           None if obj.get("gid") is None else int(obj["gid"]))
        except (ValueError, TypeError):
            pass
        return cls()


class ResolvConfConfigurator:
    """Manages one resolv.conf file and the backup of its original."""

    def __init__(self, path: str | Path, backup: str | Path) -> None:
        self.path = Path(path)
        self.backup = Path(backup)
        self.link_backup = self.backup.with_name(self.backup.name + ".link")
        self.meta_backup = self.backup.with_name(self.backup.name + ".meta")
        self._expected: Fingerprint | None = None
        self._drift = Drift.INTACT
        self._drift_since: float | None = None

    def recover(self) -> None:
        """At start: undo what a previous daemon that died without cleaning up left behind."""
        plan = plan_recovery(_read(self.path), self.backup.exists())
        if plan is not Recovery.NOTHING:
            log.warning("osdns: found %s left by an earlier run (%s); recovering", self.path, plan.value)
        self._undo(plan)

    def apply(self, config: OsDnsConfig) -> None:
        """Point `path` at `config`, saving the original first (once: re-applying keeps the first backup)."""
        current = _read(self.path)
        if not is_ours(current):
            self._save_backup(current)
        elif not self.backup.exists():
            log.error("osdns: %s is ours but its backup %s is gone; the original resolvers are unknown",
                      self.path, self.backup)
        text = render_resolv_conf(config, self.original(), str(self.backup))
        _replace_file(self.path, text)
        self._expected = _fingerprint(self.path)
        self._drift, self._drift_since = Drift.INTACT, None
        log.info("osdns: %s now points at %s (search %s)", self.path, ", ".join(config.nameservers),
                 " ".join(config.search_domains) or "-")

    def restore(self) -> None:
        """Put the original back (`down`, exit). Another program's file is left in place."""
        self._undo(plan_recovery(_read(self.path), self.backup.exists()))
        self._expected = None
        self._drift, self._drift_since = Drift.INTACT, None

    def _save_backup(self, current: str | None) -> None:
        # The bytes exactly as found (not the decoded text: a non-UTF-8 byte or a CRLF must come back
        # as it was), and beside them whether the file existed, its mode and its owner. The backup
        # itself is written last: its presence is what says "ours to restore".
        try:
            st = self.path.stat()
            raw = self.path.read_bytes()
            meta = Original(True, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
        except FileNotFoundError:
            raw, meta = b"", Original(existed=False)
        except OSError as exc:
            raise OsDnsError(f"{self.path}: cannot read: {exc.strerror}") from None
        if self.path.is_symlink():
            # e.g. /etc/resolv.conf -> /run/resolvconf/resolv.conf: restore the link, not a copy.
            atomic_write(self.link_backup, os.readlink(self.path), mode=0o600)
        else:
            self.link_backup.unlink(missing_ok=True)
        atomic_write(self.meta_backup, meta.to_json(), mode=0o600)
        atomic_write(self.backup, raw, mode=0o600)

    def _undo(self, plan: Recovery) -> None:
        if plan is Recovery.RESTORE:
            if self.link_backup.exists():
                target = self.link_backup.read_text()
                tmp = self.path.with_name(f".{self.path.name}.meshnode-link")
                tmp.unlink(missing_ok=True)
                os.symlink(target, tmp)
                os.replace(tmp, self.path)
            else:
                meta = Original.from_json(_read(self.meta_backup))
                if not meta.existed:
                    self.path.unlink(missing_ok=True)   # there was none before us: there is none after
                else:
                    owner = (meta.uid, meta.gid) if meta.uid is not None and meta.gid is not None else None
                    _replace_file(self.path, self.backup.read_bytes(), meta.mode, owner)
            log.info("osdns: restored the original %s", self.path)
        elif plan is Recovery.DROP_STALE_BACKUP:
            log.warning("osdns: %s was replaced by another program; keeping that version and dropping"
                        " our stale backup %s", self.path, self.backup)
        elif plan is Recovery.ORPHANED:
            log.error("osdns: %s is ours but its backup is gone; writing a placeholder", self.path)
            _replace_file(self.path, ORPHAN_TEXT)
        if plan is not Recovery.NOTHING:
            self.backup.unlink(missing_ok=True)
            self.link_backup.unlink(missing_ok=True)
            self.meta_backup.unlink(missing_ok=True)

    def check(self) -> Drift:
        """Compare the file with what we wrote; an overwrite is logged once and kept for `dns status`."""
        if self._expected is None:
            return Drift.INTACT
        current = _fingerprint(self.path)
        drift = compare(self._expected, current)
        if drift is Drift.TOUCHED:
            self._expected = current  # same content rewritten: nothing lost, follow the new file
            drift = Drift.INTACT
        if drift is not self._drift:
            if drift is not Drift.INTACT:
                log.warning("osdns: %s was %s by another program; the system resolver may no longer use"
                            " MagicDNS (run `meshnode up` again to take it back)", self.path, drift.value)
                self._drift_since = time.time()
            else:
                self._drift_since = None
            self._drift = drift
        return drift

    def original(self) -> ResolvConf:
        """The resolvers the system used before us: from the backup, or the file while it is not ours."""
        text = _read(self.backup)
        if text is None:
            current = _read(self.path)
            text = "" if is_ours(current) else (current or "")
        return parse_resolv_conf(text)

    def status(self) -> OsDnsStatus:
        return OsDnsStatus("resolv.conf", str(self.path), self._expected is not None,
                           self._drift.value, self._drift_since, self.original().nameservers)


def resolved_commands(link: str, config: OsDnsConfig) -> list[list[str]]:
    """The resolvectl calls that make `link` serve `config`: routing domains for the tailnet only.

    No '~.' routing domain: the rest of the system's queries keep going to the uplink's resolvers,
    and the node's server forwards to those same resolvers, so nothing loops through us.
    """
    domains = [f"~{d}" for d in config.search_domains] + list(config.search_domains)
    return [["resolvectl", "dns", link, *config.nameservers],
            ["resolvectl", "domain", link, *domains],
            ["resolvectl", "default-route", link, "false"]]


Runner = Callable[[Sequence[str]], None]


def _run(cmd: Sequence[str]) -> None:
    try:
        subprocess.run(list(cmd), check=True, capture_output=True, text=True, timeout=10)
    except subprocess.CalledProcessError as exc:
        raise OsDnsError(f"{' '.join(cmd)} failed: {exc.stderr.strip() or exc.returncode}") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OsDnsError(f"{' '.join(cmd)}: {exc}") from None


class ResolvedConfigurator:
    """Per-link DNS through systemd-resolved; resolved forgets it by itself when the link goes away."""

    def __init__(self, link: str, run_dir: Path = RESOLVED_RUN_DIR, runner: Runner = _run) -> None:
        self.link = link
        self.run_dir = run_dir
        self._runner = runner
        self._active = False

    def recover(self) -> None:
        # Per-link settings die with the link, and a crashed daemon's link is gone or recreated.
        pass

    def apply(self, config: OsDnsConfig) -> None:
        for cmd in resolved_commands(self.link, config):
            self._runner(cmd)
        self._active = True

    def restore(self) -> None:
        if self._active:
            self._runner(["resolvectl", "revert", self.link])
            self._active = False

    def check(self) -> Drift:
        return Drift.INTACT

    def original(self) -> ResolvConf:
        # resolved's own view of the uplink resolvers (not its 127.0.0.53 stub).
        text = _read(self.run_dir / "resolv.conf") or ""
        return parse_resolv_conf(text)

    def status(self) -> OsDnsStatus:
        return OsDnsStatus("systemd-resolved", self.link, self._active, Drift.INTACT.value, None,
                           self.original().nameservers)


def resolved_in_use(resolv_conf: Path, run_dir: Path = RESOLVED_RUN_DIR) -> bool:
    """True when systemd-resolved runs and owns `resolv_conf` (a link into its run directory, or its stub)."""
    if not run_dir.is_dir() or shutil.which("resolvectl") is None:
        return False
    try:
        if resolv_conf.is_symlink() and str(resolv_conf.resolve()).startswith(str(run_dir)):
            return True
        text = resolv_conf.read_text(errors="replace")
    except OSError:
        return False
    return "127.0.0.53" in parse_resolv_conf(text).nameservers
