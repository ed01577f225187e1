"""resolv.conf as values: parse, render ours (with its marker), and decide what to do with what we find.

Sans-I/O: no file is read or written here. `osdns.py` does the I/O around these functions, which keeps
the decisions that matter after a crash (restore? keep? adopt?) testable on plain strings.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from enum import Enum

# The first line of every resolv.conf we write. Recognising our own file after a crash depends on it,
# so it never changes.
MARKER = "# resolv.conf managed by meshnode"
BACKUP_PREFIX = "# original saved in: "


@dataclass(frozen=True, slots=True)
class ResolvConf:
    """The parts of a resolv.conf we care about."""

    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class OsDnsConfig:
    """What the node wants the system resolver to use."""

    nameservers: tuple[str, ...]
    search_domains: tuple[str, ...]


def parse_resolv_conf(text: str) -> ResolvConf:
    """Nameservers, search domains and options; comments, unknown keywords and junk are skipped."""
    nameservers: list[str] = []
    search: list[str] = []
    options: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        word, *rest = line.split()
        if word == "nameserver" and rest:
            # glibc ignores a nameserver line it cannot parse; so do we.
            try:
                nameservers.append(str(ipaddress.ip_address(rest[0].split("%", 1)[0])))
            except ValueError:
                continue
        elif word in ("search", "domain"):
            # The last search/domain line wins, as in glibc.
            search = list(rest)
        elif word == "options":
            options.extend(rest)
    return ResolvConf(tuple(nameservers), tuple(search), tuple(options))


def is_ours(text: str | None) -> bool:
    """True when `text` is a resolv.conf written by `render_resolv_conf`."""
    return text is not None and text.startswith(MARKER + "\n")


def render_resolv_conf(config: OsDnsConfig, original: ResolvConf, backup_path: str) -> str:
    """Our resolv.conf: our nameservers, our search domains before the original ones, original options."""
    search: list[str] = []
    for domain in config.search_domains + original.search:
        if domain not in search:
            search.append(domain)
    lines = [MARKER,
             "# Do not edit: meshnode restores the original on `meshnode down` and when it stops.",
             BACKUP_PREFIX + backup_path]
    lines += [f"nameserver {ns}" for ns in config.nameservers]
    if search:
        lines.append("search " + " ".join(search))
    if original.options:
        lines.append("options " + " ".join(original.options))
    return "\n".join(lines) + "\n"


def forwarding_upstreams(original: ResolvConf, own: frozenset[str]) -> tuple[str, ...]:
    """The original resolvers minus our own addresses: forwarding to ourselves would loop."""
    return tuple(ns for ns in original.nameservers if ns not in own)


class Recovery(Enum):
    """What to do with the current resolv.conf and our backup, when starting or stopping."""

    NOTHING = "nothing"              # not ours, no backup: leave it alone
    RESTORE = "restore"              # ours (or gone), backup present: put the original back
    DROP_STALE_BACKUP = "drop-stale-backup"  # someone replaced ours: keep theirs, drop our backup
    ORPHANED = "orphaned"            # ours but the backup is gone: the original is lost


def plan_recovery(current: str | None, backup_exists: bool) -> Recovery:
    """Decide how to undo our changes, e.g. at start after a crash or on `down`."""
    if is_ours(current) or (current is None and backup_exists):
        # A missing file is restored too: leaving the system with no resolv.conf helps nobody.
        return Recovery.RESTORE if backup_exists else Recovery.ORPHANED
    return Recovery.DROP_STALE_BACKUP if backup_exists else Recovery.NOTHING


ORPHAN_TEXT = ("# meshnode: the original resolv.conf was lost (its backup was removed);\n"
               "# add your nameservers here.\n")


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """Enough about a file to notice that someone else replaced or edited it."""

    inode: int
    mtime_ns: int
    digest: str


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Drift(Enum):
    """How the file on disk compares to the one we wrote."""

    INTACT = "intact"
    TOUCHED = "touched"          # rewritten with the same content (inode or mtime changed): harmless
    OVERWRITTEN = "overwritten"  # different content: another program took over the system resolver
    REMOVED = "removed"


def compare(expected: Fingerprint, current: Fingerprint | None) -> Drift:
    if current is None:
        return Drift.REMOVED
    if current.digest != expected.digest:
        return Drift.OVERWRITTEN
    if (current.inode, current.mtime_ns) != (expected.inode, expected.mtime_ns):
        return Drift.TOUCHED
    return Drift.INTACT
