"""The change doorbell of a PostgreSQL store: LISTEN for the notification every write transaction
sends on commit, and ring (wake the server's publisher) at once.

It is only a doorbell: a notification lost while the connection was down (a restart, a network cut,
`pg_terminate_backend`) only delays a change until the server's poll of the version counter, which
keeps running. The listening connection lives in a thread of its own (psycopg's blocking
`notifies()`), reconnecting with a capped backoff.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger("meshnode.control.doorbell")

CHANNEL = "meshnode_changes"


class Doorbell:
    def __init__(self, url: str, ring: Callable[[], None], channel: str = CHANNEL) -> None:
        self.url, self.ring, self.channel = url, ring, channel
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-doorbell", daemon=True)
        self.connected = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import psycopg
        backoff = 0.1
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {self.channel}")
                    self.connected.set()
                    backoff = 0.1
                    self.ring()   # whatever committed while we were not listening
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=0.5):
                            self.ring()
            except psycopg.Error as exc:
                self.connected.clear()
                log.warning("change doorbell: %s; the poll carries changes meanwhile", str(exc).strip())
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)
