"""The system's own resolvers, as they were before we took over /etc/resolv.conf.

They are the last resort for forwarding (DESIGN.md section 3). When the node's DNS configurator
has replaced /etc/resolv.conf with one pointing at us, the original lives in a backup file: that one
is read instead. Nameservers that are ourselves are skipped, so the result never loops.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Iterable

from .forward import is_self
from .upstream import Upstream

log = logging.getLogger(__name__)

# glibc reads at most this many nameserver lines (MAXNS in resolv.h) and ignores the rest.
MAXNS = 3

# The comment meshnode's DNS configurator writes into the resolv.conf it installs.
BACKUP_COMMENT = "# original saved in: "


class ResolvConfError(OSError):
    """A resolv.conf that exists but cannot be read."""


def parse_nameservers(text: str) -> tuple[Upstream, ...]:
    """Every usable `nameserver` address of a resolv.conf text, in order (port 53, zone ids kept).

    Follows glibc: comments start with '#' or ';' at the start of a line, the keyword is followed by
    whitespace, only the first word after it counts, and lines that do not parse are ignored.
    """
    found: list[Upstream] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        words = line.split()
        if words[0] != "nameserver" or len(words) < 2:
            continue
        word = words[1]
        # '[::1]' is not glibc syntax, but some tools write it; accept it rather than lose a resolver.
        if word.startswith("[") and word.endswith("]"):
            word = word[1:-1]
        try:
            addr = ipaddress.ip_address(word)
        except ValueError:
            log.warning("resolv.conf line %d: %r is not an IP address; ignored", lineno, words[1])
            continue
        found.append(Upstream(str(addr), 53))
    return tuple(found)


def _backup_named_in(text: str) -> Path | None:
    """The backup path a configurator wrote into its resolv.conf ('# original saved in: PATH', as
    meshnode's does), if any."""
    for line in text.splitlines():
        if line.startswith(BACKUP_COMMENT):
            named = line[len(BACKUP_COMMENT):].strip()
            return Path(named) if named else None
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ResolvConfError(exc.errno, f"cannot read {path}: {exc.strerror}") from None


def read_original_resolvers(path: str | Path = "/etc/resolv.conf", backup_path: str | Path | None = None,
                            own_addresses: Iterable[Upstream] = ()) -> tuple[Upstream, ...]:
    """The system's original resolvers, ourselves (100.100.100.100, fd7a:115c:a1e0::53,
    `own_addresses`) skipped, then glibc's limit of three applied.

    `path` is read first. When it has been replaced by ours (it names its backup in a
    '# original saved in: PATH' comment, or every nameserver in it is ourselves) and the backup
    (`backup_path`, else the named one) exists, the backup is the original and is read instead; a
    backup next to a resolv.conf that someone else rewrote since is stale and ignored. A missing file
    or no usable nameserver gives an empty tuple: the caller decides (glibc would use 127.0.0.1).
    Raises ResolvConfError when a file exists but cannot be read.
    """
    own = tuple(own_addresses)
    source = Path(path)
    text = _read(source) or ""
    servers = parse_nameservers(text)
    usable = tuple(up for up in servers if not is_self(up, own))
    named = _backup_named_in(text)
    replaced = named is not None or (servers and not usable)
    backup = Path(backup_path) if backup_path is not None else named
    if replaced and backup is not None:
        original = _read(backup)
        if original is not None:
            source = backup
            servers = parse_nameservers(original)
            usable = tuple(up for up in servers if not is_self(up, own))
    if len(usable) < len(servers):
        log.info("%s: skipped %d nameserver(s) that are this resolver", source, len(servers) - len(usable))
    return usable[:MAXNS]
