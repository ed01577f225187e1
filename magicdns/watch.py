"""Live reloads for the standalone resolver: the view file and the records store.

Both are polled (cheap: a stat and a one-row query) so a change is served within a second without
inotify or restarts; a broken view file is reported and the last good view stays in service.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Awaitable, Callable

from .records import Record
from .store import RecordStore
from .view import DnsView, ViewError, load_view

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.25


class ViewSource:
    """The standalone resolver's view: the view file (or an empty view) plus the records store.

    The SOA serial must grow with every change of either input, so it is their versions added:
    both only ever grow.
    """

    def __init__(self, view_path: str | None, store: RecordStore | None, domain: str | None = None) -> None:
        self.view_path = Path(view_path) if view_path else None
        self.store = store
        self.domain = domain
        self._file_sig: tuple[int, int, int] | None = None
        self._store_version = -1
        self._base: DnsView | None = None
        self._records: list[Record] = []
        self.last_error: str | None = None

    def _signature(self) -> tuple[int, int, int] | None:
        if self.view_path is None:
            return None
        st = os.stat(self.view_path)
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def load(self) -> DnsView:
        """Read everything now; raises ViewError/StoreError (first load must succeed)."""
        self._file_sig = self._signature()
        self._base = self._read_base()
        if self.store is not None:
            self._store_version, self._records = self.store.snapshot()
        return self.current()

    def _read_base(self) -> DnsView:
        if self.view_path is None:
            return DnsView(domain=self.domain) if self.domain else DnsView()
        view = load_view(self.view_path)
        if self.domain and view.domain != self.domain:
            raise ViewError(f"{self.view_path}: domain {view.domain!r} differs from --domain {self.domain!r}")
        return view

    def current(self) -> DnsView:
        assert self._base is not None
        version = self._base.version + max(self._store_version, 0)
        return self._base.with_records(self._records, version)

    def poll(self) -> DnsView | None:
        """A new view if an input changed since the last call, else None. Never raises."""
        changed = False
        try:
            sig = self._signature()
            if sig != self._file_sig:
                self._file_sig = sig
                self._base = self._read_base()
                changed = True
        except (OSError, ViewError) as exc:
            msg = str(exc)
            if msg != self.last_error:
                log.error("view not reloaded, serving the last good one: %s", msg)
            self.last_error = msg
        else:
            self.last_error = None
        if self.store is not None:
            try:
                if self.store.version() != self._store_version:
                    self._store_version, self._records = self.store.snapshot()
                    changed = True
            except Exception as exc:  # a locked or damaged store must not stop serving
                log.error("records not reloaded: %s", exc)
        return self.current() if changed else None


async def watch(source: ViewSource, apply: Callable[[DnsView], Awaitable[None]],
                interval: float = POLL_INTERVAL) -> None:
    """Poll `source` forever, applying each new view."""
    while True:
        await asyncio.sleep(interval)
        view = source.poll()
        if view is not None:
            await apply(view)
            log.info("view %d in service", view.version)
