"""Which node keys a relay admits: exactly the active nodes of the tailnet.

`TailnetKeys` is a frozen set of raw 32-byte node keys built from control-store rows; the relay's
`admit` callback is a membership test on the current set, and `RelayServer.recheck()` after each
new set disconnects keys that left (a removed, logged-out or expired node).
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Iterable, Protocol

log = logging.getLogger("meshnode.derp.admission")


class _NodeRow(Protocol):
    node_key: str
    logged_out: bool
    expiry: float | None


def node_keys(rows: Iterable[_NodeRow], now: float) -> frozenset[bytes]:
    """Raw keys of the nodes that are logged in and unexpired at `now` (bad keys are skipped)."""
    out = set()
    for row in rows:
        if row.logged_out or (row.expiry is not None and row.expiry <= now):
            continue
        try:
            raw = base64.b64decode(row.node_key, validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(raw) == 32:
            out.add(raw)
    return frozenset(out)


class TailnetKeys:
    """The admitted set, replaced whole on every change (readers never see half an update)."""

    def __init__(self, keys: frozenset[bytes] = frozenset()) -> None:
        self.keys = keys

    def __call__(self, key: bytes) -> bool:
        return key in self.keys

    def update(self, keys: frozenset[bytes]) -> bool:
        """Install a new set; True if it differs."""
        if keys == self.keys:
            return False
        self.keys = keys
        return True
