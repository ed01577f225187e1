"""Domain-name text rules: validation, normalisation, and relative-to-absolute expansion."""

from __future__ import annotations

import re

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_HOST_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


class NameError_(ValueError):
    """A domain name or label that breaks the rules; the message says which rule."""


def _check_labels(labels: list[str], text: str, wildcard_ok: bool) -> None:
    if not labels or any(not label for label in labels):
        raise NameError_(f"{text!r} has an empty label")
    for i, label in enumerate(labels):
        if label == "*" and i == 0 and wildcard_ok:
            continue
        if len(label.encode()) > 63:
            raise NameError_(f"label {label!r} in {text!r} is longer than 63 bytes")
        if not _LABEL.match(label):
            raise NameError_(f"label {label!r} in {text!r} may hold only letters, digits, '-' and '_'"
                             " and may not start or end with '-'")
    if len(".".join(labels)) > 253:
        raise NameError_(f"{text!r} is longer than 253 characters")


def normalize_domain(text: str, wildcard_ok: bool = False) -> str:
    """Lowercase `text`, drop one trailing dot, check every label; returns e.g. 'corp.example'."""
    name = text.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise NameError_("the name is empty")
    _check_labels(name.split("."), text, wildcard_ok)
    return name


def normalize_host_label(text: str) -> str:
    """A node's short name: one lowercase label of letters, digits and '-'."""
    label = text.strip().lower()
    if not _HOST_LABEL.match(label):
        raise NameError_(f"host name {text!r} must be one label of 1-63 letters, digits or '-'"
                         " that does not start or end with '-'")
    return label


def is_subdomain(name: str, parent: str) -> bool:
    """True when `name` equals `parent` or lies below it (both normalised)."""
    return name == parent or name.endswith("." + parent)


def absolute_owner(text: str, domain: str, wildcard_ok: bool = True) -> str:
    """An owner name as the records CLI takes it: 'web' -> 'web.tailnet'; 'x.other.' stays absolute.

    A trailing dot or the tailnet domain as suffix makes a name absolute; anything else is relative
    to the tailnet domain.
    """
    raw = text.strip()
    if raw.endswith(".") and raw != ".":
        return normalize_domain(raw, wildcard_ok)
    name = normalize_domain(raw, wildcard_ok)
    if is_subdomain(name, domain):
        return name
    return f"{name}.{domain}"


def absolute_target(text: str, domain: str) -> str:
    """A name inside record data: one label is relative to the tailnet domain, a dotted name is absolute."""
    raw = text.strip()
    if raw == ".":
        return ""
    name = normalize_domain(raw)
    if raw.endswith(".") or "." in name:
        return name
    return f"{name}.{domain}"
