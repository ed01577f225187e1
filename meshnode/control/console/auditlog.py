"""Where console changes are recorded, with the signed-in user as the actor.

With the control store's hash-chained audit log (`meshnode/control/audit.py`, from the control
hardening work: `ControlStore.acting_as`, `audit_entries`), every store change made inside
`acting(store, user)` is audited by the store itself, in the change's own transaction, as
`user:EMAIL`; the Logs page reads that log. On a store without it, `record` keeps the console's
changes in memory (the last 1,000 of this process) and logs them to `meshnode.control.audit`.
Either way every console change also goes to that logger.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

log = logging.getLogger("meshnode.control.audit")


@dataclass(frozen=True, slots=True)
class AuditEntry:
    time: float
    actor: str
    action: str
    target: str
    detail: str


_recent: collections.deque[AuditEntry] = collections.deque(maxlen=1000)


def has_audit_log(store: Any) -> bool:
    return hasattr(store, "acting_as") and hasattr(store, "audit_entries")


def actor_of(user: str) -> str:
    return f"user:{user}"


@contextmanager
def acting(store: Any, user: str) -> Iterator[None]:
    """Store changes made inside are audited as this signed-in user (when the store audits)."""
    if not has_audit_log(store):
        yield
        return
    with store.acting_as(actor_of(user)):
        yield


def record(store: Any, user: str, action: str, target: str = "", detail: str = "") -> None:
    """Note a console change. The store's audit log has it already (made inside `acting`); else it
    is kept here."""
    log.info("audit actor=%s action=%s target=%s %s", actor_of(user), action, target, detail)
    if not has_audit_log(store):
        _recent.append(AuditEntry(time.time(), actor_of(user), action, target, detail))


def recent(store: Any, limit: int = 500) -> list[AuditEntry]:
    """Newest first."""
    if has_audit_log(store):
        return [AuditEntry(e.time, e.actor, e.action, e.target, _detail(e.old, e.new))
                for e in reversed(store.audit_entries(limit=limit))]
    return list(reversed(_recent))[:limit]


def _detail(old: Any, new: Any) -> str:
    def short(v: Any) -> str:
        text = json.dumps(v, sort_keys=True, separators=(",", ":"))
        return text if len(text) <= 200 else text[:199] + "…"
    if old is None and new is None:
        return ""
    if old is None:
        return short(new)
    if new is None:
        return f"was {short(old)}"
    return f"{short(old)} → {short(new)}"
