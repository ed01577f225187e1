"""Node names: derived from the machine's hostname the way Tailscale does it, made unique, checked on rename.

Sans-I/O: the caller passes what is taken; nothing here touches the store.
"""

from __future__ import annotations

import re
from typing import Container

from magicdns.names import NameError_, normalize_host_label

MAX_LABEL = 63
FALLBACK = "node"
# Suffixes an OS or a home router appends that say nothing about the machine.
COMMON_SUFFIXES = (".local", ".localdomain", ".lan", ".home", ".home.arpa", ".internal")
_INVALID = re.compile(r"[^a-z0-9-]+")
_DASHES = re.compile(r"-{2,}")


class NameInvalid(ValueError):
    """A name an admin asked for that is not one valid DNS host label."""


class NameTaken(ValueError):
    """A name already held by another node."""


def sanitize_label(text: str) -> str:
    """One host label from arbitrary text: lowercase, invalid characters -> '-', runs collapsed,
    no leading/trailing '-', at most 63 bytes; '' when nothing usable is left."""
    label = _INVALID.sub("-", text.lower())
    label = _DASHES.sub("-", label).strip("-")
    return label[:MAX_LABEL].rstrip("-")


def derive_name(hostname: str, domain: str = "tailnet") -> str:
    """The base name for a hostname: 'Bob’s MacBook.local' -> 'bob-s-macbook', 'web.corp.lan' -> 'web'."""
    host = hostname.strip().lower().rstrip(".")
    for suffix in ("." + domain,) + COMMON_SUFFIXES:
        if host.endswith(suffix):
            host = host[: -len(suffix)]
            break
    # A fully qualified hostname names a machine by its first label (as Tailscale does).
    first = host.split(".", 1)[0]
    return sanitize_label(first) or FALLBACK


def _candidate(base: str, n: int) -> str:
    if n == 0:
        return base
    suffix = f"-{n}"
    return base[: MAX_LABEL - len(suffix)].rstrip("-") + suffix


def candidates(base: str, count: int) -> list[str]:
    """The first `count` names `unique_name` would try, in its order, so a caller can look them all
    up at once (one query) and take the first free one."""
    return [_candidate(base, n) for n in range(count)]


def unique_name(base: str, taken: Container[str]) -> str:
    """`base` if free, else `base-1`, `base-2`, ... trimmed so the result stays within 63 bytes."""
    n = 0
    while True:
        candidate = _candidate(base, n)
        if candidate not in taken:
            return candidate
        n += 1


def validate_name(name: str) -> str:
    """An admin-chosen name, normalised; `NameInvalid` with the rule it breaks."""
    try:
        return normalize_host_label(name)
    except NameError_ as exc:
        raise NameInvalid(str(exc)) from None
