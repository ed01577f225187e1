"""Console changes in the control store's hash-chained audit log, with the signed-in user as actor.

Store changes made inside `acting(store, user)` are audited by the store itself, in the change's own
transaction, as `user:EMAIL` (`ControlStore.acting_as`, `meshnode/control/audit.py`); `record` adds
the console's own events (sign-in, sign-out) to the `meshnode.control.audit` logger, and `recent`
is what the Logs page shows.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from ..store import ControlStore

log = logging.getLogger("meshnode.control.audit")


@dataclass(frozen=True, slots=True)
class AuditEntry:
    time: float
    actor: str
    action: str
    target: str
    detail: str


def actor_of(user: str) -> str:
    return f"user:{user}"


@contextmanager
def acting(store: ControlStore, user: str) -> Iterator[None]:
    """Store changes made inside are audited as this signed-in user. Store calls are synchronous,
    so no other request's change can run inside on the event loop."""
    with store.acting_as(actor_of(user)):
        yield


def record(user: str, action: str, target: str = "", detail: str = "") -> None:
    """A console event for the operator's log (the change itself is in the audit log already)."""
    log.info("audit actor=%s action=%s target=%s %s", actor_of(user), action, target, detail)


def recent(store: ControlStore, limit: int = 500) -> list[AuditEntry]:
    """The newest audit entries first."""
    return [AuditEntry(e.time, e.actor, e.action, e.target, _detail(e.old, e.new))
            for e in reversed(store.audit_entries(limit=limit))]


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
