"""Where console changes are recorded, with the signed-in user as the actor.

The control-hardening work adds the hash-chained audit log (`meshnode.control.audit.record`); until
it is on this branch, `record` is the one place that writes: it logs to `meshnode.control.audit` and
keeps the recent entries in memory for the Logs page. When the audit module lands, this function
becomes a call to it and `recent` reads from it.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

log = logging.getLogger("meshnode.control.audit")


@dataclass(frozen=True, slots=True)
class AuditEntry:
    time: float
    actor: str
    action: str
    target: str
    detail: str


_recent: collections.deque[AuditEntry] = collections.deque(maxlen=1000)


def record(actor: str, action: str, target: str = "", detail: str = "") -> AuditEntry:
    entry = AuditEntry(time.time(), actor, action, target, detail)
    _recent.append(entry)
    log.info("audit actor=%s action=%s target=%s %s", actor, action, target, detail)
    return entry


def recent(limit: int = 200) -> list[AuditEntry]:
    """Newest first."""
    return list(reversed(_recent))[:limit]
