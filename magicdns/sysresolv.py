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


def read_original_resolvers(path: str | Path = "/etc/resolv.conf", backup_path: str | Path | None = None,
                            own_addresses: Iterable[Upstream] = ()) -> tuple[Upstream, ...]:
    """The system's original resolvers: from `backup_path` when that file exists (our configurator
    saved the original there), else from `path`; ourselves (100.100.100.100, fd7a:115c:a1e0::53,
    `own_addresses`) skipped, then glibc's limit of three applied. A missing file or no nameserver gives
    an empty tuple: the caller decides (glibc would use 127.0.0.1)."""
    source = Path(path)
    if backup_path is not None and Path(backup_path).exists():
        source = Path(backup_path)
    try:
        text = source.read_text(errors="replace")
    except FileNotFoundError:
        return ()
    except OSError as exc:
        raise ResolvConfError(exc.errno, f"cannot read {source}: {exc.strerror}") from None
    own = tuple(own_addresses)
    servers = parse_nameservers(text)
    result = tuple(up for up in servers if not is_self(up, own))
    if len(result) < len(servers):
        log.info("%s: skipped %d nameserver(s) that are this resolver", source, len(servers) - len(result))
    return result[:MAXNS]
