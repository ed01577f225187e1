"""Server-side console sessions: the cookie holds a random id, the store holds its SHA-256, the
user, a CSRF token, and the creation and last-activity times that the idle and absolute lifetimes
are measured from."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from ..store import ConsoleSession, ControlStore

COOKIE = "meshnode_session"
TOUCH_EVERY = 60.0   # write last-activity at most this often: a page view should not cost a commit


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    idle: float = 8 * 3600.0          # signed out after this long without a request
    absolute: float = 7 * 24 * 3600.0  # and this long after signing in, whatever happens


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


class Sessions:
    def __init__(self, store: ControlStore, policy: SessionPolicy = SessionPolicy()) -> None:
        self.store = store
        self.policy = policy

    def create(self, user: str, now: float) -> tuple[str, ConsoleSession]:
        """A new session for `user`: (cookie value, stored session)."""
        sid = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        self.store.create_session(_hash(sid), user, csrf, now)
        session = self.store.get_session(_hash(sid))
        assert session is not None
        return sid, session

    def lookup(self, sid: str | None, now: float) -> ConsoleSession | None:
        """The live session for a cookie value, or None (unknown, idle too long, or too old)."""
        if not sid or len(sid) > 128:
            return None
        session = self.store.get_session(_hash(sid))
        if session is None:
            return None
        if now - session.last_active > self.policy.idle or now - session.created > self.policy.absolute:
            self.store.delete_sessions(id_hash=session.id_hash)
            return None
        if now - session.last_active > TOUCH_EVERY:
            self.store.touch_session(session.id_hash, now)
        return session

    def end(self, sid: str | None) -> None:
        if sid:
            self.store.delete_sessions(id_hash=_hash(sid))

    def sweep(self, now: float) -> int:
        return self.store.delete_sessions(idle_before=now - self.policy.idle,
                                          created_before=now - self.policy.absolute)


def csrf_ok(session: ConsoleSession, token: str | None) -> bool:
    return bool(token) and hmac.compare_digest(session.csrf.encode(), str(token).encode())
