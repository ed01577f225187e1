"""Machines that log in through the browser (`meshnode up` without an auth key).

The node asks to register with `interactive: true` and no key. The first time, the server makes a
one-time URL `SERVER/register/<id>` (the store keeps only the id's SHA-256) and answers with it.
The node asks again at once; the server holds that request until someone confirms the URL in the
console or a bound passes. Confirming gives the waiting machine a single-use auth key of the
confirming user (expiring with the URL); the node's held request picks it up and registers like any
keyed login, so it joins within the same round trip. The URL expires, a second confirmation is
refused, and a new `up` replaces the machine's pending URL.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import time

from ..store import ControlStore, RegisterRequest

HOLD_SECONDS = 10.0   # how long one node request waits for the confirmation before asking again


def _hash(rid: str) -> str:
    return hashlib.sha256(rid.encode()).hexdigest()


def fingerprint(node_key: str) -> str:
    """A short, readable fingerprint of the node key for the confirmation page."""
    digest = hashlib.sha256(base64.b64decode(node_key)).hexdigest()
    return ":".join(digest[i:i + 4] for i in range(0, 24, 4))


def lookup(store: ControlStore, rid: str, now: float) -> tuple[RegisterRequest | None, str]:
    """The pending request behind a URL id, or (None, why it cannot be confirmed)."""
    req = store.get_register_request(_hash(rid)) if 0 < len(rid) <= 128 else None
    if req is None:
        return None, "This login link is unknown."
    if req.state != "pending":
        return None, "This login link was already used."
    if now >= req.expires:
        return None, "This login link expired; run `meshnode up` again for a new one."
    return req, ""


def approve(store: ControlStore, rid: str, user: str, now: float) -> RegisterRequest:
    return store.approve_register_request(_hash(rid), user, now)


class BrowserLogins:
    """The server side of the node protocol's interactive registration."""

    def __init__(self, store: ControlStore, server_url: str, ttl: float) -> None:
        self.store = store
        self.server_url = server_url.rstrip("/")
        self.ttl = ttl
        self._approved = asyncio.Event()

    def wake(self) -> None:
        old, self._approved = self._approved, asyncio.Event()
        old.set()

    async def login(self, machine_key: str, node_key: str, hostname: str, os_: str,
                    hold: float = HOLD_SECONDS) -> tuple[str | None, str | None]:
        """(auth key to register with, None) once confirmed, else (None, URL to show the user)."""
        deadline = time.monotonic() + hold
        first = True
        while True:
            req = self.store.claim_register_request(machine_key, node_key)
            if req is not None:
                return req.authkey, None
            pending = self.store.pending_register_request(machine_key, node_key, time.time())
            if pending is None:
                rid = secrets.token_urlsafe(24)
                now = time.time()
                self.store.create_register_request(_hash(rid), machine_key, node_key, hostname, os_, now,
                                                   now + self.ttl)
                return None, f"{self.server_url}/register/{rid}"
            if not first and time.monotonic() >= deadline:
                return None, ""   # still waiting; the node asks again
            first = False
            waiter = self._approved
            try:
                await asyncio.wait_for(waiter.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                pass
